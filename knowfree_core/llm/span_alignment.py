"""Place an LLM's answer strings on the units of a sentence.

An LLM names entities by their text, not by offsets, so an entity string is searched in the
sentence with the same matching as the offline annotators
(:mod:`knowfree_core.annotators.alignment`: whitespace-insensitive, NFKC + casefold). By
default every occurrence is marked: the answer says "北京 is a place", which holds wherever
北京 occurs. A match that starts or ends inside a unit (half an English word) is not a span.

POS answers are aligned in order like a tool's words; since LLMs drop words from POS answers,
units left uncovered are filled from the P_seg segmentation with the tag ``X``, as the paper
combines the two outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Sequence

from knowfree_core.annotators.alignment import (
    REASON_NOT_FOUND,
    REASON_NOT_ON_UNIT_BOUNDARY,
    Rejection,
    align_words,
    fold_text,
    text_view,
)
from knowfree_core.llm.parsing import REASON_EMPTY

REASON_DUPLICATE = "duplicate"
# The tag given to segmentation words that fill the gaps of a POS answer (UD's "other").
REPAIR_POS = "X"


class AlignedEntity(NamedTuple):
    """An answer entity placed on units ``[start, end)``; ``index`` is its position in the
    answer's entity list."""

    start: int
    end: int
    label: str
    index: int


class EntityAlignment(NamedTuple):
    spans: list[AlignedEntity]
    rejections: list[Rejection]


def align_entities(
    units: Sequence[str],
    joiner: str,
    entities: Sequence[tuple[str, str]],
    mode: Literal["all", "first"] = "all",
) -> EntityAlignment:
    """Spans for ``entities`` ((text, type) pairs) on ``units`` joined by ``joiner``.

    ``mode="all"`` marks every non-overlapping occurrence of each entity text; ``"first"``
    only the first occurrence that lies on unit boundaries. Spans come in answer order. An
    entity is rejected (one rejection per entity) when its text or type is empty, its text is
    not in the sentence, every occurrence splits a unit, or all its spans were already
    produced with the same type (the answer listed it twice).
    """
    if mode not in ("all", "first"):
        raise ValueError(f"mode must be 'all' or 'first', got {mode!r}")
    view = text_view(units, joiner)
    spans: list[AlignedEntity] = []
    rejections: list[Rejection] = []
    seen: set[tuple[int, int, str]] = set()
    for index, (entity, entity_type) in enumerate(entities):
        label = str(entity_type).strip()
        needle = fold_text(entity)
        if not needle or not label:
            rejections.append(Rejection(REASON_EMPTY, f"entity #{index} {entity!r} ({entity_type!r}) has an empty text or type"))
            continue
        placed = split = duplicates = 0
        found = view.compact.find(needle)
        while found >= 0:
            units_covered = view.unit_span(*view.char_span(found, len(needle)))
            if units_covered is None:
                split += 1
                # A partial-unit match ("York" in "Yorkshire") may overlap a real one.
                found = view.compact.find(needle, found + 1)
                continue
            key = (units_covered[0], units_covered[1], label)
            if key in seen:
                duplicates += 1
            else:
                seen.add(key)
                spans.append(AlignedEntity(units_covered[0], units_covered[1], label, index))
                placed += 1
            if mode == "first":
                break
            found = view.compact.find(needle, found + len(needle))
        if placed:
            continue
        if duplicates:
            rejections.append(Rejection(REASON_DUPLICATE, f"entity #{index} {entity!r} ({label}) was already placed"))
        elif split:
            rejections.append(
                Rejection(REASON_NOT_ON_UNIT_BOUNDARY, f"entity #{index} {entity!r} splits a unit wherever it occurs ({split}x)")
            )
        else:
            rejections.append(Rejection(REASON_NOT_FOUND, f"entity #{index} {entity!r} is not in the text"))
    return EntityAlignment(spans, rejections)


class PosSpan(NamedTuple):
    """A word on units ``[start, end)`` with its POS tag; ``repaired`` marks a segmentation
    word added where the POS answer left units uncovered."""

    start: int
    end: int
    pos: str
    repaired: bool = False


@dataclass
class PosAlignment:
    """Aligned POS words (answer words and repairs, by position), how many segmentation
    words were added, how many non-space units are still uncovered, and what was rejected
    (details say whether a POS or a segmentation word)."""

    spans: list[PosSpan] = field(default_factory=list)
    repaired: int = 0
    uncovered: int = 0
    rejections: list[Rejection] = field(default_factory=list)


def align_pos_with_repair(
    units: Sequence[str],
    joiner: str,
    seg_words: Sequence[str],
    pos_pairs: Sequence[tuple[str, str]],
) -> PosAlignment:
    """Align the (word, pos) answer in order, then cover the units it missed with the
    segmentation words that cover them, tagged :data:`REPAIR_POS`.

    A segmentation word is added whole even when it overlaps an answer word: the spans are
    extension labels of a span model, where overlap is allowed, and cutting the word would
    invent a boundary that neither answer gave.
    """
    result = PosAlignment()
    pos_alignment = align_words(units, [word for word, _ in pos_pairs], joiner)
    covered = [False] * len(units)
    for aligned in pos_alignment.words:
        tag = str(pos_pairs[aligned.index][1]).strip() or REPAIR_POS
        result.spans.append(PosSpan(aligned.start, aligned.end, tag))
        covered[aligned.start : aligned.end] = [True] * (aligned.end - aligned.start)
    result.rejections.extend(Rejection(r.reason, f"pos: {r.detail}") for r in pos_alignment.rejections)

    seg_alignment = align_words(units, list(seg_words), joiner)
    result.rejections.extend(Rejection(r.reason, f"seg: {r.detail}") for r in seg_alignment.rejections)
    for aligned in seg_alignment.words:
        if all(covered[aligned.start : aligned.end]):
            continue
        result.spans.append(PosSpan(aligned.start, aligned.end, REPAIR_POS, repaired=True))
        result.repaired += 1
        covered[aligned.start : aligned.end] = [True] * (aligned.end - aligned.start)
    # Whitespace-only units carry nothing to tag; only content left bare is worth reporting.
    result.uncovered = sum(1 for unit, done in zip(units, covered) if not done and unit.strip())
    result.spans.sort(key=lambda span: (span.start, span.end))
    return result
