"""The quality harness's results file: one JSON line per (dataset, setting, variant, seed).

Shared by ``bench/quality.py`` (runs cells through the Ray pipeline) and
``bench/quality_gpu.py`` (trains exported cells on a GPU machine that has no Ray): both write
the same records, so a table mixes cells from either. Needs only the standard library and torch.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

logger = logging.getLogger("bench.quality")


def result_key(record: dict) -> tuple[str, str, str, int]:
    return record["dataset"], record["setting"], record["variant"], int(record["seed"])


def read_results(path: str | Path) -> list[dict]:
    """The results file's records, oldest first; no file: none yet."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed while appending leaves a torn last line: that cell simply runs again.
            logger.warning("%s:%d is not a JSON record; ignored", path, number)
    return records


def append_result(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())


def machine_description() -> str:
    """The machine of this process (on a local Ray cluster also the one that trained)."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}; {platform.platform()}"
    return f"{platform.platform()}, {os.cpu_count()} CPUs"


def make_record(dataset: str, setting: str, variant: str, seed: int, score: dict, *, run_dir: str,
                machine: str, command: str, synthesis_engine: Optional[str] = None) -> dict:
    """One results line from a run's scores (``metrics.json`` or the pipeline's per-variant scores)."""
    dev, test = score.get("dev") or {}, score.get("test") or {}
    return {
        "dataset": dataset, "setting": setting, "variant": variant, "seed": int(seed),
        "dev_f1": dev.get("f1"),
        "test_precision": test.get("precision"), "test_recall": test.get("recall"), "test_f1": test.get("f1"),
        "train_sentences": score.get("train_sentences"), "best_epoch": score.get("best_epoch"),
        # FS quality depends on the LLM that wrote the synthetic sentences.
        "synthesis_engine": synthesis_engine,
        "run_dir": run_dir, "machine": machine,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
    }
