"""Data-parallel training for ``fit``: what one of W workers needs, with no Ray import.

``fit(..., distributed=DistributedContext(rank, world_size, ...))`` runs the same loop as the
single process on every worker of a ``torch.distributed`` process group (Ray Train's
``TorchTrainer`` sets one up; ``torchrun`` would do as well):

* every rank builds the same length-bucketed batch list (same seed, same order) and takes
  batches ``r, r+W, r+2W, ...`` of it; the list is padded by wrapping around to a multiple of W,
  so every rank steps the same number of times (DDP needs equal step counts). ``batch_size``
  is per worker: an epoch is W times fewer steps of W times more sentences;
* gradients are averaged by ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU);
* rank 0 alone evaluates dev and broadcasts the scores, so every rank takes the same
  best-epoch, patience and stop decisions and keeps the same best-epoch weights: on return
  every rank's model holds the best-dev weights;
* after every epoch ``report(epoch_report, model, state)`` is called on every rank; ``state`` is
  the loop state (the ``LoopState`` ``fit`` writes to ``checkpoint_path``) on rank 0 and ``None``
  on the others. Giving that state back as ``resume_state`` resumes after its epoch.

Pass the same arguments (data, config, dev set) on every rank: the ranks must take part in
the same collective calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .model.knowfree import KnowFreeModel
    from .loop_state import EpochReport, LoopState

T = TypeVar("T")

#: ``report(epoch_report, model, state)``: ``state`` is the loop state on rank 0, else None.
#: A True return on any rank stops training on every rank.
StateReport = Callable[["EpochReport", "KnowFreeModel", Optional["LoopState"]], Optional[bool]]


def shard_batches(batches: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s batches: ``r, r+W, ...`` of the list padded (by wrapping around to its
    start) to a multiple of ``world_size``, so every rank gets the same number of batches."""
    if world_size <= 1:
        return list(batches)
    if not batches:
        return []
    per_rank = math.ceil(len(batches) / world_size)
    padded = [batches[i % len(batches)] for i in range(per_rank * world_size)]
    return padded[rank::world_size]


class _LossModule(nn.Module):
    """DDP synchronises gradients only through ``forward``: route ``model.loss`` through it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):  # noqa: D401 - nn.Module API
        return self.model.loss(batch)


@dataclass
class DistributedContext:
    """Where this worker stands in the group and how it reports.

    rank, world_size
        Of the initialised ``torch.distributed`` process group (``from_process_group``).
    device
        This worker's device (e.g. ``cuda:1``); None: ``train.device``.
    resume_state
        A loop state from a checkpoint (``report``'s ``state``) to resume after its epoch;
        it takes precedence over ``fit``'s ``checkpoint_path``.
    report
        Called on every rank after every epoch (see ``StateReport``).
    find_unused_parameters
        Passed to DDP; needed only if some trainable parameter gets no gradient.
    """

    rank: int = 0
    world_size: int = 1
    device: Optional[str] = None
    resume_state: Optional["LoopState"] = None
    report: Optional[StateReport] = None
    find_unused_parameters: bool = False

    @classmethod
    def from_process_group(cls, **kwargs: Any) -> "DistributedContext":
        """Rank and world size of the initialised process group (rank 0 of 1 without one)."""
        if _initialised():
            kwargs.setdefault("rank", torch.distributed.get_rank())
            kwargs.setdefault("world_size", torch.distributed.get_world_size())
        return cls(**kwargs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def check(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        if self.parallel and not _initialised():
            raise RuntimeError(
                f"world_size={self.world_size} needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, or run under Ray Train / torchrun)"
            )

    # ------------------------------------------------------------------ collectives
    def wrap(self, model: nn.Module) -> Callable:
        """The callable that computes a batch's loss: ``model.loss`` alone, or through DDP."""
        if not self.parallel:
            return model.loss  # type: ignore[return-value]
        return nn.parallel.DistributedDataParallel(
            _LossModule(model),
            device_ids=None,  # the module is already on this worker's device; inputs are sentences
            broadcast_buffers=False,  # the buffers are constants, identical on every rank
            find_unused_parameters=self.find_unused_parameters,
        )

    def broadcast(self, value: T, src: int = 0) -> T:
        """Rank ``src``'s ``value`` on every rank (any picklable object)."""
        if not self.parallel:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.parallel:
            return [value]
        values: list = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def mean(self, value: float) -> float:
        if not self.parallel:
            return value
        return sum(self.gather(float(value))) / self.world_size

    def any(self, flag: bool) -> bool:
        if not self.parallel:
            return bool(flag)
        return any(self.gather(bool(flag)))


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
