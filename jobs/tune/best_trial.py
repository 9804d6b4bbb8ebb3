"""After the search: the best trial's best-dev model rebuilt from its last checkpoint, its
threshold chosen on dev, test evaluated for it alone (``best_trial/``), and ``best_config.yaml``
written for ``knowfree train``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .schema import TuneJobConfig
from .search_space import apply_params
from .trials import STATE_FILE
from knowfree_core.config import KnowFreeConfig, save_config
from knowfree_core.errors import KnowFreeError
from knowfree_core.loop_state import EpochReport, LoopState
from knowfree_core.run import PreparedData, build_model, export_model
from knowfree_core.training import TrainResult


def _latest_checkpoint_dir(job: TuneJobConfig, result) -> Optional[str]:
    """Where the trial's last checkpoint is: Tune's (function) or its Train run's (ray_train)."""
    if job.trial_runner == "function":
        return result.checkpoint.path if result.checkpoint is not None else None
    frame = result.metrics_dataframe
    if frame is None or "checkpoint_path" not in frame:
        return None
    paths = frame["checkpoint_path"].dropna()
    return str(paths.iloc[-1]) if len(paths) else None


def evaluate_best_trial(job: TuneJobConfig, base: KnowFreeConfig, data: PreparedData, result, row: dict,
                        out: Path) -> dict:
    """The best trial's best-dev model: threshold on dev, saved to best_trial/, dev and test."""
    from knowfree_core.model.knowfree import KnowFreeModel
    from ray.train import Checkpoint

    started = time.perf_counter()
    config = apply_params(base, {k: v for k, v in row.items() if k in job.search_space})
    config.output_dir = str(out / "best_trial")
    location = _latest_checkpoint_dir(job, result)
    if location is None:
        raise KnowFreeError(f"trial {row['trial_id']} left no checkpoint to evaluate")
    with Checkpoint(location).as_directory() as directory:
        directory = Path(directory)
        if (directory / STATE_FILE).is_file():
            state = LoopState.load(directory / STATE_FILE)
            model = build_model(config, data.vocab)
            model.load_state_dict(state.best_state or state.model, strict=False)
            history = state.history
        elif (directory / "model").is_dir():  # a ray_train trial that finished: its exported model
            model = KnowFreeModel.from_pretrained(directory / "model")
            lines = (directory / "history.jsonl").read_text(encoding="utf-8").splitlines()
            history = [EpochReport(**json.loads(line)) for line in lines if line.strip()]
        else:
            raise KnowFreeError(f"{location} holds neither {STATE_FILE} nor an exported model")
    target = out / "best_trial"
    target.mkdir(parents=True, exist_ok=True)
    save_config(config, target / "config.yaml")
    trained = TrainResult(best_epoch=row["best_epoch"], best_dev_f1=row["dev_f1"], history=history)
    metrics = export_model(config, model, trained, data, target, started, progress=False)
    metrics["trial_id"] = row["trial_id"]
    metrics["checkpoint"] = location
    (target / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    return metrics


def cached_best_metrics(out: Path, trial_id: str) -> Optional[dict]:
    """A rerun of a finished experiment does not evaluate the same best trial again."""
    path = out / "best_trial" / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    return metrics if metrics.get("trial_id") == trial_id and (out / "best_trial" / "model").is_dir() else None


def write_best_config(base: KnowFreeConfig, best: dict, keys: list[str], out: Path) -> Path:
    """The base config with the best trial's values: ``knowfree train --config`` retrains it."""
    config = apply_params(base, {key: best[key] for key in keys})
    config.output_dir = str(out / "best_retrain")
    path = out / "best_config.yaml"
    save_config(config, path)
    values = ", ".join(f"{key}={best[key]}" for key in keys)
    header = (f"# Best trial {best['trial_id']} of the search in {out}: dev F1 {best['dev_f1']:.4f} "
              f"(epoch {best['best_epoch']})\n# {values}\n"
              f"# Retrain: knowfree train --config {path}   (its best-dev model is in {out / 'best_trial'})\n")
    path.write_text(header + path.read_text(encoding="utf-8"), encoding="utf-8")
    return path

