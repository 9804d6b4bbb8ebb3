"""The training loop: plain PyTorch, reporting through a callback.

It knows nothing about Ray: ``jobs/train.py`` runs the same loop inside Ray Train by passing
a callback that calls ``ray.train.report``. The checkpoint that is kept is the one with the
best *dev* F1 (never test), as the paper's evaluation protocol requires.
"""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .metrics import SpanScores, score_spans
from .model.knowfree import KnowFreeModel
from .records import Sentence

logger = logging.getLogger(__name__)


@dataclass
class EpochReport:
    """What the loop tells its callback after every epoch."""

    epoch: int
    train_loss: float
    seconds: float
    peak_rss_mib: float
    dev: Optional[dict] = None  # SpanScores.to_dict() on the dev set, when there is one
    dev_f1: Optional[float] = None
    best_dev_f1: Optional[float] = None
    best_epoch: Optional[int] = None
    is_best: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    best_epoch: int
    best_dev_f1: Optional[float]
    history: list[EpochReport] = field(default_factory=list)


# A callback may return True to stop training early (e.g. a scheduler decided to stop the trial).
EpochCallback = Callable[[EpochReport, KnowFreeModel], Optional[bool]]


def seed_everything(seed: int) -> None:
    """Seed every generator training touches, so a run is reproducible on one machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux: the process's high-water mark, which is what a user sizing a
    # machine needs to know.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def length_bucketed_batches(
    sentences: Sequence[Sentence], batch_size: int, rng: random.Random, bucket_batches: int = 20
) -> Iterator[list[Sentence]]:
    """Shuffle, then sort inside buckets of a few batches by length.

    The span grid is L x L per sentence, so padding a 20-character sentence to 150 wastes
    ~50x the work; sorting inside buckets keeps most of the randomness while padding little.
    """
    order = list(range(len(sentences)))
    rng.shuffle(order)
    bucket = batch_size * bucket_batches
    batches: list[list[Sentence]] = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: len(sentences[i]))
        batches.extend(
            [sentences[i] for i in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size)
        )
    rng.shuffle(batches)
    yield from batches


def build_optimizer(model: KnowFreeModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with separate learning rates for the encoder and the rest (paper App. H)."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "encoder" if name.startswith("encoder.") else "head"
        # Biases and normalisation weights are not decayed: decay there only hurts.
        decay = parameter.ndim > 1
        groups.setdefault((part, decay), []).append(parameter)
    lr = {"encoder": config.encoder_lr, "head": config.head_lr}
    param_groups = [
        {
            "params": params,
            "lr": lr[part],
            "weight_decay": config.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups)


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(
    model: KnowFreeModel, sentences: Sequence[Sentence], batch_size: int = 32, progress: bool = False
) -> SpanScores:
    """Span-level micro P/R/F1 of the model's predictions against the sentences' target spans."""
    predictions = model.predict(sentences, batch_size=batch_size, progress=progress)
    return score_spans([s.spans for s in sentences], predictions)


def tune_threshold(
    model: KnowFreeModel, dev: Sequence[Sentence], candidates: Sequence[float], batch_size: int = 32
) -> tuple[float, dict[float, float]]:
    """The decision threshold with the best dev F1 (ties go to the one nearest 0.5).

    A model trained on a few hundred sentences is often precise but shy (few cells pass
    0.5); choosing the threshold on dev trades some precision for recall without touching
    test data. The model's threshold is set to the winner.
    """
    logits = model.target_logits(dev, batch_size)
    gold = [s.spans for s in dev]
    scores = {float(t): score_spans(gold, model.decode(logits, threshold=t)).f1 for t in candidates}
    best = max(scores, key=lambda t: (scores[t], -abs(t - 0.5)))
    model.config.threshold = best
    return best, scores


def save_training_state(path: str | Path, state: dict) -> None:
    """Write the loop state atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_training_state(path: str | Path) -> dict:
    # weights_only: tensors, numbers, strings and containers only; a checkpoint file cannot run code.
    return torch.load(path, map_location="cpu", weights_only=True)


def _as_random_state(state) -> tuple:
    # random.Random.setstate wants tuples; a round trip through the checkpoint may give lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Frozen parameters (the e5 word-embedding table is 96M of its 118M) never change, so the
    # best-epoch snapshot only needs what training touches.
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {
        name: tensor.detach().to("cpu", copy=True)
        for name, tensor in model.state_dict().items()
        if name in keep
    }


def fit(
    model: KnowFreeModel,
    train: Sequence[Sentence],
    dev: Sequence[Sentence] | None,
    config: TrainConfig,
    callback: EpochCallback | None = None,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best dev epoch.

    Without a dev set the last epoch is kept (and the report says so). With
    ``checkpoint_path`` the loop's whole state is saved after every epoch and, when the file
    already exists, training resumes after its last finished epoch: an interrupted run started
    again with the same command continues instead of starting over, and ends with the same
    weights as an uninterrupted one.
    """
    if not train:
        raise ValueError("the training set is empty")
    seed_everything(config.seed)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    model.to(device)
    rng = random.Random(config.seed)

    optimizer = build_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = linear_warmup_decay(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    history: list[EpochReport] = []
    best_f1: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    epochs_without_gain = 0
    first_epoch = 1
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = load_training_state(checkpoint_path)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.setstate(_as_random_state(state["batch_rng"]))
        torch.set_rng_state(state["torch_rng"])
        history = [EpochReport(**report) for report in state["history"]]
        best_f1, best_epoch, best_state = state["best_f1"], state["best_epoch"], state["best_state"]
        epochs_without_gain = state["epochs_without_gain"]
        first_epoch = state["epoch"] + 1
        logger.info("resuming from %s after epoch %d", checkpoint_path, state["epoch"])

    for epoch in range(first_epoch, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        total_loss, batches = 0.0, 0
        bar = tqdm(
            list(length_bucketed_batches(train, config.batch_size, rng)),
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not progress,
            leave=False,
        )
        for batch in bar:
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], config.grad_clip
                )
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach())
            batches += 1
            bar.set_postfix(loss=f"{total_loss / batches:.4f}")
        bar.close()

        report = EpochReport(
            epoch=epoch,
            train_loss=total_loss / max(1, batches),
            seconds=time.perf_counter() - started,
            peak_rss_mib=peak_rss_mib(),
        )
        if dev:
            scores = evaluate(model, dev, config.eval_batch_size, progress=progress)
            report.dev = scores.to_dict()
            report.dev_f1 = scores.f1
            if best_f1 is None or scores.f1 > best_f1:
                best_f1, best_epoch = scores.f1, epoch
                best_state = _trainable_state(model)
                report.is_best = True
                epochs_without_gain = 0
            else:
                epochs_without_gain += 1
        else:
            best_epoch, report.is_best = epoch, True
        report.best_dev_f1, report.best_epoch = best_f1, best_epoch
        history.append(report)
        logger.info(
            "epoch %d loss %.4f dev F1 %s best %s (epoch %d) %.1fs",
            epoch,
            report.train_loss,
            "-" if report.dev_f1 is None else f"{report.dev_f1:.4f}",
            "-" if best_f1 is None else f"{best_f1:.4f}",
            best_epoch,
            report.seconds,
        )
        if checkpoint_path is not None:
            save_training_state(
                checkpoint_path,
                {
                    "epoch": epoch,
                    "model": _trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "batch_rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                    "history": [r.to_dict() for r in history],
                    "best_f1": best_f1,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "epochs_without_gain": epochs_without_gain,
                },
            )
        stop = callback(report, model) if callback else None
        if stop:
            break
        if config.patience is not None and epochs_without_gain >= config.patience:
            logger.info("no dev F1 gain for %d epochs: stopping", epochs_without_gain)
            break

    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return TrainResult(best_epoch=best_epoch, best_dev_f1=best_f1, history=history)
