"""Reading text files line by line with errors that point at a file and line.

Shared by every reader so that BOM, CRLF and bad bytes are handled the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path

from knowfree_core.errors import DataFormatError

_BOM = b"\xef\xbb\xbf"
#: What a reader accepts in place of a folder (formats.FORMATS; that module imports this one).
_DATA_FILES = "a jsonl, conll or conllu data file"


def read_lines(path: str | Path) -> list[str]:
    """Return the file's lines without line terminators (LF or CRLF), BOM removed.

    Splits on "\\n" only: ``str.splitlines`` would also split on U+2028, U+0085 and
    other characters that may legitimately be *units* of a sentence.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataFormatError(str(path), None, "file not found") from None
    except IsADirectoryError:
        # Every dataset reader (and format sniffing) comes here: a folder given for a data
        # file is one line naming it, not a traceback from deep inside a reader.
        raise DataFormatError(str(path), None, "is a folder, not a file", _DATA_FILES) from None
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad = data[err.start : err.end]
        raise DataFormatError(
            str(path), line, f"byte(s) {bad!r} are not valid UTF-8", "a UTF-8 encoded text file"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start another line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def write_text(path: str | Path, lines: list[str]) -> None:
    """Write lines as UTF-8 with LF terminators, creating parent folders."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", encoding="utf-8", newline="\n") as handle:
        for line in lines:
            handle.write(line)
            handle.write("\n")
