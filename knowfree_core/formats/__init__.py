"""Reading and writing datasets: JSON Lines, character/token CoNLL and CoNLL-U.

``read_dataset`` picks the format from the file extension (or the content when the
extension says nothing) and passes the remaining keyword options to that format's reader,
so a config can say ``read_options: {task: pos}`` without knowing which function runs.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from knowfree_core.errors import ConfigError
from knowfree_core.formats._io import read_lines
from knowfree_core.formats.conll import read_conll, write_conll
from knowfree_core.formats.conllu import read_conllu, write_conllu
from knowfree_core.formats.jsonl import read_jsonl, write_jsonl
from knowfree_core.formats.tagging import (
    SCHEMES,
    ReadReport,
    convert_tags,
    detect_scheme,
    spans_to_tags,
    tags_to_spans,
)
from knowfree_core.records import Sentence

__all__ = [
    "FORMATS",
    "SCHEMES",
    "ReadReport",
    "convert_tags",
    "detect_format",
    "detect_scheme",
    "read_conll",
    "read_conllu",
    "read_dataset",
    "read_dataset_with_report",
    "read_jsonl",
    "spans_to_tags",
    "tags_to_spans",
    "write_conll",
    "write_conllu",
    "write_dataset",
    "write_jsonl",
]

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "conll", "conllu")

_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".conllu": "conllu",
    ".conll": "conll",
    ".bio": "conll",
    ".bmes": "conll",
    ".bioes": "conll",
    ".iobes": "conll",
    ".txt": "conll",
    ".tsv": "conll",
}
# Format names a user may write; the level-specific ones preset the CoNLL level.
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "jsonl": ("jsonl", {}),
    "json": ("jsonl", {}),
    "conllu": ("conllu", {}),
    "conll": ("conll", {}),
    "char_conll": ("conll", {"level": "char"}),
    "token_conll": ("conll", {"level": "token"}),
}
_READERS: dict[str, Callable[..., list[Sentence]]] = {
    "jsonl": read_jsonl,
    "conll": read_conll,
    "conllu": read_conllu,
}
_WRITERS: dict[str, Callable[..., None]] = {
    "jsonl": write_jsonl,
    "conll": write_conll,
    "conllu": write_conllu,
}


def _sniff(path: Path) -> str:
    # Only the first non-blank lines matter; read_lines also reports bad encodings early.
    for line in read_lines(path)[:50]:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(("{", "[")):
            return "jsonl"
        if stripped.startswith(("# sent_id", "# text", "# newdoc", "# newpar")):
            return "conllu"
        columns = line.split("\t")
        if len(columns) == 10 and columns[0].replace("-", "").replace(".", "").isdigit():
            return "conllu"
        if not stripped.startswith("#"):
            return "conll"
    return "conll"


def detect_format(path: str | Path) -> str:
    """"jsonl", "conll" or "conllu", from the extension or, failing that, the content."""
    path = Path(path)
    by_suffix = _BY_SUFFIX.get(path.suffix.lower())
    return by_suffix if by_suffix else _sniff(path)


def _resolve(path: str | Path, format: str | None, options: dict[str, Any], for_writing: bool) -> tuple[str, dict]:
    if format is None:
        name = _BY_SUFFIX.get(Path(path).suffix.lower()) if for_writing else detect_format(path)
        if name is None:
            raise ConfigError(f"cannot tell the format of {path} from its extension; pass format= ({', '.join(FORMATS)})")
        preset: dict[str, Any] = {}
    else:
        key = format.lower().replace("-", "_")
        if key not in _ALIASES:
            raise ConfigError(f"unknown data format {format!r}; expected one of {', '.join(_ALIASES)}")
        name, preset = _ALIASES[key]
    if for_writing:
        preset = {k: v for k, v in preset.items() if k != "level"}  # the sentences' joiner decides
    return name, {**preset, **options}


def _check_options(function: Callable, options: dict[str, Any], format: str) -> None:
    # ``report`` is filled in by read_dataset_with_report itself, so it is not a user option.
    accepted = [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "report"
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} not understood by the {format} format; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )


def read_dataset_with_report(
    path: str | Path, format: str | None = None, **options: Any
) -> tuple[list[Sentence], ReadReport]:
    """Like ``read_dataset`` but also returns what the reader counted and repaired."""
    name, options = _resolve(path, format, options, for_writing=False)
    reader = _READERS[name]
    _check_options(reader, options, name)
    report = ReadReport()
    sentences = reader(path, report=report, **options)
    if report.repairs or report.position_digit_anomalies or report.empty_sentences:
        logger.warning("%s", report.summary())
    return sentences, report


def read_dataset(path: str | Path, format: str | None = None, **options: Any) -> list[Sentence]:
    """Read a dataset file as sentences.

    format: "jsonl", "conll" ("char_conll"/"token_conll" preset the level), "conllu", or None
        to decide from the extension (.jsonl/.json, .conllu, .conll/.bio/.bmes/.txt) or content.
    options: passed to the format's reader, e.g. ``level``, ``scheme``, ``strict``,
        ``strip_position_digit``, ``position_digits_as_segmentation`` (CoNLL); ``task``,
        ``extensions`` (CoNLL-U). Repaired tag sequences are logged as a warning.
    """
    return read_dataset_with_report(path, format, **options)[0]


def write_dataset(sentences: Iterable[Sentence], path: str | Path, format: str | None = None, **options: Any) -> None:
    """Write sentences in a format the readers read back as the same sentences.

    CoNLL and CoNLL-U cannot hold extension spans (except Weibo position digits and the
    CoNLL-U views) or the synthetic flag; use jsonl to keep everything.
    """
    name, options = _resolve(path, format, options, for_writing=True)
    writer = _WRITERS[name]
    _check_options(writer, options, name)
    writer(list(sentences), path, **options)
