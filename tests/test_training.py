"""The training loop: dev-based selection, resume after a crash, batching."""

from __future__ import annotations

import random

import pytest
import torch

from knowfree_core.config import TrainConfig
from knowfree_core.training import fit, length_bucketed_batches

from model_fixtures import build_tiny_model, make_random_encoder, tiny_corpus


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return make_random_encoder(tmp_path_factory.mktemp("encoder"))


def _model(encoder_dir, train):
    return build_tiny_model(encoder_dir, train)


def test_a_run_interrupted_mid_training_resumes_to_the_same_result(encoder_dir, tmp_path):
    train = tiny_corpus(24, seed=1)
    dev = tiny_corpus(8, seed=2, prefix="d", with_extensions=False)
    config = TrainConfig(epochs=4, batch_size=8, encoder_lr=1e-3, head_lr=3e-3, seed=3)

    straight = _model(encoder_dir, train)
    expected = fit(straight, train, dev, config, progress=False, checkpoint_path=tmp_path / "a" / "last.pt")

    def crash_after_two(report, _model):
        if report.epoch == 2:
            raise Crash()

    interrupted = _model(encoder_dir, train)
    with pytest.raises(Crash):
        fit(interrupted, train, dev, config, callback=crash_after_two, progress=False,
            checkpoint_path=tmp_path / "b" / "last.pt")
    seen = []
    resumed = _model(encoder_dir, train)  # a fresh process would start from fresh weights too
    result = fit(resumed, train, dev, config, callback=lambda r, m: seen.append(r.epoch), progress=False,
                 checkpoint_path=tmp_path / "b" / "last.pt")

    assert seen == [3, 4]  # only the missing epochs ran
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]
    assert [r.train_loss for r in result.history] == pytest.approx([r.train_loss for r in expected.history])
    assert result.best_epoch == expected.best_epoch
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_batches_cover_every_sentence_once_and_group_similar_lengths():
    sentences = tiny_corpus(100, seed=4)
    batches = list(length_bucketed_batches(sentences, 8, random.Random(0)))
    ids = [s.id for batch in batches for s in batch]
    assert sorted(ids) == sorted(s.id for s in sentences)
    assert all(len(batch) <= 8 for batch in batches)


def test_select_on_thresholds_judges_each_epoch_at_its_best_dev_threshold(encoder_dir):
    from knowfree_core.training import evaluate_thresholds

    train, dev = tiny_corpus(16, seed=1), tiny_corpus(6, seed=2, prefix="d", with_extensions=False)
    candidates = [0.05, 0.2, 0.5]
    config = TrainConfig(epochs=2, batch_size=4, encoder_lr=1e-3, head_lr=3e-3, seed=3, device="cpu",
                         threshold_candidates=candidates, select_on_thresholds=True)
    model = _model(encoder_dir, train)
    result = fit(model, train, dev, config, progress=False)
    assert all(report.dev_threshold in candidates for report in result.history)
    assert result.best_dev_f1 == max(report.dev_f1 for report in result.history)
    # the kept (best-epoch) model scores that F1 at that epoch's threshold, and no candidate beats it
    best = result.history[result.best_epoch - 1]
    scores = evaluate_thresholds(model, dev, candidates)
    assert scores[best.dev_threshold].f1 == pytest.approx(best.dev_f1)
    assert max(s.f1 for s in scores.values()) == pytest.approx(best.dev_f1)

    plain = fit(_model(encoder_dir, train), train, dev, TrainConfig(epochs=1, batch_size=4, device="cpu"),
                progress=False)
    assert plain.history[0].dev_threshold is None


def test_eval_every_scores_dev_on_schedule_and_after_the_last_epoch(encoder_dir):
    train, dev = tiny_corpus(12, seed=1), tiny_corpus(4, seed=2, prefix="d", with_extensions=False)
    config = TrainConfig(epochs=3, batch_size=4, encoder_lr=1e-3, head_lr=3e-3, device="cpu", eval_every=2)
    result = fit(_model(encoder_dir, train), train, dev, config, progress=False)
    assert [report.dev_f1 is not None for report in result.history] == [False, True, True]
    assert result.best_epoch in (2, 3)


def test_warmup_schedule_is_transformers_linear_one_step_ahead_during_warmup():
    """Why the schedule is not transformers' own: the two agree after the warm-up (and with
    none), but transformers starts at a learning rate of 0 where this one starts at 1/warmup."""
    from transformers import get_linear_schedule_with_warmup

    from knowfree_core.training import linear_warmup_decay

    def factors(make, warmup, total):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make(optimizer, warmup, total)
        out = []
        for _ in range(total + 2):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    ours, theirs = factors(linear_warmup_decay, 0, 10), factors(get_linear_schedule_with_warmup, 0, 10)
    assert ours == theirs
    ours, theirs = factors(linear_warmup_decay, 4, 20), factors(get_linear_schedule_with_warmup, 4, 20)
    assert ours[4:] == theirs[4:]
    assert ours[:4] == theirs[1:5] == [0.25, 0.5, 0.75, 1.0] and theirs[0] == 0.0
