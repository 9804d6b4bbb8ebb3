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

Modules: ``schema`` (this config), ``search_space`` (checks and samplers), ``trials`` (the two
trial runners), ``restore`` (the guard against restoring another search), ``driver`` (the
search), ``best_trial`` (the best trial's evaluation and config), ``report`` (the tables).
"""

from __future__ import annotations

from ..cli import TUNE
from ..fault_injection import FAIL_MARKER
from .best_trial import evaluate_best_trial, write_best_config
from .driver import run_tune, summarise
from .report import TuneSummary, print_summary, result_row, write_tables
from .schema import ParamSpec, SchedulerConfig, TrialResources, TuneJobConfig, load_tune_config
from .search_space import apply_params, check_search_space, constrain_attn_heads, to_param_space
from .trials import TrialSetup, function_trial, make_trainable, ray_train_trial, trial_config

__all__ = [
    "FAIL_MARKER", "ParamSpec", "SchedulerConfig", "TrialResources", "TrialSetup", "TuneJobConfig",
    "TuneSummary", "apply_params", "check_search_space", "constrain_attn_heads", "evaluate_best_trial",
    "function_trial", "load_tune_config", "main", "make_trainable", "print_summary", "ray_train_trial",
    "result_row", "run_tune", "summarise", "to_param_space", "trial_config", "write_best_config",
    "write_tables",
]


#: ``python -m jobs.tune`` in this process (its options: jobs/cli.py); a user error is raised.
main = TUNE.run
