"""CoNLL-style column files: character CoNLL (Chinese) and token CoNLL (English).

Character CoNLL: one character per line, ``CHAR<TAB or space>TAG``, a blank line between
sentences. Token CoNLL: the token in the first column, the tag in the *last* column
(CoNLL-2003 keeps POS/chunk columns in between), ``-DOCSTART-`` lines skipped.

Weibo NER glues a jieba word-position number after each character (``科0\\tO``: 0 starts a
word, 1, 2, ... continue it). The reader strips it (auto-detected) and can turn it into
free word segmentation (``ExtensionSpan`` label ``SEG``, source ``weibo:seg``).

A line ``# id = X`` (or ``# sent_id = X``) before a sentence gives its id; otherwise ids
are ``<file stem>-<index>`` with a 0-based index.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from knowfree_core.errors import DataFormatError
from knowfree_core.formats._io import read_lines, write_text
from knowfree_core.formats.tagging import (
    DEFAULT_UNTYPED_LABEL,
    ReadReport,
    detect_scheme,
    joiner_for,
    spans_to_tags,
    tags_to_spans,
)
from knowfree_core.records import ExtensionSpan, Sentence

logger = logging.getLogger(__name__)

SEG_LABEL = "SEG"
SEG_SOURCE = "weibo:seg"
DOCSTART = "-DOCSTART-"
LEVELS = ("char", "token")

_ID_COMMENT = re.compile(r"^# (?:sent_)?id = (.*)$")
_POSITION = re.compile(r"^(0|[1-9][0-9]*)$")
# Share of first columns that must be a single character for a file to be read as
# character CoNLL. Not 100%: real character files contain a few multi-character units
# (Weibo has "\ufffd\ufffd", a broken emoji), and English has far fewer one-letter tokens.
_CHAR_LEVEL_SHARE = 0.9
# Blanks that pad columns; other Unicode spaces (U+3000, U+00A0, ...) can be units.
_ASCII_BLANKS = " \t\r\f\v"


@dataclass
class _Row:
    unit: str
    tag: str
    line: int
    position: int | None = None


@dataclass
class _Block:
    rows: list[_Row] = field(default_factory=list)
    id: str | None = None


def default_id(path: str | Path, index: int) -> str:
    return f"{Path(path).stem}-{index}"


def _split_columns(line: str, path: str, number: int, level: str | None) -> tuple[str, str]:
    # A tab separates columns when present (so a unit may even be a space); otherwise runs
    # of ASCII spaces do, as in CoNLL-2003. Only ASCII blanks separate: public Chinese
    # corpora have lines whose *character* is an ideographic (U+3000) or no-break (U+00A0)
    # space, which str.split() would swallow, leaving one column.
    columns = line.split("\t") if "\t" in line else [c for c in line.split(" ") if c]
    expected = "TOKEN ... TAG" if level == "token" else "CHAR<TAB>TAG"
    if len(columns) < 2:
        raise DataFormatError(path, number, f"missing column in {line!r}", expected)
    unit, tag = columns[0], columns[-1].strip()
    # Stray ASCII blanks around a tab-separated unit are padding; a unit made only of blanks
    # (or of non-ASCII spaces) is itself the character.
    unit = unit.strip(_ASCII_BLANKS) or unit
    if not unit or not tag:
        raise DataFormatError(path, number, f"empty column in {line!r}", expected)
    return unit, tag


def _read_blocks(path: str, lines: list[str], level: str | None, report: ReadReport) -> list[_Block]:
    blocks: list[_Block] = []
    current = _Block()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            if current.rows:
                blocks.append(current)
                current = _Block()
            continue
        match = _ID_COMMENT.match(line)
        if match:
            if current.rows:  # an id comment with no blank line before it still starts a sentence
                blocks.append(current)
                current = _Block()
            current.id = match.group(1).strip()
            report.skipped_lines += 1
            continue
        if line.split()[0] == DOCSTART:
            report.skipped_lines += 1
            continue
        unit, tag = _split_columns(line, path, number, level)
        current.rows.append(_Row(unit, tag, number))
    if current.rows:
        blocks.append(current)
    return blocks


def looks_like_position_digits(units: Iterable[str]) -> bool:
    """True for Weibo-like files: every first column is a unit followed by a position number.

    Most such columns are exactly two characters (a character and one digit); longer ones
    come from positions >= 10 inside long jieba words (URLs) and from multi-character units.
    """
    total = two = 0
    for unit in units:
        total += 1
        if len(unit) < 2 or not unit[-1].isdigit():
            return False
        two += len(unit) == 2
    return total > 0 and two >= 0.5 * total


def _strip_position(text: str, previous: int | None) -> tuple[str, int] | None:
    """Split ``科0``/``o11``/``011`` into unit and position, or None when nothing fits.

    The position is either 0 (a new word) or previous+1 (the same word continues); this
    disambiguates cases like ``011`` (the character ``0`` at position 11). Among the fitting
    splits the shortest unit wins, because units are almost always one character.
    """
    for cut in range(1, len(text)):
        digits = text[cut:]
        if _POSITION.match(digits):
            position = int(digits)
            if position == 0 or (previous is not None and position == previous + 1):
                return text[:cut], position
    return None


def _fallback_position(text: str) -> tuple[str, int]:
    # An out-of-sequence position (Weibo train has one jump 0 -> 2): keep the shortest unit.
    cut = len(text.rstrip("0123456789")) or 1
    return text[:cut], int(text[cut:])


def _apply_position_digits(block: _Block, path: str, report: ReadReport) -> None:
    previous: int | None = None
    for row in block.rows:
        if len(row.unit) < 2 or not row.unit[-1].isdigit():
            raise DataFormatError(
                path, row.line, f"{row.unit!r} has no word-position digit", "CHAR<digit><TAB>TAG as in Weibo NER"
            )
        split = _strip_position(row.unit, previous)
        if split is None:
            split = _fallback_position(row.unit)
            report.position_digit_anomalies += 1
        row.unit, row.position = split
        previous = row.position


def _segmentation(rows: list[_Row]) -> list[ExtensionSpan]:
    # A word starts at position 0 (and at the sentence start, whatever its digit says).
    starts = [i for i, row in enumerate(rows) if i == 0 or row.position == 0]
    ends = starts[1:] + [len(rows)]
    return [ExtensionSpan(s, e, SEG_LABEL, SEG_SOURCE) for s, e in zip(starts, ends)]


def read_conll(
    path: str | Path,
    *,
    level: str | None = None,
    scheme: str | None = None,
    strict: bool = False,
    strip_position_digit: bool | None = None,
    position_digits_as_segmentation: bool = False,
    untyped_label: str = DEFAULT_UNTYPED_LABEL,
    report: ReadReport | None = None,
) -> list[Sentence]:
    """Read a character or token CoNLL file.

    level: "char" (units are characters, joiner "") or "token" (joiner " "); None picks
        char when position digits are stripped or >= 90% of first columns are one character.
    scheme: BIO/BIOES(IOBES)/BMES; None detects it from the file's whole tag set.
    strict: raise on broken tag sequences instead of repairing and counting them.
    strip_position_digit: None auto-detects Weibo-style ``CHAR<digit>`` columns.
    position_digits_as_segmentation: add the jieba words given by the digits as
        ExtensionSpan(label "SEG", source "weibo:seg").
    """
    path = str(path)
    report = report if report is not None else ReadReport()
    report.path, report.format = path, "conll"
    if level is not None and level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    blocks = _read_blocks(path, read_lines(path), level, report)
    rows = [row for block in blocks for row in block.rows]

    if strip_position_digit is None:
        strip_position_digit = level != "token" and looks_like_position_digits(row.unit for row in rows)
    if strip_position_digit:
        for block in blocks:
            _apply_position_digits(block, path, report)
    report.position_digits_stripped = bool(strip_position_digit)

    if level is None:
        single = sum(len(row.unit) == 1 for row in rows)
        level = "char" if strip_position_digit or single >= _CHAR_LEVEL_SHARE * max(1, len(rows)) else "token"
    report.level = level

    if scheme is None and rows:
        # Detect once per file: a sentence with only B- tags must not be read as BIO while
        # the rest of the file is BIOES.
        try:
            scheme = detect_scheme({row.tag for row in rows})
        except ValueError as err:
            raise DataFormatError(path, rows[0].line, str(err)) from None
    report.scheme = scheme

    sentences = []
    for index, block in enumerate(blocks):
        spans = tags_to_spans(
            [row.tag for row in block.rows],
            scheme,
            strict=strict,
            report=report,
            path=path,
            lines=[row.line for row in block.rows],
            untyped_label=untyped_label,
        )
        extensions = _segmentation(block.rows) if strip_position_digit and position_digits_as_segmentation else []
        sentence_id = block.id if block.id is not None else default_id(path, index)
        units = [row.unit for row in block.rows]
        sentences.append(Sentence(sentence_id, units, spans, extensions, joiner=joiner_for(level)))
    return report.counted(sentences)


def _positions(sentence: Sentence) -> list[int]:
    positions = [0] * len(sentence)
    words = [e for e in sentence.extension_spans if e.label == SEG_LABEL]
    preferred = [e for e in words if e.source == SEG_SOURCE]
    for word in preferred or words:
        for offset, i in enumerate(range(word.start, word.end)):
            positions[i] = offset
    return positions


def write_conll(
    sentences: Iterable[Sentence],
    path: str | Path,
    *,
    scheme: str = "BIO",
    separator: str = "\t",
    write_ids: bool | None = None,
    position_digits: bool = False,
) -> None:
    """Write sentences one unit per line, ``UNIT<separator>TAG``, blank line between sentences.

    write_ids: True writes ``# id = ...`` before each sentence, False never; None (default)
        only where the id differs from the ``<stem>-<index>`` the reader would give it, so
        files with default ids stay plain CoNLL that any tool reads.
    position_digits: append Weibo-style word positions taken from the sentence's ``SEG``
        extension spans (each unit outside a word gets 0).
    Extension spans (other than SEG digits) cannot be stored in CoNLL and are dropped.
    """
    lines: list[str] = []
    dropped = 0
    for index, sentence in enumerate(sentences):
        if not sentence.units:
            raise ValueError(f"sentence {sentence.id!r} has no units; CoNLL cannot store an empty sentence")
        tags = spans_to_tags(sentence.spans, len(sentence), scheme)
        if write_ids or (write_ids is None and sentence.id != default_id(path, index)):
            lines.append(f"# id = {sentence.id}")
        positions = _positions(sentence) if position_digits else None
        dropped += len(sentence.extension_spans) if not position_digits else 0
        for i, (unit, tag) in enumerate(zip(sentence.units, tags)):
            # Only ASCII blanks separate columns on reading, so only they cannot sit in a unit.
            if not unit or any(c in unit for c in "\t\n\r") or (separator != "\t" and " " in unit):
                raise ValueError(f"sentence {sentence.id!r}: unit {unit!r} cannot be written to a CoNLL column")
            column = f"{unit}{positions[i]}" if positions is not None else unit
            lines.append(f"{column}{separator}{tag}")
        lines.append("")
    if dropped:
        logger.warning("%s: %d extension span(s) not written (CoNLL has no column for them; use jsonl)", path, dropped)
    write_text(path, lines)
