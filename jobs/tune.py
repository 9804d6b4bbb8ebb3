"""Hyper-parameter search for KnowFREE with Ray Tune; the objective is dev F1.

    python -m jobs.tune --config configs/tune-weibo-250.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.tune --config configs/tune-weibo-250.yaml

Config (``TuneJobConfig``): ``train_config`` (a ``knowfree train`` YAML) plus ``train_overrides``
give every trial's base configuration; ``search_space`` maps dotted config keys to a sampler:

    search_space:
      model.window:     {type: grid, values: [1, 3, 5]}        # grid: every value, num_samples times
      model.attn_heads: {type: choice, values: [5, 10]}        # must divide model.grid_size
      model.alpha_scale: {type: uniform, low: 0.25, high: 1.0}
      train.encoder_lr: {type: loguniform, low: 5.0e-5, high: 2.0e-4}
      encoder.num_layers: {type: randint, low: 4, high: 8}     # integers, both ends included

K (``model.attn_heads``) must divide the feature size ``model.grid_size``: a ``randint`` K is
sampled from the divisors in its range, a ``choice``/``grid`` value that does not divide is
refused before anything runs (so is a searched ``grid_size`` that some K value does not divide).
Keys under ``data.`` and ``model.use_extension_labels`` cannot be searched: the data (training
subset, offline extension labels, label vocabulary) is prepared once, by the driver, and shared
by every trial. ``--set`` cannot reach ``search_space`` entries (their keys hold dots): edit the
YAML file.

Scheduling: ``scheduler.name: asha`` (``AsyncHyperBandScheduler`` on ``scheduler.metric``,
default ``dev_f1``, per epoch: ``grace_period``, ``reduction_factor``, ``max_t`` = train.epochs)
or ``fifo``; ``search_alg: optuna`` (``OptunaSearch`` on the trial's best dev F1; needs the
``tune`` extra, and no ``grid`` samplers) or none (random / grid sampling, seeded by ``seed``);
``max_concurrent_trials``.

Trials (``trial_runner``):

* ``function`` (default): a function trainable that runs ``knowfree_core.training.fit`` in
  the trial's process with ``resources_per_trial`` (cpu/gpu; torch gets that many threads unless
  ``train.num_threads`` says otherwise). After every epoch it calls ``ray.tune.report`` with the
  epoch's metrics and a ``tune.Checkpoint`` holding the loop state (``state.pt``: weights,
  optimizer, scheduler, RNGs, history, best-dev weights).
* ``ray_train``: each trial is a driver function (``driver_cpu`` CPUs) that runs
  ``jobs.train.make_trainer`` with ``TuneReportCallback``: a Ray Train run of
  ``ray_train.num_workers`` workers (the train config's ``ray_train`` section: GPUs, resources
  per worker, storage path) per trial, for multi-GPU trials. Its checkpoints live in the Train
  run's storage (default ``<trial run folder>/ray_train``).

Folders under ``output_dir`` (shared storage on a multi-node cluster):

    data/            the prepared data once (config.yaml, train_data.jsonl) — the base config
    tune/            the Tune experiment (state, per-trial results and checkpoints)
    trials/<id>/     each trial's run folder: config.yaml, train.log, history.jsonl
    results.csv, results.md   every trial sorted by dev F1, with its sampled values
    best_config.yaml          the best trial's configuration, ready for ``knowfree train --config``
    best_trial/               the best trial's best-dev model (model/) and metrics.json (dev, test)

Nothing about test is seen during the search: trials receive no test sentences. After the
search the best trial (highest dev F1 over its epochs) is rebuilt from its last checkpoint
(whose best-dev weights are the epoch it is ranked by), its decision threshold is chosen on
dev, and test is evaluated for that model only (``best_trial/metrics.json``, the ``test_f1``
column of its row).

Resume: run the same command again. When ``output_dir/tune`` holds an experiment
(``Tuner.can_restore``) it is restored with ``Tuner.restore(path, trainable,
resume_errored=True)``: finished trials are kept, unfinished and errored ones continue from
their last checkpoint (the function trainable reloads ``state.pt``; a ray_train trial's Train
run restores itself from its storage). A changed search (search space, sampler, scheduler,
trial runner or base config) is refused: choose another ``output_dir``. The scheduler and
``max_concurrent_trials`` are the ones saved with the experiment; ``resources_per_trial`` may
change. A rerun of a finished experiment only rewrites the tables (the best trial is not
evaluated again).
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .cli import TUNE
from .common import RayConfig, init_ray
from .fault_injection import FAIL_MARKER, fail_after_epoch, fail_now  # noqa: F401 - tests only; FAIL_MARKER: their name for it
from knowfree_core import commandline
from knowfree_core.config import (
    KnowFreeConfig,
    load_config,
    load_structured,
    save_config,
    structured_to_dict,
    validate_config,
)
from knowfree_core.errors import ConfigError, KnowFreeError
from knowfree_core.loop_state import EpochReport, LoopState
from knowfree_core.report.document import markdown_table
from knowfree_core.run import PreparedData, attach_file_log, build_model, export_model, prepare_data
from knowfree_core.training import TrainResult

logger = logging.getLogger("jobs.tune")

STATE_FILE = "state.pt"  # in every function-trial checkpoint: fit's loop state
EXPERIMENT = "tune"  # the Tune experiment's folder under output_dir
Sampler = Literal["choice", "grid", "uniform", "loguniform", "randint"]
# Keys whose change would need other prepared data (the driver prepares it once for all trials).
DATA_KEYS = ("data.", "model.use_extension_labels")
# Sections of the job config that define the search: a restored experiment must not change them.
SEARCH_DEFINITION = ("train_config", "train_overrides", "search_space", "num_samples", "scheduler",
                     "search_alg", "seed", "trial_runner")


# ---------------------------------------------------------------------------- config
@dataclass
class ParamSpec:
    """One searched key: ``choice``/``grid`` take ``values``; ``uniform``/``loguniform`` and
    ``randint`` (integers, both ends included) take ``low`` and ``high``."""

    type: Sampler = MISSING
    values: Optional[List[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None


@dataclass
class SchedulerConfig:
    name: Literal["asha", "fifo"] = "asha"
    metric: str = "dev_f1"  # reported after every epoch
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0
    max_t: Optional[int] = None  # None: train.epochs of the base config


@dataclass
class TrialResources:
    """What a ``function`` trial holds (torch threads = cpu unless train.num_threads is set)."""

    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class TuneJobConfig:
    train_config: str = MISSING
    train_overrides: List[str] = field(default_factory=list)
    output_dir: str = MISSING
    search_space: Dict[str, ParamSpec] = field(default_factory=dict)
    num_samples: int = 4  # with grid samplers: samples per grid point
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search_alg: Optional[Literal["optuna"]] = None  # None: random or grid search
    seed: Optional[int] = 0  # of the sampler (random search or Optuna)
    max_concurrent_trials: Optional[int] = None  # None: as many as the resources allow
    resources_per_trial: TrialResources = field(default_factory=TrialResources)
    trial_runner: Literal["function", "ray_train"] = "function"
    driver_cpu: float = 0.2  # ray_train: CPU of each trial's driver function (0 is refused by Tune)
    checkpoints_to_keep: int = 1  # per trial; the last one holds the best-dev weights too
    ray: RayConfig = field(default_factory=RayConfig)


def load_tune_config(path: str | Path | None, overrides: list[str] | None = None) -> TuneJobConfig:
    config: TuneJobConfig = load_structured(TuneJobConfig, path, overrides)
    if config.num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1, got {config.num_samples}")
    if not config.search_space:
        raise ConfigError("search_space is empty: name at least one config key to search")
    return config


# ---------------------------------------------------------------------------- search space
def _plain(value: Any) -> Any:
    """numpy scalars (what samplers return) as Python numbers."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def apply_params(base: KnowFreeConfig, params: Mapping[str, Any]) -> KnowFreeConfig:
    """``base`` with the dotted keys of ``params`` set; a wrong key or type is a ConfigError."""
    merged = OmegaConf.structured(base)
    for key, value in params.items():
        try:
            OmegaConf.update(merged, key, _plain(value), merge=False)
        except OmegaConfBaseException as error:
            raise ConfigError(f"search_space key {key!r} with value {value!r}: {error}") from error
    try:
        config: KnowFreeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid train config: {error}") from error
    validate_config(config)
    return config


def _candidates(key: str, spec: ParamSpec) -> list[Any]:
    """The values that stand for a sampler when checking keys and types."""
    if spec.type in ("choice", "grid"):
        if not spec.values:
            raise ConfigError(f"search_space.{key}: {spec.type} needs a non-empty 'values' list")
        return list(spec.values)
    if spec.low is None or spec.high is None or spec.low > spec.high:
        raise ConfigError(f"search_space.{key}: {spec.type} needs low <= high")
    if spec.type == "loguniform" and spec.low <= 0:
        raise ConfigError(f"search_space.{key}: loguniform needs low > 0")
    if spec.type == "randint":
        if spec.low != int(spec.low) or spec.high != int(spec.high):
            raise ConfigError(f"search_space.{key}: randint needs integer low and high")
        return [int(spec.low), int(spec.high)]
    return [spec.low, spec.high]


def _values_of(key: str, spec: Optional[ParamSpec], default: int) -> list[int]:
    if spec is None:
        return [default]
    if spec.type == "randint":
        return list(range(int(spec.low), int(spec.high) + 1))  # type: ignore[arg-type]
    if spec.type in ("choice", "grid"):
        return [int(v) for v in spec.values or []]
    raise ConfigError(f"search_space.{key}: an integer that must divide or be divided cannot be {spec.type}")


def constrain_attn_heads(space: Dict[str, ParamSpec], base: KnowFreeConfig) -> Dict[str, ParamSpec]:
    """K (``model.attn_heads``) must divide ``model.grid_size``: a randint K becomes a choice of
    the divisors in its range; choice/grid values that do not divide are refused."""
    heads_key, grid_key = "model.attn_heads", "model.grid_size"
    if heads_key not in space and grid_key not in space:
        return space
    heads_spec, grid_spec = space.get(heads_key), space.get(grid_key)
    grids = _values_of(grid_key, grid_spec, base.model.grid_size)
    space = dict(space)
    if heads_spec is not None and heads_spec.type == "randint" and grid_spec is None:
        grid = grids[0]
        divisors = [k for k in _values_of(heads_key, heads_spec, 0) if k > 0 and grid % k == 0]
        if not divisors:
            raise ConfigError(f"search_space.{heads_key}: no value in [{heads_spec.low}, {heads_spec.high}] "
                              f"divides model.grid_size={grid}")
        logger.info("%s: sampling from the divisors of model.grid_size=%d in range: %s", heads_key, grid, divisors)
        space[heads_key] = ParamSpec(type="choice", values=divisors)
        return space
    heads = _values_of(heads_key, heads_spec, base.model.attn_heads)
    bad = sorted({(g, k) for g in grids for k in heads if k <= 0 or g % k})
    if bad:
        pairs = ", ".join(f"grid_size {g} / attn_heads {k}" for g, k in bad)
        raise ConfigError(f"search_space: model.grid_size must be divisible by model.attn_heads (K), not for: "
                          f"{pairs}; sample K from the divisors of the grid size")
    return space


def check_search_space(space: Dict[str, ParamSpec], base: KnowFreeConfig, search_alg: Optional[str]) -> Dict[str, ParamSpec]:
    """Refuse unknown keys, wrong types, data keys and impossible K before any trial starts."""
    for key, spec in space.items():
        if key.startswith(DATA_KEYS):
            raise ConfigError(f"search_space.{key}: the data is prepared once for every trial; "
                              "search model/encoder/train keys only")
        if search_alg == "optuna" and spec.type == "grid":
            raise ConfigError(f"search_space.{key}: Optuna cannot take grid samplers (use choice)")
        for value in _candidates(key, spec):
            _check_key(base, key, value)
        if spec.type in ("uniform", "loguniform"):
            try:
                _check_key(base, key, 0.5)
            except ConfigError:
                raise ConfigError(f"search_space.{key} is an integer: use randint or choice, not {spec.type}") from None
    space = constrain_attn_heads(space, base)
    for key, spec in space.items():
        if key not in ("model.attn_heads", "model.grid_size"):  # those two are checked together above
            for value in _candidates(key, spec):
                apply_params(base, {key: value})  # e.g. model.decode values, checked by validate_config
    return space


def _check_key(base: KnowFreeConfig, key: str, value: Any) -> None:
    """The key exists in the train config and takes this value's type."""
    merged = OmegaConf.structured(base)
    if OmegaConf.select(merged, key, default=_ABSENT) is _ABSENT:
        raise ConfigError(f"search_space: {key!r} is not a key of the train config")
    try:
        OmegaConf.update(merged, key, value, merge=False)
    except OmegaConfBaseException as error:
        raise ConfigError(f"search_space key {key!r} with value {value!r}: {error}") from error


_ABSENT = object()


def to_param_space(space: Dict[str, ParamSpec]) -> dict[str, Any]:
    from ray import tune

    samplers = {
        "choice": lambda s: tune.choice(list(s.values)),
        "grid": lambda s: tune.grid_search(list(s.values)),
        "uniform": lambda s: tune.uniform(float(s.low), float(s.high)),
        "loguniform": lambda s: tune.loguniform(float(s.low), float(s.high)),
        "randint": lambda s: tune.randint(int(s.low), int(s.high) + 1),  # Tune's high is exclusive
    }
    return {key: samplers[spec.type](spec) for key, spec in space.items()}


# ---------------------------------------------------------------------------- trials
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

    from .train import epoch_metrics

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

    from .train import make_trainer

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


# ---------------------------------------------------------------------------- driver
@dataclass
class TuneSummary:
    output_dir: Path
    rows: list[dict]  # sorted by dev F1, best first
    best: Optional[dict]
    best_metrics: Optional[dict]
    errors: int


def _tune_config_objects(job: TuneJobConfig, base: KnowFreeConfig):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    settings = job.scheduler
    if settings.name == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            metric=settings.metric,
            mode=settings.mode,
            max_t=settings.max_t or base.train.epochs,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    if job.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ConfigError("search_alg: optuna needs Optuna: pip install 'knowfree[tune]'") from error
        # The trial's best dev F1 so far: an ASHA-stopped trial is judged by its best epoch.
        search_alg = OptunaSearch(metric="best_dev_f1", mode="max", seed=job.seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=job.seed)
    return tune.TuneConfig(
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=job.num_samples,
        max_concurrent_trials=job.max_concurrent_trials,
    )


def _record_search(job: TuneJobConfig, out: Path, restoring: bool) -> None:
    """Keep the job config next to the experiment; a restore must not change the search."""
    saved = out / "tune_config.yaml"
    current = structured_to_dict(job)
    if restoring and saved.is_file():
        previous = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        changed = [key for key in SEARCH_DEFINITION if previous.get(key) != current.get(key)]  # type: ignore[union-attr]
        if changed:
            raise ConfigError(f"{out / EXPERIMENT} holds an experiment with another search (changed: "
                              f"{', '.join(changed)}); choose a new output_dir or delete {out}")
    saved.write_text(OmegaConf.to_yaml(OmegaConf.create(current)), encoding="utf-8")


def _cpus_at_once(job: TuneJobConfig, base: KnowFreeConfig) -> float:
    """CPU slots one trial needs (a local cluster gets at least that many)."""
    if job.trial_runner == "function":
        return job.resources_per_trial.cpu
    from .train import worker_resources

    return job.driver_cpu + base.ray_train.num_workers * worker_resources(base).get("CPU", 0.0)


def run_tune(job: TuneJobConfig) -> TuneSummary:
    """Run (or restore and finish) the search; write the tables, the best config and the best
    trial's evaluation."""
    from ray import tune

    out = Path(job.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    experiment = out / EXPERIMENT
    restoring = tune.Tuner.can_restore(experiment)

    base = load_config(job.train_config, list(job.train_overrides))
    if not base.data.dev and base.data.dev_from_train is None:
        raise ConfigError("the objective is dev F1: the train config needs data.dev or data.dev_from_train")
    # Trials run in Tune's trial folders (another working directory): absolute paths only.
    if base.encoder.name and Path(base.encoder.name).exists():
        base.encoder.name = str(Path(base.encoder.name).resolve())
    space = check_search_space(dict(job.search_space), base, job.search_alg)
    _record_search(job, out, restoring)

    # Once for every trial (a changed base config with an existing experiment is refused here).
    (out / "data").mkdir(exist_ok=True)
    data = prepare_data(base, out / "data", has_checkpoint=restoring)
    if not data.dev:
        raise ConfigError(f"the dev set ({base.data.dev or 'data.dev_from_train'}) has no sentences: the objective is dev F1")
    setup = TrialSetup(
        base=base,
        data=replace(data, test=[]),  # nothing about test during the search
        trials_dir=str(out / "trials"),
        cpus=job.resources_per_trial.cpu,
        fail_after_epoch=fail_after_epoch(),
    )
    init_ray(job.ray, min_cpus=_cpus_at_once(job, base))

    trainable = make_trainable(job, setup)
    if restoring:
        logger.info("restoring the experiment in %s: unfinished and errored trials continue", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_param_space(space),
            tune_config=_tune_config_objects(job, base),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=str(out),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=job.checkpoints_to_keep),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    return summarise(job, base, data, grid, out, list(space))


# ---------------------------------------------------------------------------- results
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
        row[key] = _plain(result.config.get(key))
    row["test_f1"] = None
    row["seconds"] = round(float(result.metrics.get("time_total_s", 0.0) or 0.0), 1)
    return row


def _trial_id(result) -> str:
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return str(trial_id)
    return Path(result.path).name  # a trial that never reported


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


def summarise(job: TuneJobConfig, base: KnowFreeConfig, data: PreparedData, grid, out: Path,
              keys: list[str]) -> TuneSummary:
    max_t = job.scheduler.max_t or base.train.epochs
    results = list(grid)
    rows = [result_row(result, keys, max_t) for result in results]
    by_id = {row["trial_id"]: result for row, result in zip(rows, results)}
    # Dev F1 is maximised whatever the scheduler's metric; ties: fewer epochs, then trial id.
    rows.sort(key=lambda r: (r["dev_f1"] is None, -(r["dev_f1"] or 0.0), r["epochs"] or 0, r["trial_id"]))
    errors = sum(1 for result in results if result.error)

    best, best_metrics = None, None
    candidates = [row for row in rows if row["dev_f1"] is not None]
    if candidates:
        best = candidates[0]
        best_metrics = _cached_best_metrics(out, best["trial_id"])
        if best_metrics is None:
            best_metrics = evaluate_best_trial(job, base, data, by_id[best["trial_id"]], best, out)
        best["test_f1"] = best_metrics.get("test", {}).get("f1")
        best["dev_f1_at_threshold"] = best_metrics.get("dev", {}).get("f1")
        write_best_config(base, best, keys, out)
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    write_tables(rows, keys, out)
    summary = {"trials": len(rows), "errors": errors, "best": best,
               "best_trial_dir": str(out / "best_trial") if best else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return TuneSummary(output_dir=out, rows=rows, best=best, best_metrics=best_metrics, errors=errors)


def _cached_best_metrics(out: Path, trial_id: str) -> Optional[dict]:
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


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.tune`` (its options: jobs/cli.py); a user error is raised."""
    return TUNE.run(argv)


if __name__ == "__main__":
    # TUNE's handler imports jobs.tune: Ray pickles the trainables by reference to that module,
    # not to __main__.
    raise SystemExit(commandline.main(TUNE))
