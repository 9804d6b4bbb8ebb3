"""jobs.train on the local Ray cluster: two CPU workers (DDP over gloo) on a tiny corpus with
a tiny random encoder. A run finishes and exports the model as ``knowfree train`` does; a run
whose worker is killed after epoch 2 restarts from the checkpoint of epoch 2 and ends with
the same epochs, losses and weights as the uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from knowfree_core.model.knowfree import KnowFreeModel

from model_fixtures import tiny_run_config

pytest.importorskip("ray")
from jobs.fault_injection import FAIL_AFTER_EPOCH  # noqa: E402
from jobs.train import FAIL_MARKER, main  # noqa: E402


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """One config file for both ``knowfree train`` and ``jobs.train`` (with a ray_train section)."""
    root = tmp_path_factory.mktemp("jobs-train")
    config = {
        **tiny_run_config(root, encoder_lr=1e-3, head_lr=3e-3),
        # the fixture's cluster has 4 logical CPUs: two workers of one each
        "ray_train": {"num_workers": 2, "resources_per_worker": {"CPU": 1}, "num_to_keep": 2},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _last_epoch_state(run_dir):
    """The loop state in the run's newest per-epoch Ray checkpoint (the export has none)."""
    states = sorted((run_dir / "ray_train" / "run").glob("checkpoint_*/state.pt"))
    return torch.load(states[-1], map_location="cpu", weights_only=True)


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def straight_run(ray_cluster, config_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert main(["--config", str(config_file), "--set", f"output_dir={run_dir}"]) == 0
    return run_dir


def test_a_two_worker_run_exports_the_model_like_knowfree_train(straight_run):
    run_dir = straight_run
    for name in ("config.yaml", "train.log", "train_data.jsonl", "history.jsonl", "metrics.json"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert {"dev", "test", "best_epoch", "threshold"} <= set(metrics)
    assert metrics["epochs_run"] == 3 and metrics["ray_train"]["num_workers"] == 2
    assert metrics["ray_train"]["resumed_after_epoch"] == 0
    assert [r["epoch"] for r in _history(run_dir)] == [1, 2, 3]
    model = KnowFreeModel.from_pretrained(run_dir / "model")
    assert model.config.threshold == metrics["threshold"]
    assert len(model.predict([list("张三在北京工作。")])) == 1


def test_a_killed_worker_resumes_from_the_last_checkpoint(straight_run, config_file, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv(FAIL_AFTER_EPOCH, "2")
    assert main(["--config", str(config_file), "--set", f"output_dir={run_dir}", "--max-failures", "1"]) == 0
    assert (run_dir / FAIL_MARKER).is_file()  # rank 1 did exit
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["ray_train"]["resumed_after_epoch"] == 2  # the restart began at epoch 3
    history, expected = _history(run_dir), _history(straight_run)
    assert [r["epoch"] for r in history] == [1, 2, 3]  # each epoch exactly once
    assert [r["train_loss"] for r in history] == pytest.approx([r["train_loss"] for r in expected])
    assert metrics["best_epoch"] == json.loads((straight_run / "metrics.json").read_text())["best_epoch"]
    # The weights after epoch 3 (the exported model is the best-dev epoch's, often an early one).
    last, expected_last = _last_epoch_state(run_dir), _last_epoch_state(straight_run)
    assert last["epoch"] == expected_last["epoch"] == 3
    for name, tensor in expected_last["model"].items():
        assert torch.allclose(tensor, last["model"][name], atol=1e-6), name
    resumed = KnowFreeModel.from_pretrained(run_dir / "model").state_dict()
    for name, tensor in KnowFreeModel.from_pretrained(straight_run / "model").state_dict().items():
        assert torch.allclose(tensor, resumed[name], atol=1e-6), name
