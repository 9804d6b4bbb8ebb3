"""Pipeline 2, enriched explanation synthesis, as plain functions (``jobs/synthesize.py`` runs
them in Ray Data actors; nothing here imports ray).

For each training sentence an LLM continues the sentence and explains its target entities
(P_exp, with the entities and their types) or, for a sentence without entities, extracts
and explains its key phrases (P_ext). Each answer is split into sentences; empty, too short,
too long and duplicate pieces are dropped and counted. A synthetic sentence keeps the link
to its source in its id, ``<source id>#syn<continuation>.<piece>``, and carries
``synthetic=True``: training weights its loss by β (L + β·L_syn).

The frozen pipeline-1 model then labels target entities in the synthetic sentences
(:class:`SyntheticLabeler`); pipeline 1 adds their extension labels.

Rows (input as in :mod:`knowfree_core.annotation`: ``{"id", "order", "record"}``); one output
row per *source* sentence, so resume keys on the source id even when every piece was dropped:
``id``, ``order``, ``synthetic`` (JSON list of sentence records), ``raw_answers`` (JSON list,
one per continuation), ``prompt_version``, ``tokens`` (JSON ``{step: StepTokens}``: what its
continuations used), ``rejections`` (JSON list of {reason, detail}), ``n_synthetic``,
``n_rejections``, ``seconds``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from knowfree_core.annotation import collect_rows, write_failed_list
from knowfree_core.bounds import COUNT, check_bounds
from knowfree_core.errors import ConfigError
from knowfree_core.llm.cache import AnswerCache, generate_cached
from knowfree_core.llm.engine import (
    REASON_ENGINE_ERROR, EngineConfig, GenerationParams, LLMEngine, build_engine, check_engine_access,
)
from knowfree_core.llm.ledger import StepTokens, cost_summary, ledger_of_rows, row_tokens, token_lines
from knowfree_core.llm.parsing import DEFAULT_MAX_ANSWER_CHARS, answer_too_long
from knowfree_core.prompts import PromptTemplate, load_prompt
from knowfree_core.records import Sentence

logger = logging.getLogger(__name__)

REASON_EMPTY = "empty answer"
REASON_TOO_SHORT = "sentence too short"
REASON_TOO_LONG = "sentence too long"
REASON_DUPLICATE = "duplicate sentence"
REASON_SOURCE_COPY = "copy of a training sentence"
REASON_PROMPT_ECHO = "echo of the prompt"
REASON_OVER_CAP = "over max_per_source"

# Sentence ends: Chinese/Japanese full stops, question and exclamation marks, semicolons and
# line breaks; for space-separated languages also "." "!" "?" before whitespace.
_CJK_END = re.compile(r"(?<=[。！？；!?;])|\n+")
_LATIN_END = re.compile(r"(?<=[.!?;])\s+|\n+")
# Markdown and list decoration an LLM puts around its sentences.
_LEADING_DECORATION = re.compile(r"^(?:[#>*\-•·]+|\d+[.、)）]|[（(]\d+[)）]|[一二三四五六七八九十]+、)\s*")
_EMPHASIS = re.compile(r"\*\*|__|`")
# Section headers the explanation prompts invite ("续写：", "Explanation:").
_HEADER = re.compile(
    r"^(?:续写|后文|续写后文|解释|实体解释|关键短语|样例|continuation|explanation|key phrases)\s*[：:]\s*", re.IGNORECASE
)
_CLOSING_QUOTES = "”’」』\"'）)】"


#: Continuations should vary: sample, with a seed so that a rerun asks the same prompts (and
#: hits the answer cache). Frozen, so sharing one instance is safe.
DEFAULT_SYNTHESIS_PARAMS = GenerationParams(max_tokens=256, temperature=0.8, top_p=0.95, seed=0)


@dataclass
class SynthesisSettings:
    """What to ask and what to keep.

    continuations
        Answers per source sentence. Each asks with ``seed + i`` (when a seed is set), so with
        temperature > 0 they differ; at temperature 0 extra continuations only repeat.
    min_units, max_units
        Synthetic sentences outside these lengths (in units) are dropped and counted.
    max_per_source
        Keep at most this many sentences per source sentence (the first ones of its answers;
        the rest are counted as ``over max_per_source``). None keeps all: the paper does not
        cap, but on a slow machine the synthetic set sets the retraining time.
    max_answer_chars
        A longer answer is a counted rejection ("answer too long") and is not split.
    """

    language: str = "zh"
    prompts_dir: str | None = None
    continuations: int = 1
    min_units: int = 5
    max_units: int = 160
    max_per_source: int | None = None
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS

    def __post_init__(self) -> None:
        # ConfigError (a ValueError): a config file's bad value is one line naming the key.
        check_bounds("synthesis", self, {"continuations": COUNT, "max_per_source": COUNT,
                                         "min_units": COUNT, "max_units": COUNT, "max_answer_chars": COUNT})
        if self.min_units > self.max_units:
            raise ConfigError(
                f"synthesis: need min_units <= max_units, got {self.min_units} and {self.max_units}"
            )


def entity_pairs(sentence: Sentence) -> list[tuple[str, str]]:
    """The target entities of a sentence as (text, label), in order, without repeats."""
    return list(dict.fromkeys((sentence.span_text(span), span.label) for span in sorted(sentence.spans)))


def synthesis_prompt(sentence: Sentence, exp: PromptTemplate, ext: PromptTemplate) -> tuple[list[dict[str, str]], str]:
    """P_exp for a sentence with target entities, P_ext otherwise; returns (messages, version)."""
    if sentence.spans:
        return exp.render(sentence=sentence.text, entities=entity_pairs(sentence)), exp.version
    return ext.render(sentence=sentence.text), ext.version


def _clean_piece(piece: str) -> str:
    piece = _EMPHASIS.sub("", piece).strip()
    previous = None
    while previous != piece:  # "1. **- x" → "x"
        previous = piece
        piece = _HEADER.sub("", _LEADING_DECORATION.sub("", piece).strip())
    return piece


def split_into_sentences(text: str, joiner: str = "") -> list[str]:
    """Split an answer into cleaned sentences (markdown emphasis, bullets and numbering
    removed). A closing quote after a full stop stays with its sentence."""
    pattern = _CJK_END if joiner == "" else _LATIN_END
    pieces: list[str] = []
    for raw in pattern.split(text):
        if raw is None:
            continue
        if pieces and raw[:1] and raw[0] in _CLOSING_QUOTES:
            # a quote closing the previous sentence: move it back
            quote_end = len(raw) - len(raw.lstrip(_CLOSING_QUOTES))
            pieces[-1] += raw[:quote_end]
            raw = raw[quote_end:]
        pieces.append(raw)
    return [cleaned for cleaned in (_clean_piece(p) for p in pieces) if cleaned]


def to_units(text: str, joiner: str) -> list[str]:
    """Characters without whitespace for character-level languages, tokens otherwise."""
    if joiner == "":
        return [ch for ch in text if not ch.isspace()]
    return text.split()


def _normalized(text: str) -> str:
    return "".join(text.split())


#: A piece is an echo of the prompt when at least this share of its character 4-grams occur in
#: the prompt: small models repeat the instructions with a word changed or dropped, which an
#: exact substring test misses.
ECHO_SHARE = 0.6


def _grams(text: str, n: int = 4) -> set[str]:
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def _echoes(key: str, prompt_grams: set[str]) -> bool:
    grams = _grams(key)
    return len(key) >= 8 and bool(grams) and len(grams & prompt_grams) >= ECHO_SHARE * len(grams)


class Synthesizer:
    """Writes the synthetic sentences of batches of prepared rows; one per worker (Ray actor).

    ``engine`` is an :class:`EngineConfig` (as a dict, so it pickles to actors) or an engine
    instance; ``cache`` a path to the SQLite answer cache (None: no cache).
    """

    def __init__(
        self,
        engine: EngineConfig | dict | LLMEngine,
        settings: SynthesisSettings | dict | None = None,
        params: GenerationParams | dict | None = None,
        cache: str | None = None,
    ):
        self._engine_spec = engine
        self._engine: LLMEngine | None = engine if isinstance(engine, LLMEngine) else None
        self.settings = settings if isinstance(settings, SynthesisSettings) else SynthesisSettings(**(settings or {}))
        if isinstance(params, dict):
            params = GenerationParams(**{**params, "stop": tuple(params.get("stop") or ())})
        self.params = params or DEFAULT_SYNTHESIS_PARAMS
        self.cache = AnswerCache(cache) if cache else None
        self.exp = load_prompt("exp", self.settings.language, self.settings.prompts_dir)
        self.ext = load_prompt("ext", self.settings.language, self.settings.prompts_dir)

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            spec = self._engine_spec
            self._engine = build_engine(spec if isinstance(spec, EngineConfig) else EngineConfig(**spec))
        return self._engine

    def check_access(self, key: str = "engine") -> None:
        """Fail fast (unknown engine kind, missing model, wrong key or model, endpoint down)
        before any row is processed, without loading a local model (``check_engine_access``)."""
        spec = self._engine_spec
        if not isinstance(spec, LLMEngine):
            check_engine_access(spec if isinstance(spec, EngineConfig) else EngineConfig(**spec), key)
        elif hasattr(spec, "check_access"):
            spec.check_access()

    def _params(self, continuation: int) -> GenerationParams:
        seed = self.params.seed
        return replace(self.params, seed=None if seed is None else seed + continuation)

    def synthesize(self, sentences: Sequence[Sentence]) -> list[dict[str, Any]]:
        """Per source sentence: ``{"synthetic": [Sentence], "raw_answers": [str|None],
        "prompt_version": str, "tokens": {step: StepTokens}, "rejections": [{"reason", "detail"}]}``."""
        prompts = [synthesis_prompt(s, self.exp, self.ext) for s in sentences]
        answers_by_continuation = []
        for continuation in range(self.settings.continuations):
            params = self._params(continuation)
            # One engine call per (continuation, prompt version): the version is part of the
            # cache key, and P_exp/P_ext have their own.
            answers: list[Any] = [None] * len(sentences)
            for version in dict.fromkeys(v for _, v in prompts):
                chosen = [i for i, (_, v) in enumerate(prompts) if v == version]
                got = generate_cached(self.engine, self.cache, [prompts[i][0] for i in chosen], params, version)
                for i, answer in zip(chosen, got):
                    answers[i] = answer
            answers_by_continuation.append(answers)

        results = []
        for index, sentence in enumerate(sentences):
            seen = {_normalized(sentence.text)}
            # the prompt without the source sentence itself: repeating that is a copy, not an echo
            prompt_text = _normalized(" ".join(m["content"] for m in prompts[index][0]))
            prompt_grams = _grams(prompt_text.replace(_normalized(sentence.text), "\n"))
            synthetic: list[Sentence] = []
            raw: list[str | None] = []
            rejections: list[dict[str, str]] = []
            for continuation, answers in enumerate(answers_by_continuation):
                answer = answers[index]
                if not answer.ok:
                    raw.append(None)
                    rejections.append({"reason": REASON_ENGINE_ERROR, "detail": str(answer.error)})
                    continue
                too_long = answer_too_long(answer.text, self.settings.max_answer_chars)
                raw.append(answer.text[: self.settings.max_answer_chars])
                if too_long is not None:
                    rejections.append({"reason": too_long.reason, "detail": too_long.detail})
                    continue
                pieces = split_into_sentences(answer.text, sentence.joiner)
                if not pieces:
                    rejections.append({"reason": REASON_EMPTY, "detail": f"continuation {continuation}"})
                for piece_index, piece in enumerate(pieces):
                    units = to_units(piece, sentence.joiner)
                    key = _normalized(piece)
                    reason = None
                    if len(units) < self.settings.min_units:
                        reason = REASON_TOO_SHORT
                    elif len(units) > self.settings.max_units:
                        reason = REASON_TOO_LONG
                    elif key == _normalized(sentence.text):
                        reason = REASON_SOURCE_COPY
                    elif key in seen:
                        reason = REASON_DUPLICATE
                    elif _echoes(key, prompt_grams):
                        reason = REASON_PROMPT_ECHO  # the model repeated its instructions
                    elif self.settings.max_per_source is not None and len(synthetic) >= self.settings.max_per_source:
                        reason = REASON_OVER_CAP
                    if reason:
                        rejections.append({"reason": reason, "detail": f"{len(units)} units: {piece[:40]}"})
                        continue
                    seen.add(key)
                    synthetic.append(
                        Sentence(
                            id=f"{sentence.id}#syn{continuation}.{piece_index}",
                            units=units,
                            synthetic=True,
                            joiner=sentence.joiner,
                        )
                    )
            step = (self.exp if sentence.spans else self.ext).name
            tokens = StepTokens.of(prompts[index][1], (answers[index] for answers in answers_by_continuation))
            results.append(
                {"synthetic": synthetic, "raw_answers": raw, "prompt_version": prompts[index][1],
                 "tokens": {step: tokens}, "rejections": rejections}
            )
        return results

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        sentences = [Sentence.from_dict(json.loads(row["record"])) for row in rows]
        results = self.synthesize(sentences)
        seconds = (time.perf_counter() - started) / max(len(rows), 1)
        return [
            {
                "id": str(row["id"]),
                "order": int(row["order"]),
                "synthetic": json.dumps([s.to_dict() for s in result["synthetic"]], ensure_ascii=False),
                "raw_answers": json.dumps(result["raw_answers"], ensure_ascii=False),
                "prompt_version": result["prompt_version"],
                "tokens": row_tokens(result["tokens"]),
                "rejections": json.dumps(result["rejections"], ensure_ascii=False),
                "n_synthetic": len(result["synthetic"]),
                "n_rejections": len(result["rejections"]),
                "seconds": seconds,
            }
            for row, result in zip(rows, results)
        ]


# -- output -------------------------------------------------------------------------------


@dataclass
class SynthesisSummary:
    sources: int = 0
    #: Sources with an engine error (in failed.jsonl): their other answers are kept, but they
    #: are not recorded as done, so the same command asks them again.
    engine_failed_rows: int = 0
    sources_with_entities: int = 0
    answers: int = 0
    synthetic_sentences: int = 0
    rejections: int = 0
    rejections_by_reason: dict[str, int] = field(default_factory=dict)
    prompt_versions: dict[str, int] = field(default_factory=dict)
    wall_seconds: float | None = None
    #: P_exp's and P_ext's tokens (``knowfree_core.llm.ledger``), per 1000 *source* sentences.
    tokens: dict[str, Any] = field(default_factory=dict)
    #: ``tokens`` priced with ``engine.price_per_million`` (:meth:`price`); None without a price.
    cost: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def price(self, engine: EngineConfig) -> None:
        """Set ``cost`` from ``tokens`` and the engine's price (nothing without one)."""
        self.cost = cost_summary(self.tokens, engine.price_per_million, engine.cost_projection_sentences)

    def table(self) -> str:
        lines = [
            f"source sentences     {self.sources} ({self.sources_with_entities} with entities: P_exp, "
            f"{self.sources - self.sources_with_entities} without: P_ext)",
            f"answers              {self.answers}",
            f"synthetic sentences  {self.synthetic_sentences}",
            f"dropped              {self.rejections}",
        ]
        if self.engine_failed_rows:
            lines.insert(1, f"engine failed        {self.engine_failed_rows} sources (failed.jsonl; the same "
                            "command asks them again)")
        lines += [f"  {reason:<28} {n}" for reason, n in sorted(self.rejections_by_reason.items(), key=lambda x: -x[1])]
        if self.wall_seconds is not None:
            lines.append(f"wall time            {self.wall_seconds:.1f} s")
        lines += token_lines(self.tokens, self.cost)
        return "\n".join(lines)


def collect_synthesis(
    rows_dir: str | Path, out_path: str | Path, exp_version_prefix: str = "exp",
    failed_dir: str | Path | None = None, failed_list: str | Path | None = None,
) -> tuple[SynthesisSummary, int]:
    """Write the synthetic sentences of every row (in source order, each sentence once: a
    sentence another source already produced is dropped and counted) to ``out_path`` as
    JSONL; returns the summary and the number of duplicate rows (a retried batch) dropped.
    The engine-failed rows of ``failed_dir`` count and contribute as in
    :func:`knowfree_core.annotation.collect_output`, and ``failed_list`` lists them."""
    collected = collect_rows(rows_dir, failed_dir)
    if failed_list is not None:
        write_failed_list(collected.failed, failed_list)
    seen_texts: set[str] = set()
    summary = SynthesisSummary(engine_failed_rows=len(collected.failed))
    reasons: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    with open(out_path, "w", encoding="utf-8") as handle:
        for row in collected.rows:
            summary.sources += 1
            versions[row["prompt_version"]] += 1
            if str(row["prompt_version"]).startswith(exp_version_prefix):
                summary.sources_with_entities += 1
            raw = json.loads(row["raw_answers"])
            summary.answers += sum(1 for answer in raw if answer is not None)
            reasons.update(r["reason"] for r in json.loads(row["rejections"]))
            for record in json.loads(row["synthetic"]):
                key = _normalized(record["text"])
                if key in seen_texts:
                    reasons[REASON_DUPLICATE] += 1
                    continue
                seen_texts.add(key)
                summary.synthetic_sentences += 1
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary.rejections = sum(reasons.values())
    summary.rejections_by_reason = dict(reasons)
    summary.prompt_versions = dict(versions)
    summary.tokens = ledger_of_rows(collected.rows).summary(summary.sources)
    return summary, collected.duplicates


# -- labelling with the frozen pipeline-1 model ---------------------------------------------


class SyntheticLabeler:
    """Labels target entities in batches of prepared rows with a frozen KnowFREE model
    (``model_dir`` as written by ``knowfree train``); one per worker (a Ray actor).

    Output rows keep the input's ``id``/``order`` and carry the sentence (its predicted target
    spans, ``synthetic=True``) as ``record`` plus ``n_spans``.
    """

    def __init__(self, model_dir: str, batch_size: int = 32, device: str = "cpu", num_threads: int | None = None):
        import torch

        from knowfree_core.model.knowfree import KnowFreeModel

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = KnowFreeModel.from_pretrained(model_dir, device=device)
        self.model.eval()
        self.batch_size = batch_size

    def label(self, sentences: Sequence[Sentence]) -> list[Sentence]:
        predicted = self.model.predict(list(sentences), batch_size=self.batch_size)
        return [replace(s, spans=list(spans), synthetic=True) for s, spans in zip(sentences, predicted)]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        sentences = [Sentence.from_dict(json.loads(row["record"])) for row in rows]
        labelled = self.label(sentences)
        return [
            {"id": str(row["id"]), "order": int(row["order"]),
             "record": json.dumps(sentence.to_dict(), ensure_ascii=False), "n_spans": len(sentence.spans)}
            for row, sentence in zip(rows, labelled)
        ]
