"""The training loop: plain PyTorch, reporting through a callback.

It knows nothing about Ray: ``jobs/train.py`` runs the same loop on every Ray Train worker,
passing a ``DistributedContext`` (``knowfree_core.distributed``: DDP, batch shards, a report
hook that receives the loop state for ``ray.train.report``). The checkpoint that is kept is the one with the
best *dev* F1 (never test), as the paper's evaluation protocol requires.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

# transformers' set_seed seeds exactly what training draws from: random, numpy, torch (and
# every CUDA device).
from transformers import set_seed as seed_everything

from .config import TrainConfig
from .distributed import DistributedContext, shard_batches
from .loop_state import EpochReport, LoopState
from .metrics import SpanScores, score_spans
from .model.knowfree import KnowFreeModel
from .records import Sentence

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    best_epoch: int
    best_dev_f1: Optional[float]
    history: list[EpochReport] = field(default_factory=list)


# A callback may return True to stop training early (e.g. a scheduler decided to stop the trial).
EpochCallback = Callable[[EpochReport, KnowFreeModel], Optional[bool]]


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
    """Linear warm-up to the full rate, then linear decay to 0 at ``total_steps``.

    Not transformers' ``get_linear_schedule_with_warmup``: that one gives the first step a
    learning rate of 0 (factor ``step / warmup``), this one ``1 / warmup`` (``(step + 1) /
    warmup``), and every run so far (the paper settings, the quality results) trained with it.
    The two agree exactly after the warm-up and when there is none.
    """

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
    device = _prepare_worker(config, ctx)
    model.to(device)
    rng = random.Random(config.seed)
    steps_per_epoch = math.ceil(math.ceil(len(train) / config.batch_size) / ctx.world_size)
    step = OptimizationStep(model, config, device, total_steps=steps_per_epoch * config.epochs)
    state = _resume(step, rng, ctx, config.seed, checkpoint_path)

    # Rank 0 decides; the others must know whether a dev evaluation is coming.
    has_dev = ctx.broadcast(bool(dev))
    saving = checkpoint_path is not None or ctx.report is not None
    step.compute_loss = ctx.wrap(model)

    for epoch in range(state.epoch + 1, config.epochs + 1):
        report = _train_epoch(step, train, rng, config, ctx, epoch, progress)
        # Scored on dev every train.eval_every epochs, and always after the last one.
        scored = has_dev and (epoch % max(1, config.eval_every) == 0 or epoch == config.epochs)
        if scored:
            report.dev, report.dev_threshold = _dev_scores(model, dev, config, ctx, progress)
            report.dev_f1 = report.dev["f1"]
        state.record(report, model, scored=scored, has_dev=has_dev)
        if ctx.is_main:
            _log_epoch(report)
        snapshot = _snapshot(state, step, rng, ctx) if saving else None
        if checkpoint_path is not None and snapshot is not None:
            snapshot.save(checkpoint_path)
        stop = ctx.report(report, model, snapshot) if ctx.report else None
        if callback and callback(report, model):
            stop = True
        if ctx.any(bool(stop)):
            break
        if config.patience is not None and state.epochs_without_gain >= config.patience:
            if ctx.is_main:
                logger.info("no dev F1 gain for %d epochs: stopping", state.epochs_without_gain)
            break

    if state.best_state is not None:
        model.load_state_dict(state.best_state, strict=False)
    return TrainResult(best_epoch=state.best_epoch, best_dev_f1=state.best_f1, history=state.history)


def _prepare_worker(config: TrainConfig, ctx: DistributedContext) -> torch.device:
    """Seed this process, set its threads and CUDA device; the device to train on."""
    seed_everything(config.seed)
    if ctx.parallel:
        # Same batch order on every rank (the Python RNG), different dropout (torch's).
        torch.manual_seed(config.seed + ctx.rank)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = torch.device(ctx.device) if ctx.device else resolve_device(config.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def _resume(step: OptimizationStep, rng: random.Random, ctx: DistributedContext, seed: int,
            checkpoint_path: str | Path | None) -> LoopState:
    """The state to continue from (the context's, else the checkpoint file's), restored into
    the model, optimizer and generators; a fresh state when there is none."""
    state, source = ctx.resume_state, "the given state"
    if state is None and checkpoint_path is not None and Path(checkpoint_path).is_file():
        state, source = LoopState.load(checkpoint_path), str(checkpoint_path)
    if state is None:
        return LoopState()
    state.restore(step.model, step.optimizer, step.scheduler, step.scaler, rng, ctx.rank, ctx.world_size, seed)
    logger.info("resuming from %s after epoch %d", source, state.epoch)
    return state.bookkeeping()


def _train_epoch(step: OptimizationStep, train: Sequence[Sentence], rng: random.Random, config: TrainConfig,
                 ctx: DistributedContext, epoch: int, progress: bool) -> EpochReport:
    """One pass over this rank's share of the batches; its report without dev scores."""
    step.model.train()
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
    return EpochReport(
        epoch=epoch,
        train_loss=ctx.mean(total_loss / max(1, batches)),
        seconds=time.perf_counter() - started,
        peak_rss_mib=peak_rss_mib(),
    )


def _dev_scores(model: KnowFreeModel, dev: Sequence[Sentence] | None, config: TrainConfig,
                ctx: DistributedContext, progress: bool) -> tuple[dict, Optional[float]]:
    """Rank 0's dev scores (``SpanScores.to_dict()``) and threshold, on every rank."""
    scores, threshold = None, None
    if ctx.is_main and config.select_on_thresholds and config.threshold_candidates:
        # Few-shot models are shy: at 0.5 every epoch may score 0 and the first one
        # would be kept. Judge each epoch at its best dev threshold instead.
        by_threshold = evaluate_thresholds(model, dev, config.threshold_candidates, config.eval_batch_size)
        threshold = _best_threshold({t: sc.f1 for t, sc in by_threshold.items()})
        scores = by_threshold[threshold]
    elif ctx.is_main:
        scores = evaluate(model, dev, config.eval_batch_size, progress=progress)
    return ctx.broadcast(scores.to_dict() if scores is not None else None), ctx.broadcast(threshold)


def _snapshot(state: LoopState, step: OptimizationStep, rng: random.Random,
              ctx: DistributedContext) -> LoopState | None:
    """The state to save and report: on rank 0 only, but every rank takes part in gathering."""
    # Every rank's dropout stream, so a resumed data-parallel run is the same run.
    torch_rng_by_rank = ctx.gather(torch.get_rng_state()) if ctx.parallel else None
    if not ctx.is_main:
        return None
    return state.snapshot(step.model, step.optimizer, step.scheduler, step.scaler, rng, torch_rng_by_rank)


def _log_epoch(report: EpochReport) -> None:
    logger.info(
        "epoch %d loss %.4f dev F1 %s best %s (epoch %d) %.1fs",
        report.epoch,
        report.train_loss,
        "-" if report.dev_f1 is None else f"{report.dev_f1:.4f}",
        "-" if report.best_dev_f1 is None else f"{report.best_dev_f1:.4f}",
        report.best_epoch,
        report.seconds,
    )
