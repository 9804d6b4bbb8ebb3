"""The annotator interface: anything that turns sentences into extension spans.

Offline tools (LAC, jieba) implement it now; LLM engines will implement the same
``annotate`` later, so the pipeline that stores extension labels does not care which
produced them.

Steps
    ``"ent"``  entities of any type, ``"seg"`` words, ``"pos"`` the POS of those words.

Labels
    Extension labels share one label vocabulary with the target labels (e.g. Weibo's
    ``PER.NAM``), so every extension label carries a prefix that no target label uses:

    ===========  ==========================  =====================================
    step         label                       example
    ===========  ==========================  =====================================
    ``seg``      ``SEG_LABEL``               ``SEG``
    ``pos``      ``POS_PREFIX`` + tool tag   ``POS-n``, ``POS-nr``
    ``ent``      ``ENT_PREFIX`` + type       ``ENT-PER``, ``ENT-ORG``, ``ENT-OTHER``
    ===========  ==========================  =====================================

    A trained KnowFREE model used as an annotator (``knowfree``) puts its corpus tag in the
    type, ``ENT-<corpus>.<type>`` (``ENT-msra.PER``), so its labels stay apart from LAC's.

    ``ExtensionSpan.source`` is ``"<annotator>:<step>"`` (``lac:pos``, ``jieba:seg``), so
    the same label from two tools stays two spans and ablations can drop one source.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from knowfree_core.annotators.alignment import (
    REASON_TOOL_ERROR,
    Rejection,
    align_words,
)
from knowfree_core.llm.ledger import StepTokens
from knowfree_core.records import ExtensionSpan, Sentence
from knowfree_core.registry import LazyRegistry
from knowfree_core.retry import run_batch_or_one_by_one

STEPS: tuple[str, ...] = ("ent", "seg", "pos")

SEG_LABEL = "SEG"
POS_PREFIX = "POS-"
ENT_PREFIX = "ENT-"


def pos_label(tag: str) -> str:
    return f"{POS_PREFIX}{tag}"


def ent_label(entity_type: str) -> str:
    return f"{ENT_PREFIX}{entity_type}"


def source_name(annotator: str, step: str) -> str:
    return f"{annotator}:{step}"


@dataclass
class AnnotationResult:
    """What one annotator found in one sentence.

    ``sources`` lists every source this run was responsible for, including those that
    found nothing: ``apply_annotations`` uses it to replace stale spans of a source even
    when the new run produced none.
    """

    sentence_id: str
    spans: list[ExtensionSpan] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    sources: tuple[str, ...] = ()
    #: LLM annotators: the raw answer per step and the prompt version that asked for it,
    #: kept in output records so a user can audit any label back to the answer it came from.
    raw_answers: dict[str, str] = field(default_factory=dict)
    prompt_versions: dict[str, str] = field(default_factory=dict)
    #: LLM annotators: the tokens each step's answer used (none for offline tools).
    tokens: dict[str, StepTokens] = field(default_factory=dict)


class Annotator(ABC):
    """Produces extension spans for sentences. Implementations load models lazily."""

    #: Registry name and the prefix of every source this annotator writes.
    name: str = ""
    #: Which of ``STEPS`` this annotator can run.
    supported_steps: tuple[str, ...] = STEPS

    @abstractmethod
    def annotate(self, sentences: list[Sentence], steps: tuple[str, ...] = STEPS) -> list[AnnotationResult]:
        """Return one result per sentence, in input order."""

    def check_steps(self, steps: Sequence[str] | str) -> tuple[str, ...]:
        """Validate and normalise ``steps``: a lone string is one step, repeats are dropped."""
        if isinstance(steps, str):
            # ("seg") is a str, not a tuple; iterating it would ask for steps "s", "e", "g".
            steps = (steps,)
        wanted = tuple(dict.fromkeys(steps))
        unknown = [s for s in wanted if s not in self.supported_steps]
        if unknown:
            raise ValueError(
                f"annotator {self.name!r} does not support steps {unknown}; "
                f"supported: {list(self.supported_steps)}"
            )
        return wanted


class WordTaggerAnnotator(Annotator):
    """Shared logic of tools that answer with a ``(word, tag)`` sequence per text.

    Subclasses only run the tool and say how a tag maps to a POS tag and an entity type;
    alignment to units, rejections and span construction live here once.
    """

    @abstractmethod
    def _tag_texts(self, texts: list[str]) -> list[list[tuple[str, str]]]:
        """Run the tool over ``texts``; one ``(word, tag)`` list per text."""

    @abstractmethod
    def _pos_tag(self, tag: str) -> str | None:
        """The POS tag to publish for a word tagged ``tag`` (``None``: no POS span)."""

    @abstractmethod
    def _entity_type(self, tag: str) -> str | None:
        """The entity type of a word tagged ``tag``, or ``None`` when it is not an entity."""

    def annotate(self, sentences: list[Sentence], steps: tuple[str, ...] = STEPS) -> list[AnnotationResult]:
        wanted = self.check_steps(steps)
        if not sentences:
            return []
        # A single bad sentence costs only its own annotations: (words, error) per sentence.
        tagged: list[tuple[list[tuple[str, str]], str | None]] = run_batch_or_one_by_one(
            lambda batch: [(words, None) for words in self._tag_texts([s.text for s in batch])],
            sentences,
            lambda _sentence, error: ([], error),
            what=f"annotator {self.name}",
        )
        return [
            self._result(sentence, words, error, wanted)
            for sentence, (words, error) in zip(sentences, tagged)
        ]

    def _result(
        self,
        sentence: Sentence,
        words: list[tuple[str, str]],
        error: str | None,
        steps: tuple[str, ...],
    ) -> AnnotationResult:
        result = AnnotationResult(sentence.id, sources=tuple(source_name(self.name, s) for s in steps))
        if error is not None:
            result.rejections.append(Rejection(REASON_TOOL_ERROR, error))
            return result
        alignment = align_words(sentence.units, [w for w, _ in words], joiner=sentence.joiner)
        result.rejections.extend(alignment.rejections)
        for step in steps:
            source = source_name(self.name, step)
            for placed in alignment.words:
                label = self._label(step, words[placed.index][1])
                if label is not None:
                    result.spans.append(ExtensionSpan(placed.start, placed.end, label, source))
        return result

    def _label(self, step: str, tag: str) -> str | None:
        if step == "seg":
            return SEG_LABEL
        if step == "pos":
            pos = self._pos_tag(tag)
            return pos_label(pos) if pos else None
        entity = self._entity_type(tag)
        return ent_label(entity) if entity else None


def apply_annotations(
    sentences: Sequence[Sentence],
    results: Iterable[AnnotationResult],
    replace_sources: bool = True,
) -> list[Sentence]:
    """Return copies of ``sentences`` with the results' spans added as extension spans.

    Results are matched by sentence id. With ``replace_sources`` the sentence's existing
    spans from the sources a result covers are dropped first, so re-running an annotator
    replaces its output instead of piling up. A span equal to one already present (same
    offsets, label *and* source) is not added twice; the same label from two sources is
    kept, so each source can be ablated on its own.
    """
    by_id: dict[str, AnnotationResult] = {}
    for result in results:
        if result.sentence_id in by_id:
            raise ValueError(f"two annotation results for sentence id {result.sentence_id!r}")
        by_id[result.sentence_id] = result
    known_ids = {s.id for s in sentences}
    stray = [i for i in by_id if i not in known_ids]
    if stray:
        raise ValueError(f"annotation results for unknown sentence ids: {stray[:5]}")

    updated: list[Sentence] = []
    for sentence in sentences:
        result = by_id.get(sentence.id)
        if result is None:
            updated.append(dataclasses.replace(sentence, extension_spans=list(sentence.extension_spans)))
            continue
        dropped = (set(result.sources) | {s.source for s in result.spans}) if replace_sources else set()
        kept = [s for s in sentence.extension_spans if s.source not in dropped]
        present = set(kept)
        for span in result.spans:
            if span not in present:
                present.add(span)
                kept.append(span)
        new_sentence = dataclasses.replace(sentence, extension_spans=kept)
        new_sentence.validate()
        updated.append(new_sentence)
    return updated


# Imported on demand so that asking for jieba does not load LAC.
_REGISTRY = LazyRegistry(
    {
        "lac": "knowfree_core.annotators.lac:LacAnnotator",
        "jieba": "knowfree_core.annotators.jieba_annotator:JiebaAnnotator",
        "llm": "knowfree_core.llm.annotator:LLMAnnotator",
        "knowfree": "knowfree_core.annotators.knowfree_model:KnowFreeModelAnnotator",
    },
    what="annotator",
    plural="annotators",
    open=True,
    base=Annotator,
)


def known_annotators() -> tuple[str, ...]:
    return _REGISTRY.names()


def get_annotator(name: str, **options: Any) -> Annotator:
    """Build the annotator registered as ``name`` with ``options`` for its constructor.

    ``name`` may also be ``"package.module:ClassName"``: a user's own ``Annotator`` subclass,
    plugged in without changing this registry.
    """
    return _REGISTRY.resolve(name)(**options)
