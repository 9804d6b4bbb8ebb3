"""Tag schemes (BIO, BIOES, BMES): tags -> spans, spans -> tags, scheme detection.

All three schemes are decoded by one state machine, because they only differ in the letter
used for "inside" (I vs M) and in whether a span must be closed explicitly (E-/S-).

Broken sequences (``I-X`` without ``B-X``, a type change inside a span, ``E-X`` without
``B-X``, a BIOES span never closed by ``E-``) are *repairs*: in strict mode they raise a
DataFormatError pointing at the file and line, otherwise they are repaired the usual way
(an orphan ``I-X``/``M-X``/``E-X`` starts a new span) and counted in a ReadReport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from knowfree_core.errors import DataFormatError
from knowfree_core.records import Sentence, Span

SCHEMES = ("BIO", "BIOES", "BMES")

# Spellings users commonly write for the same scheme.
_ALIASES = {
    "BIO": "BIO",
    "IOB": "BIO",
    "IOB2": "BIO",
    "BIOES": "BIOES",
    "IOBES": "BIOES",
    "BMES": "BMES",
    "BMESO": "BMES",
    "BMEOS": "BMES",
}

_PREFIXES = {"BIO": {"B", "I"}, "BIOES": {"B", "I", "E", "S"}, "BMES": {"B", "M", "E", "S"}}

# "B-PER", "B_PER" or a bare "B" (segmentation-style BMES without a type).
_TAG = re.compile(r"^([BIMES])(?:[-_](.+))?$")

DEFAULT_UNTYPED_LABEL = "W"
_MAX_EXAMPLES = 5


def joiner_for(level: str) -> str:
    """``Sentence.joiner`` of a file read at ``level``: characters join without spaces."""
    return "" if level == "char" else " "


@dataclass
class ReadReport:
    """What a reader saw and fixed in one file, so callers can tell users about it."""

    path: str = ""
    format: str = ""
    scheme: str | None = None
    level: str | None = None
    sentences: int = 0
    spans: int = 0
    repairs: int = 0
    repair_examples: list[str] = field(default_factory=list)
    skipped_lines: int = 0  # -DOCSTART-, comments, multiword tokens, empty nodes
    position_digits_stripped: bool = False
    position_digit_anomalies: int = 0
    #: Records without a single unit (JSONL ``"text": ""``): nothing to learn or score, and a
    #: zero-length grid breaks batching, so readers drop them and count them here.
    empty_sentences: int = 0
    empty_examples: list[str] = field(default_factory=list)

    def counted(self, sentences: list[Sentence]) -> list[Sentence]:
        """``sentences``, after counting them and their spans: what every reader ends with."""
        self.sentences = len(sentences)
        self.spans = sum(len(s.spans) for s in sentences)
        return sentences

    def note_repair(self, where: str, problem: str) -> None:
        self.repairs += 1
        if len(self.repair_examples) < _MAX_EXAMPLES:
            self.repair_examples.append(f"{where}: {problem}")

    def summary(self) -> str:
        text = f"{self.path}: {self.sentences} sentences, {self.spans} spans"
        if self.scheme:
            text += f", scheme {self.scheme}"
        if self.repairs:
            text += f", {self.repairs} broken tag sequence(s) repaired (e.g. {self.repair_examples[0]})"
        if self.position_digit_anomalies:
            text += f", {self.position_digit_anomalies} unexpected position digit(s)"
        if self.empty_sentences:
            text += f", {self.empty_sentences} empty sentence(s) skipped (e.g. {self.empty_examples[0]})"
        return text


def normalize_scheme(name: str) -> str:
    """Map a user-written scheme name (case-insensitive, IOBES etc.) to BIO/BIOES/BMES."""
    key = name.upper().replace("-", "").replace("_", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown tag scheme {name!r}; expected one of {', '.join(SCHEMES)} (or IOB2/IOBES)")
    return _ALIASES[key]


def split_tag(tag: str, untyped_label: str = DEFAULT_UNTYPED_LABEL) -> tuple[str, str | None]:
    """Split ``B-PER`` into ``("B", "PER")``; ``O`` gives ``("O", None)``.

    Raises ValueError for a tag that follows none of the schemes.
    """
    if tag == "O":
        return "O", None
    match = _TAG.match(tag)
    if match is None:
        raise ValueError(f"tag {tag!r} is not O or PREFIX-TYPE with PREFIX in B/I/M/E/S")
    return match.group(1), match.group(2) or untyped_label


def detect_scheme(tags: Iterable[str]) -> str:
    """Guess the scheme from the set of prefixes used.

    M means BMES; E or S with I (or without any inside letter) means BIOES; only B/I means BIO.
    """
    prefixes = set()
    for tag in tags:
        prefix, _ = split_tag(tag)
        prefixes.add(prefix)
    if "M" in prefixes and "I" in prefixes:
        raise ValueError("tags mix I- (BIO/BIOES) and M- (BMES) prefixes; pass the scheme explicitly")
    if "M" in prefixes:
        return "BMES"
    if prefixes & {"E", "S"}:
        return "BIOES"
    return "BIO"


def tags_to_spans(
    tags: Sequence[str],
    scheme: str | None = None,
    *,
    strict: bool = False,
    report: ReadReport | None = None,
    path: str = "<tags>",
    lines: Sequence[int] | None = None,
    untyped_label: str = DEFAULT_UNTYPED_LABEL,
) -> list[Span]:
    """Decode one sentence's tags into spans (unit offsets, end exclusive).

    ``lines`` gives the 1-based file line of each tag so errors and repairs can point there.
    """

    def line_of(i: int) -> int | None:
        if lines is None:
            return None
        return lines[min(i, len(lines) - 1)] if lines else None

    parsed: list[tuple[str, str | None]] = []
    for i, tag in enumerate(tags):
        try:
            parsed.append(split_tag(tag, untyped_label))
        except ValueError as err:
            raise DataFormatError(path, line_of(i), str(err), "a tag like O, B-PER, I-PER") from None

    if scheme is None:
        try:
            scheme = detect_scheme(tags)
        except ValueError as err:
            raise DataFormatError(path, line_of(0), str(err)) from None
    scheme = normalize_scheme(scheme)
    allowed = _PREFIXES[scheme]
    inside = "M" if scheme == "BMES" else "I"
    # Only BIOES/BMES close spans explicitly; in BIO an O or a B legitimately ends a span.
    needs_close = scheme != "BIO"

    def repair(i: int, problem: str, expected: str) -> None:
        if strict:
            raise DataFormatError(path, line_of(i), problem, expected)
        if report is not None:
            line = line_of(i)
            report.note_repair(f"{path}:{line}" if line is not None else path, problem)

    spans: list[Span] = []
    start: int | None = None
    kind: str | None = None

    def close(end: int) -> None:
        nonlocal start, kind
        if start is not None and kind is not None:
            spans.append(Span(start, end, kind))
        start, kind = None, None

    for i, (prefix, label) in enumerate(parsed):
        if prefix != "O" and prefix not in allowed:
            raise DataFormatError(
                path, line_of(i), f"tag {tags[i]!r} is not valid in the {scheme} scheme",
                f"prefixes {'/'.join(sorted(allowed))} or O",
            )
        if prefix == "O":
            if start is not None and needs_close:
                repair(i, f"{kind} span not closed by E-{kind} before O", f"E-{kind} or S-{kind}")
            close(i)
        elif prefix == "B":
            if start is not None and needs_close:
                repair(i, f"{kind} span not closed by E-{kind} before {tags[i]}", f"E-{kind} or S-{kind}")
            close(i)
            start, kind = i, label
        elif prefix in (inside, "E"):
            # Repaired by starting a span here: one that never began, or that changes type.
            if start is None:
                repair(i, f"{tags[i]} without a preceding B-{label}", f"B-{label} before {tags[i]}")
                start, kind = i, label
            elif kind != label:
                expected = f"E-{kind}" if prefix == "E" else f"{inside}-{kind} or B-{label}"
                repair(i, f"type changes from {kind} to {label} inside a span", expected)
                close(i)
                start, kind = i, label
            if prefix == "E":
                close(i + 1)
        else:  # S
            if start is not None and needs_close:
                repair(i, f"{kind} span not closed by E-{kind} before {tags[i]}", f"E-{kind}")
            close(i)
            spans.append(Span(i, i + 1, label or untyped_label))
    if start is not None and needs_close:
        repair(len(parsed) - 1, f"{kind} span not closed by E-{kind} at the end of the sentence", f"E-{kind}")
    close(len(parsed))
    return spans


def spans_to_tags(spans: Iterable[Span], length: int, scheme: str = "BIO") -> list[str]:
    """Encode non-overlapping spans as tags; raises ValueError for overlapping or out-of-range spans."""
    scheme = normalize_scheme(scheme)
    inside = "M" if scheme == "BMES" else "I"
    tags = ["O"] * length
    covered_until = 0
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        if not (0 <= span.start < span.end <= length):
            raise ValueError(f"span {span} outside 0..{length} or empty")
        if span.start < covered_until:
            raise ValueError(f"span {span} overlaps another span; tag schemes cannot encode nested spans")
        covered_until = span.end
        if scheme == "BIO":
            tags[span.start] = f"B-{span.label}"
            for i in range(span.start + 1, span.end):
                tags[i] = f"I-{span.label}"
        elif span.end - span.start == 1:
            tags[span.start] = f"S-{span.label}"
        else:
            tags[span.start] = f"B-{span.label}"
            for i in range(span.start + 1, span.end - 1):
                tags[i] = f"{inside}-{span.label}"
            tags[span.end - 1] = f"E-{span.label}"
    return tags


def convert_tags(tags: Sequence[str], target: str, source: str | None = None) -> list[str]:
    """Re-encode one sentence's tags in another scheme (lenient decoding of the source)."""
    return spans_to_tags(tags_to_spans(tags, source), len(tags), target)
