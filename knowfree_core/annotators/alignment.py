"""Map a tool's word sequence back to unit offsets of a sentence.

Tools see ``sentence.text`` and answer with words, but the model works in *units*
(characters for Chinese, whitespace tokens for English). The tools may return
whitespace as words, glue whitespace to a word, normalise full-width characters, or
drop characters. So instead of summing word lengths (one slip shifts every later span)
we walk through the text with a cursor and search each word at or after it.

Matching ignores whitespace on both sides and compares characters after a light,
length-preserving fold (NFKC when it maps one character to one character, then
casefold). A word that cannot be found, or that covers part of a unit, is rejected
with a reason; alignment never raises on odd input and never produces a span outside
the sentence.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

# Rejection reasons are constants so that callers and reports can count them by kind.
REASON_NOT_FOUND = "not found"
REASON_NOT_ON_UNIT_BOUNDARY = "not on unit boundary"
REASON_TOOL_ERROR = "tool error"
#: A sentence longer than an annotator (or the annotation job) accepts: passed through
#: unannotated. One spelling for all, so that summaries count them together.
REASON_TOO_LONG = "sentence too long"


class Rejection(NamedTuple):
    """Why a piece of annotator output was not turned into a span.

    ``step`` (ent/seg/pos) is filled in by annotators that run several steps, so job
    summaries can count rejections per step and reason.
    """

    reason: str
    detail: str
    step: str = ""


@dataclass(frozen=True)
class AlignedWord:
    """A tool word placed on the sentence: units ``[start, end)``; ``index`` is its
    position in the tool's word list (to look its tag up again)."""

    start: int
    end: int
    index: int


@dataclass
class Alignment:
    words: list[AlignedWord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


def fold_char(char: str) -> str:
    """Fold one character for matching, always to exactly one character.

    Length must be preserved so that positions in the folded text are positions in the
    original text; NFKC results longer than one character (e.g. "㎏") are not used.
    """
    normal = unicodedata.normalize("NFKC", char)
    if len(normal) != 1:
        normal = char
    folded = normal.casefold()
    return folded if len(folded) == 1 else normal


def fold_text(text: str) -> str:
    """``text`` as it is matched against a :class:`TextView`: whitespace removed and every
    character folded with :func:`fold_char`."""
    return "".join(fold_char(c) for c in str(text) if not c.isspace())


@dataclass(frozen=True)
class TextView:
    """The sentence text without whitespace, folded, with a map back to text offsets,
    plus the unit boundaries expressed as text offsets."""

    compact: str
    offsets: list[int]  # compact index -> char offset in the text
    unit_at_start: dict[int, int]  # char offset of a unit's first non-space char -> unit
    unit_at_end: dict[int, int]  # char offset just after a unit's last non-space char -> unit + 1

    def char_span(self, found: int, length: int) -> tuple[int, int]:
        """Text offsets ``[start, end)`` of the compact match ``[found, found + length)``."""
        return self.offsets[found], self.offsets[found + length - 1] + 1

    def unit_span(self, char_start: int, char_end: int) -> tuple[int, int] | None:
        """Units ``[start, end)`` exactly covering text ``[char_start, char_end)``, or None
        when the match starts or ends inside a unit."""
        start = self.unit_at_start.get(char_start)
        end = self.unit_at_end.get(char_end)
        if start is None or end is None or end <= start:
            return None
        return start, end


def text_view(units: Sequence[str], joiner: str) -> TextView:
    chars: list[str] = []
    offsets: list[int] = []
    unit_at_start: dict[int, int] = {}
    unit_at_end: dict[int, int] = {}
    position = 0
    for index, unit in enumerate(units):
        if index:
            position += len(joiner)
        content = [i for i, c in enumerate(unit) if not c.isspace()]
        if content:
            # Boundaries sit on the unit's content so a word that the tool trimmed of
            # surrounding whitespace still lands on whole units.
            unit_at_start[position + content[0]] = index
            unit_at_end[position + content[-1] + 1] = index + 1
            for i in content:
                chars.append(fold_char(unit[i]))
                offsets.append(position + i)
        position += len(unit)
    return TextView("".join(chars), offsets, unit_at_start, unit_at_end)


def align_words(
    units: Sequence[str],
    words: Sequence[str],
    joiner: str = "",
    max_skip: int | None = None,
) -> Alignment:
    """Place each of ``words`` on ``units`` (joined by ``joiner``), in order.

    Whitespace-only words are ignored (they carry no unit). ``max_skip`` limits how many
    non-space characters may lie between the cursor and a match; ``None`` searches to the
    end, which suits tools that return words in text order (LAC, jieba). A rejected
    word does not move the cursor, so one bad word does not lose the rest.
    """
    view = text_view(units, joiner)
    result = Alignment()
    cursor = 0  # in compact characters
    for index, word in enumerate(words):
        needle = fold_text(word)
        if not needle:
            continue
        found = view.compact.find(needle, cursor)
        if found < 0 or (max_skip is not None and found - cursor > max_skip):
            result.rejections.append(
                Rejection(REASON_NOT_FOUND, f"word {word!r} (#{index}) not in text after char {_char_at(view, cursor)}")
            )
            continue
        char_start, char_end = view.char_span(found, len(needle))
        # The text was consumed either way: a later word cannot sit inside this one.
        cursor = found + len(needle)
        units_covered = view.unit_span(char_start, char_end)
        if units_covered is None:
            result.rejections.append(
                Rejection(
                    REASON_NOT_ON_UNIT_BOUNDARY,
                    f"word {word!r} (#{index}) covers chars {char_start}..{char_end} which split a unit",
                )
            )
            continue
        result.words.append(AlignedWord(units_covered[0], units_covered[1], index))
    return result


def _char_at(view: TextView, cursor: int) -> int:
    """Text offset of the compact cursor, for messages."""
    if cursor < len(view.offsets):
        return view.offsets[cursor]
    return view.offsets[-1] + 1 if view.offsets else 0
