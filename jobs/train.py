"""``knowfree train``'s run, data-parallel over Ray Train workers (DDP).

    python -m jobs.train --config configs/weibo-250.yaml [--set key=value ...]
        [--workers N] [--gpu] [--cpus-per-worker X] [--storage-path PATH_OR_URI] [--max-failures N]
    ray job submit --working-dir . -- python -m jobs.train --config ... --workers 4 --gpu \\
        --storage-path s3://bucket/knowfree

The config file is the one ``knowfree train`` reads; its ``ray_train`` section (or the flags,
which win) says how many workers, GPU or not, where checkpoints go and how many restarts a
failure may cost. ``knowfree train`` ignores that section.

Driver. Reads the data exactly as ``knowfree train`` does (training subset, offline extension
labels, label vocabulary), writes config.yaml and train_data.jsonl to ``output_dir``, and runs
a ``TorchTrainer`` (gloo on CPU, NCCL on GPU).

Data to the workers. The prepared sentences travel in ``train_loop_config``: the corpora here
are thousands of short sentences (a few MB). Every worker holds all of them and trains on its
shard of the length-bucketed batches (``knowfree_core.distributed``: same seed, same batch
order, rank r takes batches r, r+W, ...). No Ray Dataset: a lazy Ray Data input next to
training workers that hold every CPU waits forever on a small machine.

Workers. Each runs ``knowfree_core.training.fit`` with a ``DistributedContext``: DDP averages
the gradients, rank 0 evaluates dev and broadcasts the scores, so every rank takes the same
best-epoch decision. ``train.precision`` bf16/fp16 turns on mixed precision on GPUs.

Checkpoints and resume. After every epoch every worker calls ``ray.train.report`` with the
epoch's metrics; rank 0 attaches a checkpoint holding ``state.pt``, the whole loop state
(model, optimizer, scheduler, batch and dropout RNGs of every rank, history, best-dev weights).
When a worker dies, ``FailureConfig(max_failures)`` restarts the worker group and
``ray.train.get_checkpoint()`` hands every worker the last checkpoint: training continues
after its epoch. A killed driver: run the same command again; Ray Train restores the run
(``storage_path``/``name``) and continues from its latest checkpoint (a changed config is
refused, as with ``knowfree train``).

Export. After training rank 0 chooses the decision threshold on dev, saves the best-dev model
(``KnowFreeModel.save_pretrained``) with metrics.json (dev and test) and history.jsonl into a
last checkpoint; the driver copies them into ``output_dir``. Through Ray's storage, this works
when rank 0 runs on another node than the driver.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from .cli import TRAIN
from .common import RayConfig, init_ray
from .fault_injection import FAIL_MARKER, fail_after_epoch, fail_now  # noqa: F401 - tests only; FAIL_MARKER: their name for it
from knowfree_core import commandline
from knowfree_core.config import KnowFreeConfig
from knowfree_core.distributed import DistributedContext
from knowfree_core.errors import KnowFreeError
from knowfree_core.loop_state import EpochReport, LoopState
from knowfree_core.run import (
    PreparedData, RunSummary, attach_file_log, build_model, export_model, prepare_data,
)
from knowfree_core.safe_paths import plain_name
from knowfree_core.training import fit

logger = logging.getLogger("jobs.train")

STATE_FILE = "state.pt"  # in every per-epoch checkpoint: fit's loop state
EXPORT_MARKER = "export.json"  # in the last checkpoint: the exported model is there


# ---------------------------------------------------------------------------- driver
def storage_location(config: KnowFreeConfig) -> tuple[str, str]:
    """(storage_path, run name) of the Ray Train run: a local folder is made absolute."""
    settings = config.ray_train
    run_dir = Path(config.output_dir)
    storage = settings.storage_path or str(run_dir / "ray_train")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    # The run name is a folder under the storage: a plain name, so it cannot point elsewhere.
    return storage, plain_name(settings.name or run_dir.resolve().name, "ray_train.name")


def _run_has_checkpoints(storage_path: str, name: str) -> bool:
    """Whether Ray Train already holds checkpoints of this run (it will resume from them)."""
    import pyarrow.fs

    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(f"{root.rstrip('/')}/{name}", allow_not_found=True))
    except (OSError, ValueError) as error:  # unreachable storage: Ray will say so itself
        logger.warning("could not list %s/%s: %s", storage_path, name, error)
        return False
    return any(Path(entry.path).name.startswith("checkpoint_") for entry in entries)


def worker_resources(config: KnowFreeConfig) -> dict[str, float]:
    settings = config.ray_train
    if settings.resources_per_worker:
        return {key: float(value) for key, value in settings.resources_per_worker.items()}
    return {"GPU": 1.0} if settings.use_gpu else {"CPU": 1.0}


def make_trainer(config: KnowFreeConfig, data: PreparedData, callbacks: Optional[list] = None,
                 fail_after_epoch: Optional[int] = None):
    """The ``TorchTrainer`` of this run (``jobs.tune`` may add its callbacks; tests ask for a
    worker to fail once with ``fail_after_epoch``, see jobs.fault_injection)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = config.ray_train
    storage_path, name = storage_location(config)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "data": data, "run_dir": str(Path(config.output_dir).resolve()),
                           "fail_after_epoch": fail_after_epoch},
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=worker_resources(config),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.num_to_keep),
            callbacks=callbacks,
        ),
    )


def run_ray_training(
    config: KnowFreeConfig, ray_config: Optional[RayConfig] = None, callbacks: Optional[list] = None
) -> RunSummary:
    """Train with Ray Train; ``output_dir`` ends up as ``knowfree train`` leaves it (config.yaml,
    train.log, history.jsonl, train_data.jsonl, model/, metrics.json), the checkpoints in
    ``ray_train.storage_path``. ``metrics.json`` gets a ``ray_train`` entry."""
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = attach_file_log(run_dir)
    try:
        return _run(config, run_dir, ray_config or RayConfig(), callbacks)
    finally:
        logging.getLogger("knowfree_core").removeHandler(handler)
        handler.close()


def _run(config: KnowFreeConfig, run_dir: Path, ray_config: RayConfig, callbacks: Optional[list]) -> RunSummary:
    started = time.perf_counter()
    settings = config.ray_train
    storage_path, name = storage_location(config)
    resuming = _run_has_checkpoints(storage_path, name)
    data = prepare_data(config, run_dir, has_checkpoint=resuming)
    if resuming:
        logger.info("Ray Train run %s/%s has checkpoints: it continues from the latest", storage_path, name)
    init_ray(ray_config, min_cpus=settings.num_workers * worker_resources(config).get("CPU", 0.0),
             settings="ray_train.num_workers or ray_train.resources_per_worker")

    result = make_trainer(config, data, callbacks, fail_after_epoch=fail_after_epoch()).fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    if result.checkpoint is None:
        raise KnowFreeError(f"Ray Train run {storage_path}/{name} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        export = Path(directory)
        if not (export / EXPORT_MARKER).is_file():
            raise KnowFreeError(f"the last checkpoint of {storage_path}/{name} holds no exported model")
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        shutil.copytree(export / "model", run_dir / "model")
        shutil.copyfile(export / "history.jsonl", run_dir / "history.jsonl")
        metrics = json.loads((export / "metrics.json").read_text(encoding="utf-8"))
        exported = json.loads((export / EXPORT_MARKER).read_text(encoding="utf-8"))
    metrics["seconds"] = round(time.perf_counter() - started, 1)  # the whole job, Ray start included
    metrics["ray_train"] = {
        "num_workers": settings.num_workers,
        "use_gpu": settings.use_gpu,
        "resources_per_worker": worker_resources(config),
        "storage_path": storage_path,
        "name": name,
        "checkpoint": result.checkpoint.path,
        "continued_from_storage": resuming,
        # > 0 when the worker group (re)started from a checkpoint of that epoch
        "resumed_after_epoch": exported.get("resumed_after_epoch", 0),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    return RunSummary(run_dir=run_dir, metrics=metrics)


# ---------------------------------------------------------------------------- workers
def epoch_metrics(report: EpochReport) -> dict[str, Any]:
    """What each worker reports to Ray after an epoch (numbers only; no dev keys without dev)."""
    metrics: dict[str, Any] = {
        "epoch": report.epoch,
        "train_loss": report.train_loss,
        "seconds": report.seconds,
        "peak_rss_mib": report.peak_rss_mib,
        "best_epoch": report.best_epoch,
        "is_best": report.is_best,
    }
    if report.dev is not None:
        metrics.update(dev_f1=report.dev["f1"], dev_precision=report.dev["precision"], dev_recall=report.dev["recall"])
    if report.best_dev_f1 is not None:
        metrics["best_dev_f1"] = report.best_dev_f1
    return metrics


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: resume from Ray's checkpoint, ``fit`` on its shard, report every
    epoch (rank 0 with the loop state), and on rank 0 export the best-dev model."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    config: KnowFreeConfig = loop_config["config"]
    data: PreparedData = loop_config["data"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    resume_state = None
    resumed_after_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / EXPORT_MARKER).is_file():
                logger.info("the model was exported before the restart: nothing left to do")
                return
            resume_state = LoopState.load(Path(directory) / STATE_FILE)
            resumed_after_epoch = resume_state.epoch

    def report(epoch_report: EpochReport, _model, state: Optional[LoopState]) -> None:
        metrics = epoch_metrics(epoch_report)
        if state is None:
            ray.train.report(metrics, checkpoint=None)
        else:
            with tempfile.TemporaryDirectory(prefix="knowfree-checkpoint-") as tmp:
                state.save(Path(tmp) / STATE_FILE)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        _fail_once_if_asked(loop_config.get("fail_after_epoch"), loop_config["run_dir"], rank, world_size,
                            epoch_report.epoch)

    model = build_model(config, data.vocab)
    distributed = DistributedContext(
        rank=rank,
        world_size=world_size,
        device=str(ray.train.torch.get_device()),
        resume_state=resume_state,
        report=report,
    )
    result = fit(model, data.train, data.dev or None, config.train, progress=False, distributed=distributed)

    if rank != 0:
        ray.train.report({"exported": True}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="knowfree-export-") as tmp:
        out = Path(tmp)
        metrics = export_model(config, model, result, data, out, started, progress=False)
        with (out / "history.jsonl").open("w", encoding="utf-8") as history:
            for epoch_report in result.history:
                history.write(json.dumps(epoch_report.to_dict(), ensure_ascii=False) + "\n")
        # resumed_after_epoch: the epoch of the checkpoint this (last) attempt started from
        export = {"best_epoch": result.best_epoch, "resumed_after_epoch": resumed_after_epoch}
        (out / EXPORT_MARKER).write_text(json.dumps(export), encoding="utf-8")
        # Dev only: test scores stay in metrics.json (a search must not see them).
        final = {"exported": True, "best_epoch": result.best_epoch}
        if "dev" in metrics:
            final["exported_dev_f1"] = metrics["dev"]["f1"]  # at the threshold chosen on dev
        ray.train.report(final, checkpoint=Checkpoint.from_directory(tmp))


def _fail_once_if_asked(fail_after_epoch: Optional[int], run_dir: str, rank: int, world_size: int,
                        epoch: int) -> None:
    """Testing (jobs.fault_injection): one worker dies once, after this epoch's checkpoint is
    registered, so that the restart has something to resume from."""
    import ray.train

    if rank != min(1, world_size - 1):
        return
    # Waiting for this epoch's report to be processed: the restart then resumes after this epoch.
    if fail_now(fail_after_epoch, epoch, run_dir, f"rank {rank} exited after epoch {epoch}",
                before=ray.train.get_all_reported_checkpoints):
        logger.warning("fault injection after epoch %d: rank %d exits now", epoch, rank)
        os._exit(1)


# ---------------------------------------------------------------------------- command line
#: ``python -m jobs.train`` in this process (its options: jobs/cli.py); a user error is raised.
main = TRAIN.run


if __name__ == "__main__":
    sys.exit(commandline.main(TRAIN))
