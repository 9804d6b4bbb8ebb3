"""The training loop: plain PyTorch, reporting through a callback.

It knows nothing about Ray: ``jobs/train.py`` runs the same loop on every Ray Train worker,
passing a ``DistributedContext`` (``knowfree_core.distributed``: DDP, batch shards, a report
hook that receives the loop state for ``ray.train.report``). The checkpoint that is kept is the one with the
best *dev* F1 (never test), as the paper's evaluation protocol requires.
"""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .distributed import DistributedContext, shard_batches
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
    #: With ``train.select_on_thresholds``: the candidate threshold that gave ``dev``.
    dev_threshold: Optional[float] = None
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


def evaluate_thresholds(
    model: KnowFreeModel, sentences: Sequence[Sentence], candidates: Sequence[float], batch_size: int = 32
) -> dict[float, SpanScores]:
    """Scores at each candidate threshold from one forward pass (decoding is cheap)."""
    logits = model.target_logits(sentences, batch_size)
    gold = [s.spans for s in sentences]
    return {float(t): score_spans(gold, model.decode(logits, threshold=t)) for t in candidates}


def _best_threshold(scores: dict[float, float]) -> float:
    return max(scores, key=lambda t: (scores[t], -abs(t - 0.5)))


def tune_threshold(
    model: KnowFreeModel, dev: Sequence[Sentence], candidates: Sequence[float], batch_size: int = 32
) -> tuple[float, dict[float, float]]:
    """The decision threshold with the best dev F1 (ties go to the one nearest 0.5).

    A model trained on a few hundred sentences is often precise but shy (few cells pass
    0.5); choosing the threshold on dev trades some precision for recall without touching
    test data. The model's threshold is set to the winner.
    """
    scores = {t: score.f1 for t, score in evaluate_thresholds(model, dev, candidates, batch_size).items()}
    best = _best_threshold(scores)
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


def _restore(state: dict, model, optimizer, scheduler, scaler, rng: random.Random,
             ctx: DistributedContext, seed: int) -> None:
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng.setstate(_as_random_state(state["batch_rng"]))
    by_rank = state.get("torch_rng_by_rank")
    if by_rank is not None and len(by_rank) == ctx.world_size:
        torch.set_rng_state(by_rank[ctx.rank])
    elif ctx.rank == 0:
        torch.set_rng_state(state["torch_rng"])
    else:  # the world size changed: a fresh dropout stream per rank
        torch.manual_seed(seed + ctx.rank + 1000 * int(state["epoch"]))


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class OptimizationStep:
    """One optimisation step of :func:`fit`: loss under autocast, backward (scaled for fp16),
    gradient clipping, optimizer and scheduler step. ``bench/model_throughput.py`` times this
    same object, so the benchmark measures exactly what training runs.

    ``train.precision`` bf16/fp16 applies on a GPU only; on another device the step is fp32
    (with a warning). ``compute_loss`` defaults to ``model.loss``; ``fit`` swaps in the DDP
    wrapper once the model's state is restored.
    """

    def __init__(self, model: KnowFreeModel, config: TrainConfig, device: torch.device, total_steps: int):
        amp_dtype = AMP_DTYPES.get(config.precision)
        if amp_dtype is not None and device.type != "cuda":
            logger.warning("train.precision=%s applies on a GPU only: training in fp32 on %s", config.precision, device)
            amp_dtype = None
        self.amp_dtype = amp_dtype
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
        self.optimizer = build_optimizer(model, config)
        self.scheduler = linear_warmup_decay(self.optimizer, int(config.warmup_ratio * total_steps), total_steps)
        self.grad_clip = config.grad_clip
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.compute_loss: Callable[[list[Sentence]], torch.Tensor] = model.loss
        self.model = model
        self.total_steps = max(1, total_steps)

    def __call__(self, batch: list[Sentence]) -> torch.Tensor:
        """Train on ``batch``; returns the (detached) loss."""
        # The scheduler counts the steps taken (restored with it on resume): model.alpha_schedule
        # reads how far training is.
        self.model.training_progress = min(1.0, self.scheduler.last_epoch / self.total_steps)
        with torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext():
            loss = self.compute_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach()


def fit(
    model: KnowFreeModel,
    train: Sequence[Sentence],
    dev: Sequence[Sentence] | None,
    config: TrainConfig,
    callback: EpochCallback | None = None,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    distributed: DistributedContext | None = None,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best dev epoch.

    Without a dev set the last epoch is kept (and the report says so). With
    ``checkpoint_path`` the loop's whole state is saved after every epoch and, when the file
    already exists, training resumes after its last finished epoch: an interrupted run started
    again with the same command continues instead of starting over, and ends with the same
    weights as an uninterrupted one.

    ``distributed`` makes this call one worker of a data-parallel group (see
    ``knowfree_core.distributed``): each rank trains on its shard of the batches, DDP averages
    the gradients, rank 0 evaluates dev and writes ``checkpoint_path``, and
    ``distributed.report`` receives the loop state (on rank 0) after every epoch. ``callback``
    runs on every rank. ``train.precision`` bf16/fp16 trains under autocast on a GPU (fp16
    with a gradient scaler); on a CPU it trains in fp32.
    """
    if not train:
        raise ValueError("the training set is empty")
    ctx = distributed or DistributedContext()
    ctx.check()
    seed_everything(config.seed)
    if ctx.parallel:
        # Same batch order on every rank (the Python RNG), different dropout (torch's).
        torch.manual_seed(config.seed + ctx.rank)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = torch.device(ctx.device) if ctx.device else resolve_device(config.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    model.to(device)
    rng = random.Random(config.seed)

    steps_per_epoch = math.ceil(math.ceil(len(train) / config.batch_size) / ctx.world_size)
    step = OptimizationStep(model, config, device, total_steps=steps_per_epoch * config.epochs)

    history: list[EpochReport] = []
    best_f1: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    epochs_without_gain = 0
    first_epoch = 1
    state = ctx.resume_state
    source = "the given state"
    if state is None and checkpoint_path is not None and Path(checkpoint_path).is_file():
        state, source = load_training_state(checkpoint_path), str(checkpoint_path)
    if state is not None:
        _restore(state, model, step.optimizer, step.scheduler, step.scaler, rng, ctx, config.seed)
        history = [EpochReport(**report) for report in state["history"]]
        best_f1, best_epoch, best_state = state["best_f1"], state["best_epoch"], state["best_state"]
        epochs_without_gain = state["epochs_without_gain"]
        first_epoch = state["epoch"] + 1
        logger.info("resuming from %s after epoch %d", source, state["epoch"])

    # Rank 0 decides; the others must know whether a dev evaluation is coming.
    has_dev = ctx.broadcast(bool(dev))
    saving = checkpoint_path is not None or ctx.report is not None
    step.compute_loss = ctx.wrap(model)

    for epoch in range(first_epoch, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        total_loss, batches = 0.0, 0
        bar = tqdm(
            shard_batches(list(length_bucketed_batches(train, config.batch_size, rng)), ctx.rank, ctx.world_size),
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not (progress and ctx.is_main),
            leave=False,
        )
        for batch in bar:
            total_loss += float(step(batch))
            batches += 1
            bar.set_postfix(loss=f"{total_loss / batches:.4f}")
        bar.close()

        report = EpochReport(
            epoch=epoch,
            train_loss=ctx.mean(total_loss / max(1, batches)),
            seconds=time.perf_counter() - started,
            peak_rss_mib=peak_rss_mib(),
        )
        # An epoch between evaluations (train.eval_every) is never the best one: the kept
        # model is always one that was scored on dev. The last epoch is always evaluated.
        evaluate_now = epoch % max(1, config.eval_every) == 0 or epoch == config.epochs
        if has_dev and evaluate_now:
            scores = None
            if ctx.is_main and config.select_on_thresholds and config.threshold_candidates:
                # Few-shot models are shy: at 0.5 every epoch may score 0 and the first one
                # would be kept. Judge each epoch at its best dev threshold instead.
                by_threshold = evaluate_thresholds(model, dev, config.threshold_candidates, config.eval_batch_size)
                report.dev_threshold = _best_threshold({t: sc.f1 for t, sc in by_threshold.items()})
                scores = by_threshold[report.dev_threshold]
            elif ctx.is_main:
                scores = evaluate(model, dev, config.eval_batch_size, progress=progress)
            report.dev = ctx.broadcast(scores.to_dict() if scores is not None else None)
            report.dev_threshold = ctx.broadcast(report.dev_threshold)
            report.dev_f1 = report.dev["f1"]
            if best_f1 is None or report.dev_f1 > best_f1:
                best_f1, best_epoch = report.dev_f1, epoch
                best_state = _trainable_state(model)
                report.is_best = True
                epochs_without_gain = 0
            else:
                epochs_without_gain += 1
        elif not has_dev:
            best_epoch, report.is_best = epoch, True
        report.best_dev_f1, report.best_epoch = best_f1, best_epoch
        history.append(report)
        if ctx.is_main:
            logger.info(
                "epoch %d loss %.4f dev F1 %s best %s (epoch %d) %.1fs",
                epoch,
                report.train_loss,
                "-" if report.dev_f1 is None else f"{report.dev_f1:.4f}",
                "-" if best_f1 is None else f"{best_f1:.4f}",
                best_epoch,
                report.seconds,
            )
        loop_state = None
        if saving:
            # Every rank's dropout stream, so a resumed data-parallel run is the same run.
            torch_rng_by_rank = ctx.gather(torch.get_rng_state()) if ctx.parallel else None
            if ctx.is_main:
                loop_state = {
                    "epoch": epoch,
                    "model": _trainable_state(model),
                    "optimizer": step.optimizer.state_dict(),
                    "scheduler": step.scheduler.state_dict(),
                    "batch_rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                    "history": [r.to_dict() for r in history],
                    "best_f1": best_f1,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "epochs_without_gain": epochs_without_gain,
                }
                if step.scaler is not None:
                    loop_state["scaler"] = step.scaler.state_dict()
                if torch_rng_by_rank is not None:
                    loop_state["torch_rng_by_rank"] = torch_rng_by_rank
        if checkpoint_path is not None and loop_state is not None:
            save_training_state(checkpoint_path, loop_state)
        stop = ctx.report(report, model, loop_state) if ctx.report else None
        if callback and callback(report, model):
            stop = True
        if ctx.any(bool(stop)):
            break
        if config.patience is not None and epochs_without_gain >= config.patience:
            if ctx.is_main:
                logger.info("no dev F1 gain for %d epochs: stopping", epochs_without_gain)
            break

    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return TrainResult(best_epoch=best_epoch, best_dev_f1=best_f1, history=history)
