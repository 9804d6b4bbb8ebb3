"""What a run folder holds, read back for a report: its config, metrics, history, training
data and label vocabulary; and the (gold training size, test F1) points of several runs."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..config import KnowFreeConfig, load_config
from ..errors import KnowFreeError
from ..labels import LabelVocab
from ..records import Sentence

logger = logging.getLogger(__name__)

# ====================================================================== the run folder
@dataclass
class RunRecord:
    """What a finished (or still running) run folder holds, read from disk."""

    run_dir: Path
    config: KnowFreeConfig
    metrics: dict
    history: list[dict]
    train: list[Sentence]
    vocab: Optional[LabelVocab]  # None while the model is not exported yet

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def _read_jsonl_dicts(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_run(run_dir: Union[str, Path]) -> RunRecord:
    """Read a run folder; only config.yaml is required, so a run still training gets a
    report of its history too (missing parts become notes in the report)."""
    from ..formats import read_dataset

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise KnowFreeError(f"{run_dir} is not a run folder (no config.yaml); see `knowfree train`")
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    train_path = run_dir / "train_data.jsonl"
    labels_path = run_dir / "model" / "labels.json"
    return RunRecord(
        run_dir=run_dir,
        config=load_config(run_dir / "config.yaml"),
        metrics=metrics,
        history=_read_jsonl_dicts(run_dir / "history.jsonl"),
        train=read_dataset(train_path, format="jsonl") if train_path.is_file() else [],
        vocab=LabelVocab.load(labels_path) if labels_path.is_file() else None,
    )


def _read_split(config: KnowFreeConfig, path: Union[str, Path], override: bool = False) -> list[Sentence]:
    """Read an evaluation file as the run read its data (format and reader options). An
    override file of another format than the run's (``--data x.jsonl`` for a CoNLL run) is
    read by its own format instead: the run's reader options belong to the other reader."""
    from ..formats import detect_format, read_dataset

    if override:
        reference = next((p for p in (config.data.test, config.data.train) if p and Path(p).is_file()), None)
        if reference is None or detect_format(path) != detect_format(reference):
            return read_dataset(path)
    return read_dataset(path, format=config.data.format, **dict(config.data.read_options or {}))


# ====================================================================== LLM job summaries
@dataclass(frozen=True)
class TokenSummary:
    """The token ledger of one LLM job's ``summary.json`` (``jobs.annotate``, ``jobs.synthesize``)."""

    name: str  # the job's folder, relative to where the report looked
    tokens: dict
    cost: Optional[dict]


def token_summaries(folder: Union[str, Path]) -> list[TokenSummary]:
    """The ``summary.json`` files with LLM token counts in ``folder`` and its subfolders (a job's
    output folder, or a pipeline cell with its annotate/ and synthesize/ stages); for a run
    folder inside a pipeline cell (its parent holds cell.json), the cell's stages too."""
    folder = Path(folder)
    places = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []
    base = folder
    if (folder.parent / "cell.json").is_file():
        base = folder.parent
        places += sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder)
    found = []
    for place in places:
        path = place / "summary.json"
        if not path.is_file():
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            logger.warning("%s: unreadable (%s); left out of the token report", path, error)
            continue
        tokens = summary.get("tokens") if isinstance(summary, dict) else None
        if isinstance(tokens, dict) and tokens.get("by_step"):
            name = str(place.relative_to(base)) if place != base else place.name
            found.append(TokenSummary(name, tokens, summary.get("cost")))
    return found


# ====================================================================== F1 against training size
@dataclass(frozen=True)
class SizePoint:
    run: str
    train_sentences: int  # gold (non-synthetic) training sentences
    f1: float  # test F1


def _gold_training_size(run_dir: Path, metrics: dict) -> int:
    """Gold training sentences of a run. Synthetic sentences are augmentation, not training
    size: counting them would put an FS run to the right of the F run it extends."""
    records = _read_jsonl_dicts(run_dir / "train_data.jsonl")
    if records:
        return sum(1 for r in records if not r.get("synthetic", False))
    return int(metrics.get("train_sentences", 0))


def training_size_points(run_dirs: Sequence[Union[str, Path]]) -> list[SizePoint]:
    """One point per run folder with a test score; runs without one are skipped (logged)."""
    points = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        if "test" not in metrics:
            logger.warning("%s has no test scores in metrics.json; left out of the F1-by-size plot", run_dir)
            continue
        points.append(SizePoint(str(run_dir), _gold_training_size(run_dir, metrics), float(metrics["test"]["f1"])))
    return sorted(points, key=lambda p: (p.train_sentences, p.run))


