"""The search itself: the base config and the data prepared once, the Tune experiment started
or restored, then the results summarised (tables, best trial, best config)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from ..common import init_ray
from ..fault_injection import fail_after_epoch
from .best_trial import cached_best_metrics, evaluate_best_trial, write_best_config
from .report import TuneSummary, result_row, write_tables
from .restore import EXPERIMENT, check_restorable, mark_experiment, save_job_config, seal_experiment
from .schema import TuneJobConfig
from .search_space import check_search_space, to_param_space
from .trials import TrialSetup, make_trainable
from knowfree_core.config import KnowFreeConfig, load_config
from knowfree_core.errors import ConfigError
from knowfree_core.run import PreparedData, prepare_data

logger = logging.getLogger("jobs.tune")


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


def _cpus_at_once(job: TuneJobConfig, base: KnowFreeConfig) -> float:
    """CPU slots one trial needs (a local cluster gets at least that many)."""
    if job.trial_runner == "function":
        return job.resources_per_trial.cpu
    from ..train import worker_resources

    return job.driver_cpu + base.ray_train.num_workers * worker_resources(base).get("CPU", 0.0)


def run_tune(job: TuneJobConfig) -> TuneSummary:
    """Run (or restore and finish) the search; write the tables, the best config and the best
    trial's evaluation."""
    from ray import tune

    out = Path(job.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    experiment = out / EXPERIMENT
    restoring = tune.Tuner.can_restore(experiment)  # only looks for tuner.pkl; unpickles nothing
    if restoring:
        check_restorable(job, experiment)  # before Ray unpickles anything in the folder

    base = load_config(job.train_config, list(job.train_overrides))
    if not base.data.dev and base.data.dev_from_train is None:
        raise ConfigError("the objective is dev F1: the train config needs data.dev or data.dev_from_train")
    # Trials run in Tune's trial folders (another working directory): absolute paths only.
    if base.encoder.name and Path(base.encoder.name).exists():
        base.encoder.name = str(Path(base.encoder.name).resolve())
    space = check_search_space(dict(job.search_space), base, job.search_alg)
    save_job_config(job, out)

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
    init_ray(job.ray, min_cpus=_cpus_at_once(job, base),
             settings="resources_per_trial.cpu (ray_train trials: driver_cpu, the train config's ray_train.num_workers)")

    trainable = make_trainable(job, setup)
    if restoring:
        logger.info("restoring the experiment in %s: unfinished and errored trials continue", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        mark_experiment(job, experiment)
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
    try:
        grid = tuner.fit()
    finally:  # also after a failed fit: the rerun that resumes it checks tuner.pkl's mode
        seal_experiment(experiment)
    return summarise(job, base, data, grid, out, list(space))


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
        best_metrics = cached_best_metrics(out, best["trial_id"])
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

