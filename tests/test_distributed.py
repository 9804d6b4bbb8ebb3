"""``fit`` as one of two data-parallel workers (DDP over gloo, no Ray): equal step counts,
the same weights on every rank, and a resume from rank 0's reported state that ends with the
same weights as an uninterrupted run."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from knowfree_core.config import TrainConfig
from knowfree_core.distributed import DistributedContext, shard_batches
from knowfree_core.loop_state import LoopState
from knowfree_core.training import fit

from model_fixtures import build_tiny_model, make_random_encoder, tiny_corpus


def test_every_rank_gets_the_same_number_of_batches_and_every_batch_is_used():
    batches = list(range(7))
    shards = [shard_batches(batches, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]  # padded by wrapping around
    assert shard_batches(batches, 0, 1) == batches
    assert [shard_batches([9], rank, 2) for rank in range(2)] == [[9], [9]]
    assert shard_batches([], 1, 2) == []


class Crash(RuntimeError):
    pass


def _model(encoder_dir, train):
    return build_tiny_model(encoder_dir, train)


def _worker(rank: int, world_size: int, port: int, encoder_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        train = tiny_corpus(22, seed=1)  # 22 / 4 -> 6 batches: 3 steps per rank
        dev = tiny_corpus(8, seed=2, prefix="d", with_extensions=False)
        config = TrainConfig(epochs=3, batch_size=4, encoder_lr=1e-3, head_lr=3e-3, seed=3, device="cpu")
        state_path = os.path.join(out_dir, "state.pt")

        straight = _model(encoder_dir, train)
        expected = fit(straight, train, dev, config, progress=False,
                       distributed=DistributedContext(rank=rank, world_size=world_size))

        def crash_after_two(report, _model, state):
            assert (state is not None) == (rank == 0)
            if state is not None:
                state.save(state_path)
            if report.epoch == 2:
                raise Crash()

        with pytest.raises(Crash):
            fit(_model(encoder_dir, train), train, dev, config, progress=False,
                distributed=DistributedContext(rank=rank, world_size=world_size, report=crash_after_two))
        torch.distributed.barrier()  # rank 0 has written the state of epoch 2
        seen = []
        resumed = _model(encoder_dir, train)
        result = fit(resumed, train, dev, config, progress=False, distributed=DistributedContext(
            rank=rank, world_size=world_size, resume_state=LoopState.load(state_path),
            report=lambda report, _m, _s: seen.append(report.epoch)))
        torch.save({
            "seen": seen,
            "epochs": [r.epoch for r in result.history],
            "losses": [r.train_loss for r in result.history],
            "expected_losses": [r.train_loss for r in expected.history],
            "dev_f1": [r.dev_f1 for r in result.history],
            "best_epoch": (result.best_epoch, expected.best_epoch),
            "straight": {k: v.clone() for k, v in straight.state_dict().items()},
            "resumed": {k: v.clone() for k, v in resumed.state_dict().items()},
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_agree_and_resume_to_the_same_weights(tmp_path):
    encoder_dir = make_random_encoder(tmp_path / "encoder")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(encoder_dir), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for out in ranks:
        assert out["seen"] == [3]
        assert out["epochs"] == [1, 2, 3]
        assert out["losses"] == pytest.approx(out["expected_losses"])
        assert out["best_epoch"][0] == out["best_epoch"][1]
        for name, tensor in out["straight"].items():
            assert torch.allclose(tensor, out["resumed"][name], atol=1e-6), name
    # Same losses, dev scores and weights on both ranks: gradients were averaged, dev was rank 0's.
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["dev_f1"] == ranks[1]["dev_f1"]
    for name, tensor in ranks[0]["resumed"].items():
        assert torch.equal(tensor, ranks[1]["resumed"][name]), name
