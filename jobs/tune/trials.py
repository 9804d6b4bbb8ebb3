"""The two trial runners: ``function_trial`` trains in the trial's own process and reports every
epoch with a checkpoint of the loop state; ``ray_train_trial`` drives a Ray Train run of
``jobs.train``'s trainer per trial. Ray pickles them by reference to this module."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..fault_injection import fail_now
from .schema import TuneJobConfig
from .search_space import apply_params
from knowfree_core.config import KnowFreeConfig, save_config
from knowfree_core.loop_state import EpochReport, LoopState
from knowfree_core.run import PreparedData, attach_file_log, build_model

STATE_FILE = "state.pt"  # in every function-trial checkpoint: fit's loop state


@dataclass
class TrialSetup:
    """What every trial gets besides its sampled values (through ``tune.with_parameters``)."""

    base: KnowFreeConfig
    data: PreparedData  # without test sentences
    trials_dir: str
    cpus: float
    #: Testing only (jobs.fault_injection): every function trial raises once after this epoch
    #: (a marker in its run folder), so that a rerun shows errored trials resuming.
    fail_after_epoch: Optional[int] = None


def trial_config(setup: TrialSetup, params: Mapping[str, Any], trial_id: str) -> KnowFreeConfig:
    config = apply_params(setup.base, params)
    config.output_dir = str(Path(setup.trials_dir) / trial_id)
    config.ray_train.name = trial_id  # a ray_train trial's Train run, unique under its storage
    return config


def _start_trial_folder(config: KnowFreeConfig) -> Path:
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    return run_dir


def function_trial(params: dict, setup: TrialSetup) -> None:
    """One trial in this process: ``fit`` with a per-epoch ``ray.tune.report`` + checkpoint;
    a restored trial continues after the epoch of its last checkpoint."""
    from ray import tune

    from knowfree_core.distributed import DistributedContext
    from knowfree_core.training import fit

    from ..train import epoch_metrics

    config = trial_config(setup, params, tune.get_context().get_trial_id())
    if config.train.num_threads is None:
        config.train.num_threads = max(1, int(round(setup.cpus)))
    run_dir = _start_trial_folder(config)
    logging.getLogger("knowfree_core").setLevel(logging.INFO)
    handler = attach_file_log(run_dir)
    try:
        resume_state, resumed_after = None, 0
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                resume_state = LoopState.load(Path(directory) / STATE_FILE)
            resumed_after = resume_state.epoch
        history_path = run_dir / "history.jsonl"
        kept = [r.to_dict() for r in resume_state.history] if resume_state else []
        history_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")

        def report(epoch_report: EpochReport, _model, state: Optional[LoopState]) -> None:
            with history_path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(epoch_report.to_dict(), ensure_ascii=False) + "\n")
            metrics = epoch_metrics(epoch_report)
            metrics["resumed_after_epoch"] = resumed_after
            with tempfile.TemporaryDirectory(prefix="knowfree-tune-") as tmp:
                state.save(Path(tmp) / STATE_FILE)  # type: ignore[union-attr] - set: no other ranks
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
            if fail_now(setup.fail_after_epoch, epoch_report.epoch, run_dir, f"failed after epoch {epoch_report.epoch}"):
                raise RuntimeError(f"fail_after_epoch={epoch_report.epoch}: this trial fails once (testing)")

        model = build_model(config, setup.data.vocab)
        fit(model, setup.data.train, setup.data.dev, config.train, progress=False,
            distributed=DistributedContext(resume_state=resume_state, report=report))
    finally:
        logging.getLogger("knowfree_core").removeHandler(handler)
        handler.close()


def ray_train_trial(params: dict, setup: TrialSetup) -> None:
    """One trial as a Ray Train run (``jobs.train``'s trainer) reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train import make_trainer

    class EpochTuneReportCallback(TuneReportCallback):
        """The Train run's last report (the exported model) carries no epoch metrics: repeat
        the last epoch's, so that ASHA, Optuna and Tune's metric check see them."""

        def __init__(self):
            super().__init__()
            self._last_epoch: dict = {}

        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0]) if metrics else {}
            if "epoch" in first:
                self._last_epoch = first
            else:
                metrics = [{**self._last_epoch, **first}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    config = trial_config(setup, params, tune.get_context().get_trial_id())
    _start_trial_folder(config)
    result = make_trainer(config, setup.data, callbacks=[EpochTuneReportCallback()]).fit()
    if getattr(result, "error", None) is not None:
        raise result.error


def make_trainable(job: TuneJobConfig, setup: TrialSetup):
    from ray import tune

    if job.trial_runner == "ray_train":
        return tune.with_resources(tune.with_parameters(ray_train_trial, setup=setup), {"cpu": job.driver_cpu})
    resources = {"cpu": job.resources_per_trial.cpu, "gpu": job.resources_per_trial.gpu}
    return tune.with_resources(tune.with_parameters(function_trial, setup=setup), resources)
