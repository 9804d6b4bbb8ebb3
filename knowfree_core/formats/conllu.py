"""CoNLL-U (Universal Dependencies) as word segmentation or POS spans.

Every FORM becomes one span: label ``W`` for the segmentation view (``task="seg"``), its
UPOS for the POS view (``task="pos"``). The other view can be added as extension spans
(source ``ud:seg`` / ``ud:pos``). Multiword-token ranges (``1-2``) and empty nodes (``1.1``)
are skipped: the syntactic words are what is segmented and tagged.

Units are characters (joiner "") for languages written without spaces, FORMs (joiner " ")
otherwise; by default the file decides: character level when most tokens carry
``SpaceAfter=No``, as in Chinese and Japanese treebanks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from knowfree_core.errors import DataFormatError
from knowfree_core.formats._io import read_lines, write_text
from knowfree_core.formats.tagging import ReadReport, joiner_for
from knowfree_core.records import ExtensionSpan, Sentence, Span

SEG_LABEL = "W"
SOURCES = {"seg": "ud:seg", "pos": "ud:pos"}
TASKS = ("seg", "pos")
_COLUMNS = "10 TAB-separated columns ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC"


@dataclass
class _Word:
    form: str
    upos: str
    space_after: bool
    line: int


@dataclass
class _Block:
    words: list[_Word] = field(default_factory=list)
    id: str | None = None
    first_line: int = 0


def _read_blocks(path: str, report: ReadReport) -> list[_Block]:
    blocks: list[_Block] = []
    current = _Block()
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            if current.words:
                blocks.append(current)
            current = _Block()
            continue
        if line.startswith("#"):
            key, sep, value = line[1:].partition("=")
            if sep and key.strip() == "sent_id":
                current.id = value.strip()
            continue
        columns = line.split("\t")
        if len(columns) != 10:
            raise DataFormatError(path, number, f"{len(columns)} column(s) in {line!r}", _COLUMNS)
        word_id = columns[0]
        if "-" in word_id or "." in word_id:
            report.skipped_lines += 1  # multiword-token range or empty node
            continue
        if not word_id.isdigit():
            raise DataFormatError(path, number, f"ID {word_id!r} is not a number", "1, 2, ... or a range 1-2")
        form = columns[1]
        if not form:
            raise DataFormatError(path, number, "empty FORM", _COLUMNS)
        if not current.words:
            current.first_line = number
        space_after = "SpaceAfter=No" not in columns[9].split("|")
        current.words.append(_Word(form, columns[3], space_after, number))
    if current.words:
        blocks.append(current)
    return blocks


def _extension_views(task: str, extensions: bool | str | Iterable[str]) -> list[str]:
    if extensions is True:
        return [view for view in TASKS if view != task]
    if extensions is False or extensions is None:
        return []
    views = [extensions] if isinstance(extensions, str) else list(extensions)
    for view in views:
        if view not in TASKS:
            raise ValueError(f"unknown CoNLL-U view {view!r}; expected one of {TASKS}")
    return [view for view in views if view != task]


def _label(word: _Word, view: str, path: str) -> str:
    if view == "seg":
        return SEG_LABEL
    if word.upos in ("", "_"):
        raise DataFormatError(path, word.line, f"no UPOS for {word.form!r}", "a UPOS tag in column 4 for task='pos'")
    return word.upos



def read_conllu(
    path: str | Path,
    *,
    task: str = "seg",
    extensions: bool | str | Iterable[str] = False,
    level: str | None = None,
    report: ReadReport | None = None,
) -> list[Sentence]:
    """Read a CoNLL-U file as segmentation (``task="seg"``) or POS (``task="pos"``) spans.

    extensions: True adds the other view as ExtensionSpans (source ``ud:seg``/``ud:pos``);
        a view name or list of names picks them explicitly.
    level: "char" or "token"; None decides from SpaceAfter=No (see the module docstring).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if level not in (None, "char", "token"):
        raise ValueError(f"level must be 'char' or 'token', not {level!r}")
    path = str(path)
    report = report if report is not None else ReadReport()
    report.path, report.format = path, "conllu"
    views = _extension_views(task, extensions)
    blocks = _read_blocks(path, report)
    if level is None:
        words = [w for b in blocks for w in b.words]
        glued = sum(not w.space_after for w in words)
        level = "char" if words and glued * 2 > len(words) else "token"
    report.level = level

    sentences = []
    for index, block in enumerate(blocks):
        units: list[str] = []
        bounds: list[tuple[int, int]] = []
        for word in block.words:
            pieces = list(word.form) if level == "char" else [word.form]
            bounds.append((len(units), len(units) + len(pieces)))
            units.extend(pieces)
        spans = [Span(s, e, _label(w, task, path)) for (s, e), w in zip(bounds, block.words)]
        extension_spans = [
            ExtensionSpan(s, e, _label(w, view, path), SOURCES[view])
            for view in views
            for (s, e), w in zip(bounds, block.words)
        ]
        sentence_id = block.id if block.id else f"{Path(path).stem}-{index}"
        sentences.append(Sentence(sentence_id, units, spans, extension_spans, joiner=joiner_for(level)))
    return report.counted(sentences)


def _tiling(sentence: Sentence) -> list[Span]:
    spans = sorted(sentence.spans)
    position = 0
    for span in spans:
        if span.start != position or span.end <= span.start:
            break
        position = span.end
    else:
        if position == len(sentence):
            return spans
    raise ValueError(
        f"sentence {sentence.id!r}: spans do not tile the text, so they cannot be written as "
        "CoNLL-U words (one FORM per span, covering every unit)"
    )


def write_conllu(sentences: Iterable[Sentence], path: str | Path, *, task: str | None = None) -> None:
    """Write sentences whose spans tile the text as CoNLL-U, one FORM per span.

    task: "pos" writes span labels as UPOS; "seg" writes UPOS from ``ud:pos`` extension
        spans with the same boundaries, else "_". None: "seg" when every label is ``W``.
    Columns other than ID, FORM, UPOS and MISC (SpaceAfter=No for character-level
    sentences) are "_".
    """
    sentences = list(sentences)
    if task is None:
        task = "seg" if all(s.label == SEG_LABEL for x in sentences for s in x.spans) else "pos"
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    lines: list[str] = []
    for sentence in sentences:
        if "\n" in sentence.id:
            raise ValueError(f"sentence id {sentence.id!r} contains a newline")
        words = _tiling(sentence)
        pos = {(e.start, e.end): e.label for e in sentence.extension_spans if e.source == SOURCES["pos"]}
        lines.append(f"# sent_id = {sentence.id}")
        lines.append(f"# text = {sentence.text}")
        misc = "SpaceAfter=No" if sentence.joiner == "" else "_"
        for number, span in enumerate(words, start=1):
            form = sentence.span_text(span)
            if any(c in form for c in "\t\n\r") or (sentence.joiner and " " in form):
                raise ValueError(f"sentence {sentence.id!r}: FORM {form!r} cannot be written to CoNLL-U")
            upos = span.label if task == "pos" else pos.get((span.start, span.end), "_")
            lines.append("\t".join([str(number), form, "_", upos, "_", "_", "_", "_", "_", misc]))
        lines.append("")
    write_text(path, lines)
