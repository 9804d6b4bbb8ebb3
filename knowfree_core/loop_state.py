"""What the training loop knows after an epoch, and its checkpoint file.

``fit`` keeps its bookkeeping (history, best dev F1 and the weights that reached it, patience)
in a :class:`LoopState`; after an epoch it adds the snapshot that makes a resumed run the same
run (trainable weights, optimizer, scheduler, gradient scaler, random generators) and hands
that to the checkpoint file and to ``DistributedContext.report``. The file is a plain dict of
tensors, numbers and strings, so it loads with ``weights_only=True`` and cannot run code.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from .state_files import load_checkpoint

#: Dict keys written only when set: a checkpoint of an fp32, single-process run has neither.
_OPTIONAL_KEYS = ("scaler", "torch_rng_by_rank")


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of what training changes: trainable parameters and buffers.

    Frozen parameters (the e5 word-embedding table is 96M of its 118M) never change, so
    snapshots only need the rest.
    """
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {
        name: tensor.detach().to("cpu", copy=True)
        for name, tensor in model.state_dict().items()
        if name in keep
    }


@dataclass
class LoopState:
    """The loop after ``epoch`` finished epochs (0: before training)."""

    epoch: int = 0
    history: list[EpochReport] = field(default_factory=list)
    best_f1: Optional[float] = None
    best_epoch: int = 0
    #: The weights of the best dev epoch (``trainable_state``); None before a dev evaluation.
    best_state: Optional[dict[str, torch.Tensor]] = None
    epochs_without_gain: int = 0
    # -- the snapshot for resuming: set by ``fit`` on the copy it saves and reports -----------
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    #: ``random.Random.getstate()`` of the generator that orders batches.
    batch_rng: Optional[tuple] = None
    torch_rng: Optional[torch.Tensor] = None
    scaler: Optional[dict[str, Any]] = None
    #: Every rank's dropout generator (data-parallel runs only), in rank order.
    torch_rng_by_rank: Optional[list[torch.Tensor]] = None

    def record(self, report: EpochReport, model: torch.nn.Module, scored: bool, has_dev: bool) -> None:
        """Count a finished epoch. ``scored``: ``report.dev_f1`` holds this epoch's dev F1.

        An epoch between evaluations (``train.eval_every``) is never the best one: the kept
        model is always one that was scored on dev. Without a dev set the last epoch is kept.
        """
        if scored:
            if self.best_f1 is None or report.dev_f1 > self.best_f1:
                self.best_f1, self.best_epoch = report.dev_f1, report.epoch
                self.best_state = trainable_state(model)
                report.is_best = True
                self.epochs_without_gain = 0
            else:
                self.epochs_without_gain += 1
        elif not has_dev:
            self.best_epoch, report.is_best = report.epoch, True
        report.best_dev_f1, report.best_epoch = self.best_f1, self.best_epoch
        self.history.append(report)
        self.epoch = report.epoch

    def snapshot(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: Optional[torch.amp.GradScaler], batch_rng: random.Random,
                 torch_rng_by_rank: Optional[list[torch.Tensor]] = None) -> "LoopState":
        """A copy with everything a resumed run needs to continue exactly where this one is."""
        return replace(
            self,
            history=list(self.history),
            model=trainable_state(model),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            batch_rng=batch_rng.getstate(),
            torch_rng=torch.get_rng_state(),
            scaler=scaler.state_dict() if scaler is not None else None,
            torch_rng_by_rank=torch_rng_by_rank,
        )

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: Optional[torch.amp.GradScaler], batch_rng: random.Random,
                rank: int, world_size: int, seed: int) -> None:
        """Put the snapshot back into a freshly built model, optimizer and generators."""
        model.load_state_dict(self.model, strict=False)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        if scaler is not None and self.scaler:
            scaler.load_state_dict(self.scaler)
        batch_rng.setstate(_as_random_state(self.batch_rng))
        if self.torch_rng_by_rank is not None and len(self.torch_rng_by_rank) == world_size:
            torch.set_rng_state(self.torch_rng_by_rank[rank])
        elif rank == 0:
            torch.set_rng_state(self.torch_rng)
        else:  # the world size changed: a fresh dropout stream per rank
            torch.manual_seed(seed + rank + 1000 * int(self.epoch))

    def bookkeeping(self) -> "LoopState":
        """This state without its snapshot: what the loop keeps while it runs (the snapshot is
        a copy of the weights and the optimizer, needed only to restore)."""
        return LoopState(self.epoch, list(self.history), self.best_f1, self.best_epoch, self.best_state,
                         self.epochs_without_gain)

    # -- the file ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["history"] = [report.to_dict() for report in self.history]
        for name in _OPTIONAL_KEYS:
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopState":
        known = {name: value for name, value in data.items() if name in cls.__dataclass_fields__}
        known["history"] = [EpochReport(**report) for report in data.get("history", [])]
        return cls(**known)

    def save(self, path: str | Path) -> None:
        """Write the state atomically: a crash mid-write leaves the previous checkpoint intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(self.to_dict(), partial)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path) -> "LoopState":
        # weights_only: tensors, numbers, strings and containers only; a checkpoint file cannot run code.
        return cls.from_dict(load_checkpoint(path))


def _as_random_state(state) -> tuple:
    # random.Random.setstate wants tuples; a round trip through the checkpoint may give lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
