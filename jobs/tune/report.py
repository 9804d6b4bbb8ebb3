"""The search's results: one row per trial (status, epochs, best dev F1, sampled values), the
tables ``results.csv`` and ``results.md``, and the summary printed at the end."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .search_space import plain
from knowfree_core.report.document import markdown_table


@dataclass
class TuneSummary:
    output_dir: Path
    rows: list[dict]  # sorted by dev F1, best first
    best: Optional[dict]
    best_metrics: Optional[dict]
    errors: int


def _epoch_frame(result):
    frame = result.metrics_dataframe
    if frame is None or frame.empty or "epoch" not in frame or "dev_f1" not in frame:
        return None
    frame = frame[frame["dev_f1"].notna()]
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch")


def result_row(result, keys: list[str], max_t: int) -> dict:
    frame = _epoch_frame(result)
    trial_id = _trial_id(result)
    row: dict[str, Any] = {"trial_id": trial_id}
    if frame is None or frame.empty:
        row.update(status="error" if result.error else "no result", epochs=0, best_epoch=None, dev_f1=None)
    else:
        best_index = frame["dev_f1"].to_numpy().argmax()  # the first best, as fit keeps it
        epochs = int(frame["epoch"].max())
        status = "error" if result.error else ("complete" if epochs >= max_t else "stopped")
        row.update(status=status, epochs=epochs, best_epoch=int(frame["epoch"].iloc[best_index]),
                   dev_f1=float(frame["dev_f1"].iloc[best_index]))
    for key in keys:
        row[key] = plain(result.config.get(key))
    row["test_f1"] = None
    row["seconds"] = round(float(result.metrics.get("time_total_s", 0.0) or 0.0), 1)
    return row


def _trial_id(result) -> str:
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return str(trial_id)
    return Path(result.path).name  # a trial that never reported


COLUMNS = ("rank", "trial_id", "status", "epochs", "best_epoch", "dev_f1")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0 or abs(value) >= 1:
            return f"{value:.1f}"
        return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.3g}"
    return str(value)


def write_tables(rows: list[dict], keys: list[str], out: Path) -> None:
    columns = list(COLUMNS) + keys + ["test_f1", "seconds"]
    with (out / "results.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(columns, [[_cell(row.get(c)) for c in columns] for row in rows])
    (out / "results.md").write_text(table + "\n", encoding="utf-8")


def print_summary(summary: TuneSummary) -> None:
    print((summary.output_dir / "results.md").read_text(encoding="utf-8"), end="")
    print(f"results: {summary.output_dir / 'results.csv'}")
    if summary.best is not None and summary.best_metrics is not None:
        test = summary.best_metrics.get("test")
        print(f"best trial {summary.best['trial_id']}: dev F1 {summary.best['dev_f1']:.4f}"
              + (f", test P {test['precision']:.4f} R {test['recall']:.4f} F1 {test['f1']:.4f}" if test else ""))
        print(f"best config: {summary.output_dir / 'best_config.yaml'}  (model: {summary.output_dir / 'best_trial'})")
    if summary.errors:
        print(f"{summary.errors} trial(s) failed: run the same command again to resume them from their checkpoints")
