"""The Ray jobs' command lines, and the ``knowfree`` console script.

Each job is declared once here, with the library's builder (``knowfree_core.commandline``):
``python -m jobs.NAME`` runs it alone, and ``knowfree`` is the library's commands
(``knowfree_core.cli``) plus ``knowfree pipeline``. The handlers import their job when they
run: ``knowfree sample`` does not pay for torch, and the job's functions that Ray ships to
workers belong to the module ``jobs.NAME`` (or ``knowfree_jobs.NAME``), never to ``__main__``.
A job that finds no Ray says so in one line (``jobs.common.init_ray``).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from knowfree_core import cli as core_cli
from knowfree_core import commandline
from knowfree_core.commandline import Command, ConfigOptions, add_override_flag


def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def _annotate(args: argparse.Namespace) -> int:
    from .annotate import load_job_config, run_annotation

    run_annotation(load_job_config(args.config, args.overrides))
    return 0


def _merge_labels(args: argparse.Namespace) -> int:
    from knowfree_core.config import load_structured

    from .merge_labels import MergeJobConfig, run_merge

    run_merge(load_structured(MergeJobConfig, args.config, args.overrides))
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from .synthesize import load_job_config, run_synthesis

    run_synthesis(load_job_config(args.config, args.overrides))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predict import load_job_config, run_prediction

    run_prediction(load_job_config(args.config, args.overrides))
    return 0


def _pipeline_options(parser: argparse.ArgumentParser) -> None:
    add_override_flag(parser, "--variant", "variant",
                      help="overrides the config's variant: F, FS, FU, FSU, noext, biaffine, an ablation "
                           "(F-noent, F-nopos, F-nomerge, F-cnn) or a custom one")


def _pipeline(args: argparse.Namespace) -> int:
    from knowfree_core.config import load_structured

    from .pipeline import PipelineConfig, run_pipeline

    run_pipeline(load_structured(PipelineConfig, args.config, args.overrides))
    return 0


def _train_options(parser: argparse.ArgumentParser) -> None:
    add_override_flag(parser, "--workers", "ray_train.num_workers", type=int, help="ray_train.num_workers")
    add_override_flag(parser, "--gpu", "ray_train.use_gpu", value="true",
                      help="ray_train.use_gpu=true (NCCL, one GPU per worker)")
    add_override_flag(parser, "--cpus-per-worker", "ray_train.resources_per_worker.CPU", type=float,
                      help="ray_train.resources_per_worker.CPU")
    add_override_flag(parser, "--storage-path", "ray_train.storage_path",
                      help="ray_train.storage_path: a folder or a bucket URI")
    add_override_flag(parser, "--max-failures", "ray_train.max_failures", type=int, help="ray_train.max_failures")
    _address_option(parser)


def _train(args: argparse.Namespace) -> int:
    from knowfree_core.config import load_config
    from knowfree_core.run import print_run_summary

    from .common import RayConfig
    from .train import run_ray_training

    summary = run_ray_training(load_config(args.config, args.overrides), RayConfig(address=args.address))
    print_run_summary(summary)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .tune import load_tune_config, print_summary, run_tune

    job = load_tune_config(args.config, args.overrides)
    if args.address:
        job.ray.address = args.address
    summary = run_tune(job)
    print_summary(summary)
    return 1 if summary.errors else 0


ANNOTATE = Command("annotate", "Label extension annotation (pipeline 1) with Ray Data", _annotate,
                   config=ConfigOptions())
MERGE_LABELS = Command("merge_labels", "Synonym extension-label merging with sentence embeddings and FAISS",
                       _merge_labels, config=ConfigOptions())
SYNTHESIZE = Command("synthesize", "Enriched explanation synthesis (pipeline 2) with Ray Data", _synthesize,
                     config=ConfigOptions())
PREDICT = Command("predict", "Label a large input with a saved KnowFREE model in a pool of Ray actors", _predict,
                  config=ConfigOptions())
PIPELINE = Command(
    "pipeline", "the main job on Ray: annotate → merge → train (F), + synthesize → retrain (FS), + self-train on a pool (FU); see jobs.pipeline",
    _pipeline, _pipeline_options,
    config=ConfigOptions(required=True, help="pipeline YAML config (e.g. configs/demo-pipeline.yaml)",
                         set_help="override a pipeline config key, e.g. --set grid.seeds=[1,2,3] (repeatable)"),
)
TRAIN = Command("train", "Train KnowFREE with Ray Train (DDP over workers); the flags win over --set", _train,
                _train_options, config=ConfigOptions())
TUNE = Command("tune", "Search KnowFREE hyper-parameters with Ray Tune (objective: dev F1)", _tune, _address_option,
               config=ConfigOptions(required=True, help="Tune job YAML config (e.g. configs/tune-weibo-250.yaml)"))

#: ``knowfree``'s commands: the library's, and the main job.
KNOWFREE_COMMANDS: tuple[Command, ...] = (*core_cli.COMMANDS, PIPELINE)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``knowfree`` console script."""
    return commandline.main(KNOWFREE_COMMANDS, argv, prog="knowfree",
                            description="KnowFREE: train, evaluate and predict here; the main job on Ray")
