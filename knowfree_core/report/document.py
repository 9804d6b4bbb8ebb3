"""The report as a list of blocks (headings, paragraphs, tables, images), rendered to Markdown
and to a self-contained HTML page."""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union

logger = logging.getLogger(__name__)

# ====================================================================== the document
@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    #: One letter per column, ``r`` to right-align it in Markdown (numbers); missing: left.
    align: str = ""


@dataclass
class Image:
    file: str  # a file name in the report folder
    alt: str


Block = Union[Heading, Paragraph, Table, Image]


def _md_cell(text: str) -> str:
    # A pipe would end the cell, a newline the row.
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table, cells escaped; ``align`` as :attr:`Table.align`."""
    rule = ["---:" if letter == "r" else "---" for letter in align.ljust(len(header), "l")]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(markdown_table(block.header, block.rows, block.align))
        elif isinstance(block, Image):
            parts.append(f"![{_md_cell(block.alt)}]({block.file})")
    return "\n\n".join(parts) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.2em .6em}"
        "th{background:#f0f0f0}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}")


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained page (inline CSS, no scripts); images are the PNGs next to it."""
    e = html.escape
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{e(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{e(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{e(str(h))}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Image):
            body.append(f'<p><img src="{e(block.file)}" alt="{e(block.alt)}"></p>')
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


