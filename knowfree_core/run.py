"""One training run from a config: data → (sample) → (offline extension labels) → fit → evaluate.

This is what ``knowfree train`` executes, and what the Ray jobs call per trial/worker. A run
folder holds everything a user needs to inspect or reuse the run:

    run_dir/
      config.yaml          the resolved configuration
      train.log            human-readable log
      history.jsonl        one EpochReport per line
      train_data.jsonl     the training sentences actually used (subset + extension labels)
      model/               the best-dev model (see KnowFreeModel.save_pretrained)
      metrics.json         dev and test P/R/F1 of that model, with per-label rows
      checkpoint/last.pt   the training loop's state after the last finished epoch (resume)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from .annotators import apply_annotations, get_annotator
from .config import KnowFreeConfig, config_to_dict, load_config, save_config
from .errors import ConfigError, DataFormatError
from .formats import read_dataset, write_dataset
from .labels import LabelVocab
from .loop_state import LoopState
from .model.knowfree import KnowFreeModel
from .records import Sentence
from .sampling import greedy_k_shot, hold_out, many_shot_subsets
from .training import (
    EpochCallback,
    TrainResult,
    evaluate,
    fit,
    peak_rss_mib,
    seed_everything,
    tune_threshold,
)

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_dir: Path
    metrics: dict


def load_split(config: KnowFreeConfig, path: Optional[str]) -> list[Sentence]:
    if not path:
        return []
    return read_dataset(path, format=config.data.format, **dict(config.data.read_options or {}))


def load_pool_and_dev(config: KnowFreeConfig) -> tuple[list[Sentence], list[Sentence]]:
    """The training pool and the dev set: ``data.dev``, or ``data.dev_from_train`` sentences
    held out of the training file (then the pool is the rest)."""
    pool = load_split(config, config.data.train)
    if config.data.dev_from_train is None:
        return pool, load_split(config, config.data.dev)
    try:
        return hold_out(pool, config.data.dev_from_train, seed=config.data.dev_seed)
    except ValueError as error:
        raise ConfigError(f"data.dev_from_train with {config.data.train}: {error}") from None


def select_training_sentences(config: KnowFreeConfig, pool: list[Sentence]) -> list[Sentence]:
    data = config.data
    if data.subset_size is not None:
        return many_shot_subsets(pool, sizes=(data.subset_size,), seed=data.subset_seed)[data.subset_size]
    if data.k_shot is not None:
        return greedy_k_shot(pool, k=data.k_shot, seed=data.subset_seed)
    return pool


def annotate_with(
    names: Sequence[str], sentences: list[Sentence], steps: Sequence[str]
) -> tuple[list[Sentence], dict[str, tuple[int, int]]]:
    """Run each offline annotator in turn; returns the sentences and, per annotator,
    (extension spans added, words rejected because they could not be aligned)."""
    counts: dict[str, tuple[int, int]] = {}
    for name in names:
        results = get_annotator(name).annotate(sentences, steps=tuple(steps))
        counts[name] = (sum(len(r.spans) for r in results), sum(len(r.rejections) for r in results))
        if counts[name][1]:
            logger.warning("annotator %s: %d words could not be aligned and were rejected", name, counts[name][1])
        sentences = apply_annotations(sentences, results)
    return sentences, counts


def add_extension_labels(config: KnowFreeConfig, sentences: list[Sentence]) -> list[Sentence]:
    """Run the configured offline annotators and keep the configured extension sources."""
    sentences, _ = annotate_with(config.data.annotators, sentences, config.data.annotation_steps)
    keep = tuple(config.data.extension_sources)
    if keep:
        sentences = [
            replace(s, extension_spans=[e for e in s.extension_spans if e.source.startswith(keep)]) for s in sentences
        ]
    return sentences


# Settings that change where and how fast a run executes, not what it computes: a run may be
# resumed with other values (e.g. more threads once the machine is free).
RESUMABLE_CHANGES = frozenset({"train.num_threads", "train.device", "train.eval_batch_size"})
UNCOMPARED_SECTIONS = frozenset({"ray_train"})


def _refuse_resume_with_another_config(
    config: KnowFreeConfig, run_dir: Path, has_checkpoint: Optional[bool] = None
) -> None:
    """A checkpoint resumes only the run that wrote it: a changed config must not inherit it.

    ``has_checkpoint``: whether a checkpoint of this run exists (None: ``checkpoint/last.pt``).
    The ``ray_train`` section (where and on how many workers) is not compared.
    """
    where = "its checkpoints"
    if has_checkpoint is None:
        has_checkpoint = (run_dir / "checkpoint" / "last.pt").is_file()
        where = str(run_dir / "checkpoint")
    if not has_checkpoint or not (run_dir / "config.yaml").is_file():
        return
    previous = config_to_dict(load_config(run_dir / "config.yaml"))
    current = config_to_dict(config)
    changed = sorted(
        f"{section}.{key}"
        for section, values in current.items() if isinstance(values, dict) and section not in UNCOMPARED_SECTIONS
        for key, value in values.items()
        if previous.get(section, {}).get(key) != value and f"{section}.{key}" not in RESUMABLE_CHANGES
    )
    if changed:
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a run with another configuration (changed: "
            f"{', '.join(changed)}); choose a new output_dir or delete {where}"
        )


def _keep_history_of_checkpoint(history_path: Path, checkpoint_path: Path) -> None:
    """On resume keep the epochs the checkpoint holds; on a fresh start begin an empty history."""
    kept: list[str] = []
    if checkpoint_path.is_file() and history_path.is_file():
        last = LoopState.load(checkpoint_path).epoch
        kept = [
            line for line in history_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["epoch"] <= last
        ]
    history_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def attach_file_log(run_dir: Path) -> logging.Handler:
    """Copy the library's log to ``run_dir/train.log``; remove the handler when done."""
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("knowfree_core").addHandler(handler)
    return handler


def run_training(
    config: KnowFreeConfig, callback: EpochCallback | None = None, progress: bool = True
) -> RunSummary:
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = attach_file_log(run_dir)
    try:
        return _run(config, run_dir, callback, progress)
    finally:
        logging.getLogger("knowfree_core").removeHandler(handler)
        handler.close()


@dataclass
class PreparedData:
    """A run's sentences (training subset with its extension labels) and label vocabulary."""

    train: list[Sentence]
    dev: list[Sentence]
    test: list[Sentence]
    vocab: LabelVocab


def prepare_data(config: KnowFreeConfig, run_dir: Path, has_checkpoint: Optional[bool] = None) -> PreparedData:
    """Read the splits, take the training subset, add extension labels, build the vocabulary;
    writes config.yaml and train_data.jsonl to ``run_dir``. Resolves ``encoder.unit_mode``.
    A run folder whose checkpoint came from another configuration is refused."""
    pool, dev = load_pool_and_dev(config)
    train = select_training_sentences(config, pool)
    if not train:
        raise DataFormatError(str(config.data.train), None, "no training sentences", "at least one sentence")
    limit = config.data.max_train_units
    too_long = [s for s in train if limit is not None and len(s) > limit]
    if too_long:
        logger.warning(
            "%s: %d training sentence(s) longer than data.max_train_units=%d left out (e.g. %s, %d units)",
            config.data.train, len(too_long), limit, too_long[0].id, len(too_long[0]),
        )
        train = [s for s in train if limit is None or len(s) <= limit]
    test = load_split(config, config.data.test)
    if config.encoder.unit_mode == "auto":
        config.encoder.unit_mode = "word" if train and train[0].joiner == " " else "char"
    _refuse_resume_with_another_config(config, run_dir, has_checkpoint)
    save_config(config, run_dir / "config.yaml")
    if config.model.use_extension_labels:
        train = add_extension_labels(config, train)
    else:
        train = [replace(s, extension_spans=[]) for s in train]
    write_dataset(train, run_dir / "train_data.jsonl")
    logger.info("data: %d train, %d dev, %d test sentences", len(train), len(dev), len(test))

    vocab = LabelVocab.from_sentences(
        train,
        include_extensions=config.model.use_extension_labels,
        min_count=config.data.min_extension_count,
    )
    logger.info("labels: %d target, %d extension", vocab.num_targets, vocab.num_extensions)
    return PreparedData(train=train, dev=dev, test=test, vocab=vocab)


def build_model(config: KnowFreeConfig, vocab: LabelVocab) -> KnowFreeModel:
    seed_everything(config.train.seed)  # the head's initial weights come from this seed
    return KnowFreeModel.build(config.encoder, config.model, vocab)


def export_model(
    config: KnowFreeConfig,
    model: KnowFreeModel,
    result: TrainResult,
    data: PreparedData,
    out_dir: Path,
    started: float,
    progress: bool = True,
) -> dict:
    """After ``fit``: choose the decision threshold on dev, save the model to
    ``out_dir/model`` and its dev/test scores to ``out_dir/metrics.json``; returns the metrics."""
    dev, test = data.dev, data.test
    threshold_scores = None
    if dev and config.train.threshold_candidates:
        best, threshold_scores = tune_threshold(
            model, dev, config.train.threshold_candidates, config.train.eval_batch_size
        )
        logger.info("decision threshold %.2f chosen on dev (dev F1 by threshold: %s)", best,
                    ", ".join(f"{t:.2f}: {f:.4f}" for t, f in threshold_scores.items()))
    model.save_pretrained(out_dir / "model")

    metrics: dict = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_sentences": len(data.train),
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_per_epoch": round(
            sum(r.seconds for r in result.history) / max(1, len(result.history)), 1
        ),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "threshold": model.config.threshold,
        "dev_f1_by_threshold": threshold_scores,
    }
    for name, split in (("dev", dev), ("test", test)):
        if split:
            metrics[name] = evaluate(model, split, config.train.eval_batch_size, progress=progress).to_dict()
    metrics["config"] = config_to_dict(config)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    return metrics


def _run(config: KnowFreeConfig, run_dir: Path, callback: EpochCallback | None, progress: bool) -> RunSummary:
    started = time.perf_counter()
    data = prepare_data(config, run_dir)
    model = build_model(config, data.vocab)

    history_path = run_dir / "history.jsonl"
    checkpoint_path = run_dir / "checkpoint" / "last.pt"
    _keep_history_of_checkpoint(history_path, checkpoint_path)

    def record(report, current_model):
        with history_path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
        return callback(report, current_model) if callback else None

    result = fit(model, data.train, data.dev or None, config.train, callback=record, progress=progress,
                 checkpoint_path=checkpoint_path)
    metrics = export_model(config, model, result, data, run_dir, started, progress)
    return RunSummary(run_dir=run_dir, metrics=metrics)


def print_run_summary(summary: RunSummary) -> None:
    """What ``knowfree train`` and ``jobs.train`` print at the end: the folder and the scores."""
    print(f"run folder: {summary.run_dir}")
    for split in ("dev", "test"):
        if split in summary.metrics:
            m = summary.metrics[split]
            print(f"{split:5s} P {m['precision']:.4f}  R {m['recall']:.4f}  F1 {m['f1']:.4f}")
