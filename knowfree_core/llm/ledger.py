"""The token and cost ledger of the LLM jobs: what each prompt step used, and what it cost.

Every answer carries the tokens the engine counted for it (``Completion.prompt_tokens`` /
``completion_tokens``: OpenAI's ``usage``, vLLM's token ids, the transformers tokenizer). An
answer from the answer cache used no new tokens: it counts as ``cached``, not as a request.

Per output row (a sentence of jobs.annotate, a source sentence of jobs.synthesize) the job
stores ``{step: StepTokens}`` as JSON in the row's ``tokens`` column; :class:`TokenLedger`
adds the rows up into the summary's ``tokens`` section, and :func:`cost_summary` prices it
with ``engine.price_per_million``::

    tokens:
      by_step: {ent: {prompt_version, prompt_tokens, completion_tokens, requests, cached}, ...}
      per_1000_sentences: {prompt_tokens, completion_tokens}
    cost:
      run, per_1000_sentences, projected: {sentences, cost}

Nothing here imports an engine: the rows and summaries are plain JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from knowfree_core.llm.engine import Completion, Price


@dataclass
class StepTokens:
    """What one prompt step used (for one row, or added up over a run)."""

    #: The version of the prompt that asked (``PromptTemplate.version``).
    prompt_version: str = ""
    #: Prompt (input) tokens of the requests the engine answered.
    prompt_tokens: int = 0
    #: Completion (output) tokens of those requests.
    completion_tokens: int = 0
    #: Answers the engine produced (each paid for); failed prompts are not counted.
    requests: int = 0
    #: Answers taken from the answer cache: no new tokens.
    cached: int = 0

    @classmethod
    def of(cls, prompt_version: str, completions: Iterable["Completion"]) -> "StepTokens":
        step = cls(prompt_version)
        for completion in completions:
            step.add(completion)
        return step

    def add(self, completion: "Completion") -> None:
        if completion.cached:
            self.cached += 1
        elif completion.ok:
            self.requests += 1
            self.prompt_tokens += completion.prompt_tokens
            self.completion_tokens += completion.completion_tokens

    def merge(self, other: "StepTokens") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.requests += other.requests
        self.cached += other.cached

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StepTokens":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def row_tokens(steps: Mapping[str, StepTokens]) -> str:
    """The ``tokens`` column of a row: ``{step: StepTokens}`` as JSON."""
    return json.dumps({step: tokens.to_dict() for step, tokens in steps.items()}, ensure_ascii=False)


class TokenLedger:
    """The tokens of a run's rows, added up per step and prompt version."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, str], StepTokens] = {}

    def add(self, step: str, tokens: StepTokens) -> None:
        key = (step, tokens.prompt_version)
        self._steps.setdefault(key, StepTokens(tokens.prompt_version)).merge(tokens)

    def add_row(self, column: str | Mapping[str, Any] | None) -> None:
        """One row's ``tokens`` column (JSON text or its dict); rows written before the
        ledger existed have none and add nothing."""
        if not column:
            return
        data = json.loads(column) if isinstance(column, str) else column
        for step, tokens in data.items():
            self.add(step, StepTokens.from_dict(tokens))

    def by_step(self) -> dict[str, StepTokens]:
        """Keyed by step; a step asked with several prompt versions (a prompt file changed
        between reruns) keeps one entry per version, keyed ``<step>@<version>``."""
        versions: dict[str, int] = {}
        for step, _ in self._steps:
            versions[step] = versions.get(step, 0) + 1
        return {(step if versions[step] == 1 else f"{step}@{version}"): tokens
                for (step, version), tokens in sorted(self._steps.items())}

    def summary(self, sentences: int) -> dict[str, Any]:
        """The summary's ``tokens`` section for a run of ``sentences`` rows.

        ``per_1000_sentences`` is what 1000 sentences use when every answer is asked anew:
        per step, the mean tokens of its paid requests times its answers (paid or cached) per
        sentence. Cached answers have no token counts of their own, so a plain total over
        sentences would make a resumed run look cheap. None when no request was paid.
        """
        steps = self.by_step()
        per_1000: dict[str, float] | None = None
        if sentences and any(t.requests for t in steps.values()):
            prompt = completion = 0.0
            for tokens in steps.values():
                if tokens.requests:
                    answers_per_sentence = (tokens.requests + tokens.cached) / sentences
                    prompt += tokens.prompt_tokens / tokens.requests * answers_per_sentence * 1000
                    completion += tokens.completion_tokens / tokens.requests * answers_per_sentence * 1000
            per_1000 = {"prompt_tokens": round(prompt, 1), "completion_tokens": round(completion, 1)}
        return {"by_step": {step: tokens.to_dict() for step, tokens in steps.items()},
                "per_1000_sentences": per_1000}


def ledger_of_rows(rows: Iterable[Mapping[str, Any]]) -> TokenLedger:
    ledger = TokenLedger()
    for row in rows:
        ledger.add_row(row.get("tokens"))
    return ledger


def cost_summary(tokens: Mapping[str, Any], price: "Price | None", projection_sentences: int) -> dict[str, Any] | None:
    """The summary's ``cost`` section, from its ``tokens`` section priced per million tokens;
    None without a price. ``projected`` is ``projection_sentences`` at the per-1000 cost."""
    if price is None:
        return None
    steps = tokens.get("by_step", {}).values()
    run = price.cost(sum(s["prompt_tokens"] for s in steps), sum(s["completion_tokens"] for s in steps))
    per_1000_tokens = tokens.get("per_1000_sentences")
    per_1000 = (price.cost(per_1000_tokens["prompt_tokens"], per_1000_tokens["completion_tokens"])
                if per_1000_tokens else None)
    projected = None if per_1000 is None else per_1000 * projection_sentences / 1000
    return {"run": round(run, 6), "per_1000_sentences": None if per_1000 is None else round(per_1000, 6),
            "projected": {"sentences": projection_sentences,
                          "cost": None if projected is None else round(projected, 2)}}


def token_rows(tokens: Mapping[str, Any]) -> list[list[str]]:
    """The ``tokens`` section as table rows: step, prompt version, prompt and completion
    tokens, requests, cached (the job's printed table and ``knowfree report`` share it)."""
    return [[step, s["prompt_version"], str(s["prompt_tokens"]), str(s["completion_tokens"]), str(s["requests"]),
             str(s["cached"])] for step, s in tokens.get("by_step", {}).items()]


TOKEN_HEADER = ["step", "prompt version", "prompt tokens", "completion tokens", "requests", "cached"]


def token_lines(tokens: Mapping[str, Any] | None, cost: Mapping[str, Any] | None) -> list[str]:
    """The ``tokens`` and ``cost`` sections as the lines of a job's printed summary table."""
    if not tokens or not tokens.get("by_step"):
        return []
    lines = ["tokens               prompt / completion (requests, cached)"]
    for step, version, prompt, completion, requests, cached in token_rows(tokens):
        lines.append(f"  {step:<18} {prompt} / {completion} ({requests}, {cached} cached) {version}")
    per_1000 = tokens.get("per_1000_sentences")
    if per_1000:
        lines.append(f"  per 1000 sentences {per_1000['prompt_tokens']:.0f} / {per_1000['completion_tokens']:.0f}")
    lines += cost_lines(cost)
    return lines


def cost_lines(cost: Mapping[str, Any] | None) -> list[str]:
    if not cost:
        return []
    projected = cost["projected"]
    line = f"cost                 {cost['run']:.4f} this output"
    if cost["per_1000_sentences"] is not None:
        line += (f"; {cost['per_1000_sentences']:.4f} per 1000 sentences; {projected['cost']:.2f} "
                 f"for {projected['sentences']:,} sentences")
    return [line]
