"""JSON Lines: one ``Sentence.to_dict()`` object per line, the library's native format.

It is the only format that keeps everything (extension spans with their sources, the
synthetic flag, overlapping spans), so run folders and sampled subsets use it.
A file whose first character is ``[`` is accepted as one JSON array of such objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from knowfree_core.errors import DataFormatError
from knowfree_core.formats._io import read_lines, write_text
from knowfree_core.formats.tagging import ReadReport
from knowfree_core.records import Sentence

_EXPECTED = 'a JSON object like {"id": ..., "text": ..., "spans": [{"start": 0, "end": 1, "label": ...}]}'


def _check_span_list(record: dict[str, Any], key: str) -> str | None:
    items = record.get(key, [])
    if not isinstance(items, list):
        return f'"{key}" is not a list'
    for item in items:
        if not isinstance(item, dict) or not {"start", "end", "label"} <= item.keys():
            return f'"{key}" entry {item!r} lacks start/end/label'
        if not all(isinstance(item[k], int) and not isinstance(item[k], bool) for k in ("start", "end")):
            return f'"{key}" entry {item!r} has non-integer offsets'
        if not isinstance(item["label"], str) or not isinstance(item.get("source", ""), str):
            return f'"{key}" entry {item!r} has a non-string label or source'
    return None


def parse_record(record: Any, path: str, line: int | None) -> Sentence:
    """Turn one decoded JSON value into a Sentence, or raise DataFormatError at path:line."""
    if not isinstance(record, dict):
        raise DataFormatError(path, line, f"a JSON {type(record).__name__} instead of an object", _EXPECTED)
    for key in ("id", "text"):
        if key not in record:
            raise DataFormatError(path, line, f'missing "{key}"', _EXPECTED)
    if not isinstance(record["text"], str):
        raise DataFormatError(path, line, '"text" is not a string', _EXPECTED)
    for key in ("spans", "extension_spans"):
        problem = _check_span_list(record, key)
        if problem:
            raise DataFormatError(path, line, problem, _EXPECTED)
    if "units" in record and not (
        isinstance(record["units"], list) and all(isinstance(u, str) for u in record["units"])
    ):
        raise DataFormatError(path, line, '"units" is not a list of strings', _EXPECTED)
    sentence = Sentence.from_dict(record)
    if sentence.text != record["text"]:
        raise DataFormatError(
            path, line, f'"units" joined with {sentence.joiner!r} do not give "text"', '"text" == joiner.join(units)'
        )
    try:
        sentence.validate()
    except ValueError as err:
        raise DataFormatError(path, line, str(err), f"0 <= start < end <= {len(sentence)} (unit offsets)") from None
    return sentence


def _keep(sentence: Sentence, where: str, sentences: list[Sentence], report: ReadReport) -> None:
    if len(sentence) == 0:
        report.empty_sentences += 1
        if len(report.empty_examples) < 3:
            report.empty_examples.append(where)
        return
    sentences.append(sentence)


def read_jsonl(path: str | Path, *, report: ReadReport | None = None) -> list[Sentence]:
    """Read sentences written by ``write_jsonl`` (blank lines are skipped)."""
    path = str(path)
    report = report if report is not None else ReadReport()
    report.path, report.format = path, "jsonl"
    lines = read_lines(path)
    sentences: list[Sentence] = []
    if next((line.strip() for line in lines if line.strip()), "").startswith("["):
        text = "\n".join(lines)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, err.lineno, f"invalid JSON: {err.msg}", "a JSON array of objects") from None
        # An array gives no line per record, so errors name the record instead.
        for index, record in enumerate(records):
            try:
                sentence = parse_record(record, path, None)
            except DataFormatError as err:
                raise DataFormatError(path, None, f"record {index}: {err.problem}", err.expected) from None
            _keep(sentence, f"{path}: record {index}", sentences, report)
    else:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(path, number, f"invalid JSON at column {err.colno}: {err.msg}", _EXPECTED) from None
            _keep(parse_record(record, path, number), f"{path}:{number}", sentences, report)
    return report.counted(sentences)


def write_jsonl(sentences: Iterable[Sentence], path: str | Path) -> None:
    """Write one ``Sentence.to_dict()`` per line (UTF-8, non-ASCII kept readable)."""
    write_text(path, [json.dumps(s.to_dict(), ensure_ascii=False) for s in sentences])
