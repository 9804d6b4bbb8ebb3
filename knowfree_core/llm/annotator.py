"""Label extension annotation by an LLM (paper §3.1, pipeline 1): P_ent, P_seg, P_pos.

The LLM implements the same ``Annotator`` interface as the offline tools, so the Ray job,
``knowfree annotate`` and training treat LAC, jieba and an LLM alike. Per sentence:

- ``ent``: P_ent → ``[{entity, type}]`` → every occurrence of each entity string becomes an
  ``ENT-<type>`` span (types are merged into standard labels later by ``merge_labels``);
- ``seg``: P_seg → a word list → ``SEG`` spans;
- ``pos``: P_pos *given the P_seg words* → ``[{word, pos}]`` → ``POS-<tag>`` spans, with the
  units the answer missed filled from the segmentation (tag ``X``), as the paper combines the
  two. Asking for ``pos`` without ``seg`` still runs P_seg (its words are P_pos's input) but
  publishes no ``SEG`` spans.

Every answer ends either as spans or as counted rejections with a reason; an engine failure
for one prompt rejects that step of that sentence only. Answers go through the answer cache
(when given), so a rerun after a crash does not pay for the same call twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from knowfree_core.annotators.alignment import Rejection
from knowfree_core.annotators.base import (
    STEPS,
    AnnotationResult,
    Annotator,
    SEG_LABEL,
    ent_label,
    pos_label,
    source_name,
)
from knowfree_core.annotators.alignment import align_words
from knowfree_core.llm.cache import AnswerCache, ask, generate_cached
from knowfree_core.llm.engine import (
    REASON_ENGINE_ERROR, ChatPrompt, Completion, EngineConfig, GenerationParams, LLMEngine, ResponseSchema,
    build_engine, check_engine_access,
)
from knowfree_core.llm.ledger import StepTokens
from knowfree_core.llm.parsing import (
    DEFAULT_MAX_ANSWER_CHARS, ParsedAnswer, answer_too_long, parse_entities, parse_pos, parse_words,
)
from knowfree_core.llm.span_alignment import align_entities, align_pos_with_repair
from knowfree_core.errors import ConfigError
from knowfree_core.prompts import PromptTemplate, load_prompt
from knowfree_core.records import ExtensionSpan, Sentence

REASON_UNPARSABLE = "unparsable answer"
REASON_NO_SEGMENTATION = "no segmentation for POS"
REASON_REJECTED_TYPE = "rejected type"

#: Longest entity type or POS tag (after cleaning) that becomes a label: a real type is a
#: word or two; a longer one is a sentence the model wrote into the type field.
MAX_LABEL_CHARS = 32


def _clean_label(text: str) -> tuple[str, str | None]:
    """The label an LLM's type or tag becomes, and why it cannot be one (None when it can).

    One line, no surrounding or repeated whitespace: LLM types like ' 地 点\\n' would otherwise
    become distinct labels. Labels name label-map entries, report rows and, downstream, files:
    only short, printable, non-path-like text is taken, whatever a prompt injection asks for."""
    label = " ".join(str(text).split())
    if len(label) > MAX_LABEL_CHARS:
        return label, f"longer than {MAX_LABEL_CHARS} characters"
    if not label.isprintable():
        return label, "not printable"
    if any(part in label for part in ("/", "\\", "..")) or label.startswith("."):
        return label, "path-like"
    return label, None


def step_schema(template: PromptTemplate) -> ResponseSchema:
    """``template``'s answer schema, for structured outputs; a json step without one is a
    one-line ConfigError (a user's prompt folder may predate schemas)."""
    schema = template.response_schema
    if schema is None:
        raise ConfigError(f"{template.path}: engine.structured_outputs is on, but the {template.name!r} prompt has "
                          "no schema; add one (see prompts/<language>/*.yaml) or turn structured_outputs off")
    return schema


class LLMAnnotator(Annotator):
    """Annotates with an LLM engine; ``source_prefix`` names its sources (``llm:ent`` ...)."""

    supported_steps = STEPS

    def __init__(
        self,
        engine: LLMEngine | EngineConfig | dict,
        language: str = "zh",
        prompts_dir: str | Path | None = None,
        params: GenerationParams | dict | None = None,
        cache: AnswerCache | str | Path | None = None,
        source_prefix: str = "llm",
        entity_mode: str = "all",
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    ):
        if isinstance(engine, dict):
            engine = EngineConfig(**engine)
        self._engine_config = engine if isinstance(engine, EngineConfig) else None
        self._engine: LLMEngine | None = engine if isinstance(engine, LLMEngine) else None
        self.language = language
        self.prompts: dict[str, PromptTemplate] = {
            step: load_prompt(step, language, prompts_dir) for step in STEPS
        }
        if isinstance(params, dict):
            params = GenerationParams(**params)
        self.params = params or GenerationParams()
        self.cache = AnswerCache(cache) if isinstance(cache, (str, Path)) else cache
        self.name = source_prefix
        self.entity_mode = entity_mode
        #: Longer answers are a counted rejection and are not parsed.
        self.max_answer_chars = max_answer_chars

    @property
    def engine(self) -> LLMEngine:
        # Built on first use: an actor constructs the annotator cheaply and pays the model
        # load only when work arrives.
        if self._engine is None:
            assert self._engine_config is not None
            self._engine = build_engine(self._engine_config)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    def check_access(self, key: str = "engine") -> None:
        """Fail fast on an unknown engine kind, a missing model, a wrong key or model name or an
        endpoint that is down (``check_engine_access``; ``key`` names the config section in
        the message). A local vllm/transformers engine is checked without building it: that
        would load the model in the caller and again in every worker. With structured
        outputs, every step's prompt must have a schema."""
        if self.structured_outputs:
            for step in STEPS:
                step_schema(self.prompts[step])
        if self._engine_config is not None:
            check_engine_access(self._engine_config, key)
            return
        check = getattr(self.engine, "check_access", None)
        if check is not None:
            check()

    # -- one step over all sentences ----------------------------------------------------

    @property
    def structured_outputs(self) -> bool:
        """Whether answers are constrained to their step's schema (``EngineConfig``'s flag;
        read from the config, so asking does not build the engine)."""
        config = self._engine_config if self._engine_config is not None else self.engine.config
        return bool(config.structured_outputs)

    def schema(self, step: str) -> ResponseSchema | None:
        """The schema sent with ``step``'s prompts: its template's, with structured outputs."""
        if not self.structured_outputs:
            return None
        return step_schema(self.prompts[step])

    def _ask(self, step: str, prompts: list[ChatPrompt]) -> list[Completion]:
        if not prompts:
            return []
        version = self.prompts[step].version
        if self.cache is None:
            return ask(self.engine, prompts, self.params, self.schema(step))
        return generate_cached(self.engine, self.cache, prompts, self.params, version, self.schema(step))

    def annotate(self, sentences: list[Sentence], steps: tuple[str, ...] = STEPS) -> list[AnnotationResult]:
        wanted = self.check_steps(steps)
        results = [
            AnnotationResult(s.id, sources=tuple(source_name(self.name, step) for step in wanted))
            for s in sentences
        ]
        if not sentences:
            return results
        texts = [s.text for s in sentences]
        run_seg = "seg" in wanted or "pos" in wanted

        # ent and seg do not depend on each other: one engine call each, before pos.
        if "ent" in wanted:
            answers = self._ask("ent", [self.prompts["ent"].render(sentence=t) for t in texts])
            for sentence, result, answer in zip(sentences, results, answers):
                self._record(result, "ent", answer)
                parsed = self._parse(result, "ent", answer, parse_entities)
                if parsed is not None:
                    self._add_entities(sentence, result, parsed.items)

        seg_words: list[list[str] | None] = [None] * len(sentences)
        if run_seg:
            answers = self._ask("seg", [self.prompts["seg"].render(sentence=t) for t in texts])
            for i, (sentence, result, answer) in enumerate(zip(sentences, results, answers)):
                self._record(result, "seg", answer)
                parsed = self._parse(result, "seg", answer, parse_words)
                if parsed is None:
                    continue
                # P_pos is given only the words that are really in the sentence: a
                # hallucinated word would ask the model to tag text that is not there.
                seg_words[i] = self._add_words(sentence, result, parsed.items, publish="seg" in wanted)

        if "pos" in wanted:
            todo = [i for i, words in enumerate(seg_words) if words]
            for i, result in enumerate(results):
                if not seg_words[i]:
                    result.rejections.append(
                        Rejection(REASON_NO_SEGMENTATION, "P_pos needs the P_seg words, which failed", "pos")
                    )
            prompts = [self.prompts["pos"].render(sentence=texts[i], words=seg_words[i]) for i in todo]
            for i, answer in zip(todo, self._ask("pos", prompts)):
                result = results[i]
                self._record(result, "pos", answer)
                parsed = self._parse(result, "pos", answer, parse_pos)
                if parsed is not None:
                    self._add_pos(sentences[i], result, seg_words[i] or [], parsed.items)
        return results

    # -- helpers -----------------------------------------------------------------------

    def _record(self, result: AnnotationResult, step: str, answer: Completion) -> None:
        result.prompt_versions[step] = self.prompts[step].version
        result.tokens[step] = StepTokens.of(self.prompts[step].version, [answer])
        if answer.ok:
            # An over-long answer is kept only up to the bound: it is rejected anyway, and the
            # row files should not carry megabytes of it.
            result.raw_answers[step] = answer.text[: self.max_answer_chars]

    def _parse(self, result: AnnotationResult, step: str, answer: Completion, parse) -> ParsedAnswer | None:
        if not answer.ok:
            result.rejections.append(Rejection(REASON_ENGINE_ERROR, str(answer.error), step))
            return None
        too_long = answer_too_long(answer.text, self.max_answer_chars)
        if too_long is not None:
            result.rejections.append(Rejection(too_long.reason, too_long.detail, step))
            return None
        parsed = parse(answer.text)
        result.rejections.extend(Rejection(r.reason, r.detail, step) for r in parsed.rejections)
        if parsed.error is not None:
            if not any(r.reason == parsed.error for r in parsed.rejections):
                result.rejections.append(Rejection(REASON_UNPARSABLE, parsed.error, step))
            return None
        return parsed

    def _labelled(self, result: AnnotationResult, step: str, pairs) -> list[tuple[str, str]]:
        """``(text, label)`` pairs whose label is usable (:func:`_clean_label`); the others
        are counted rejections."""
        kept = []
        what = "type" if step == "ent" else "tag"
        for text, raw in pairs:
            label, problem = _clean_label(raw)
            if problem is None:
                kept.append((str(text), label))
            else:
                shown = label if len(label) <= 40 else label[:37] + "..."
                detail = f"{what} {shown!r} of {str(text)[:20]!r}: {problem}"
                result.rejections.append(Rejection(REASON_REJECTED_TYPE, detail, step))
        return kept

    def _add_entities(self, sentence: Sentence, result: AnnotationResult, entities) -> None:
        cleaned = self._labelled(result, "ent", entities)
        aligned = align_entities(sentence.units, sentence.joiner, cleaned, mode=self.entity_mode)
        result.rejections.extend(Rejection(r.reason, r.detail, "ent") for r in aligned.rejections)
        source = source_name(self.name, "ent")
        for span in aligned.spans:
            result.spans.append(ExtensionSpan(span.start, span.end, ent_label(span.label), source))

    def _add_words(
        self, sentence: Sentence, result: AnnotationResult, words: Sequence[str], publish: bool
    ) -> list[str]:
        """Align the P_seg words; publish them as SEG spans when asked. Returns the words
        that were found in the sentence (P_pos's input)."""
        words = list(words)
        aligned = align_words(sentence.units, words, sentence.joiner)
        result.rejections.extend(Rejection(r.reason, r.detail, "seg") for r in aligned.rejections)
        source = source_name(self.name, "seg")
        if publish:
            for word in aligned.words:
                result.spans.append(ExtensionSpan(word.start, word.end, SEG_LABEL, source))
        return [words[word.index] for word in aligned.words]

    def _add_pos(self, sentence: Sentence, result: AnnotationResult, seg_words: Sequence[str], pairs) -> None:
        cleaned = self._labelled(result, "pos", pairs)
        aligned = align_pos_with_repair(sentence.units, sentence.joiner, list(seg_words), cleaned)
        # Segmentation rejections were already counted under "seg" when seg is published.
        result.rejections.extend(
            Rejection(r.reason, r.detail, "pos") for r in aligned.rejections if r.detail.startswith("pos:")
        )
        source = source_name(self.name, "pos")
        for span in aligned.spans:
            result.spans.append(ExtensionSpan(span.start, span.end, pos_label(span.pos), source))

