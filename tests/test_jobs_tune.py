"""jobs.tune on the local Ray cluster: 4 function trials under ASHA on a tiny corpus with a tiny
random encoder (3 epochs). The results table lists every trial sorted by dev F1 with its
sampled values, the best config file loads and carries the best trial's values, and test F1 is
evaluated for the best trial only. A rerun restores the finished experiment instead of
training again; an experiment whose trials failed mid-run resumes them from their checkpoints.
The search-space checks (unknown keys, K dividing the grid size) run without Ray."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from knowfree_core.config import load_config
from knowfree_core.errors import ConfigError
from knowfree_core.model.knowfree import KnowFreeModel

from model_fixtures import tiny_run_config

pytest.importorskip("ray.tune")
from jobs.fault_injection import FAIL_AFTER_EPOCH  # noqa: E402
from jobs.tune import (  # noqa: E402
    FAIL_MARKER,
    ParamSpec,
    check_search_space,
    load_tune_config,
    main,
)

SEARCH_SPACE = {
    "model.window": {"type": "choice", "values": [1, 3]},
    "model.attn_heads": {"type": "randint", "low": 3, "high": 5},  # divisors of 40 in range: 4, 5
    "model.alpha_scale": {"type": "uniform", "low": 0.25, "high": 1.0},
    "model.beta": {"type": "uniform", "low": 0.5, "high": 1.0},
    "train.encoder_lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3},
    "train.head_lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
    "train.weight_decay": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
}
KEYS = list(SEARCH_SPACE)


@pytest.fixture(scope="module")
def train_config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs-tune")
    config = tiny_run_config(root)
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def write_tune_config(path, train_config, output_dir, **extra):
    config = {
        "train_config": str(train_config),
        "output_dir": str(output_dir),
        "search_space": SEARCH_SPACE,
        "num_samples": 4,
        "seed": 0,
        "scheduler": {"name": "asha", "metric": "dev_f1", "grace_period": 1, "reduction_factor": 2},
        # the fixture's cluster has 4 logical CPUs: four trials of one each at once
        "resources_per_trial": {"cpu": 1},
        **extra,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def read_rows(out):
    with (out / "results.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def history_epochs(run_dir):
    lines = (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


@pytest.fixture(scope="module")
def search(ray_cluster, train_config_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    config = write_tune_config(root / "tune.yaml", train_config_file, root / "out")
    assert main(["--config", str(config)]) == 0
    return root / "out", config


def test_four_trials_under_asha_give_a_sorted_table_and_a_best_config(search):
    out, _ = search
    rows = read_rows(out)
    assert len(rows) == 4
    assert (out / "results.md").read_text(encoding="utf-8").count("\n") == 2 + 4
    dev = [float(row["dev_f1"]) for row in rows]
    assert dev == sorted(dev, reverse=True)
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    for row in rows:
        assert row["status"] in ("complete", "stopped")
        assert 1 <= int(row["epochs"]) <= 3
        assert int(row["model.attn_heads"]) in (4, 5)  # divisors of 40 only
        assert int(row["model.window"]) in (1, 3)
        assert 0.25 <= float(row["model.alpha_scale"]) <= 1.0
        assert 3e-4 <= float(row["train.encoder_lr"]) <= 3e-3
        # every trial's run folder, with its own config and one history line per epoch run
        run_dir = out / "trials" / row["trial_id"]
        trial = load_config(run_dir / "config.yaml")
        assert trial.model.window == int(row["model.window"])
        assert history_epochs(run_dir) == list(range(1, int(row["epochs"]) + 1))
    assert any(row["status"] == "complete" for row in rows)
    assert len({tuple(row[k] for k in KEYS) for row in rows}) == 4  # four different samples

    # test F1 for the best trial only, from its best-dev model
    best = rows[0]
    assert best["test_f1"] != ""
    assert all(row["test_f1"] == "" for row in rows[1:])
    metrics = json.loads((out / "best_trial" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["trial_id"] == best["trial_id"]
    assert float(best["test_f1"]) == pytest.approx(metrics["test"]["f1"])
    assert KnowFreeModel.from_pretrained(out / "best_trial" / "model").config.threshold == metrics["threshold"]
    # nothing about test in what the trials reported
    for path in (out / "tune").rglob("result.json"):
        for line in path.read_text(encoding="utf-8").splitlines():
            assert not any(key.startswith("test") for key in json.loads(line)), path

    # the best config is a ready `knowfree train` config with the best trial's values
    best_config = load_config(out / "best_config.yaml")
    assert best_config.model.window == int(best["model.window"])
    assert best_config.model.attn_heads == int(best["model.attn_heads"])
    assert best_config.model.alpha_scale == pytest.approx(float(best["model.alpha_scale"]))
    assert best_config.model.beta == pytest.approx(float(best["model.beta"]))
    assert best_config.train.encoder_lr == pytest.approx(float(best["train.encoder_lr"]))
    assert best_config.train.head_lr == pytest.approx(float(best["train.head_lr"]))
    assert best_config.train.weight_decay == pytest.approx(float(best["train.weight_decay"]))
    assert best_config.train.epochs == 3 and best_config.model.grid_size == 40


def test_a_rerun_restores_the_finished_experiment(search):
    out, config = search
    before = read_rows(out)
    mtime = (out / "best_trial" / "metrics.json").stat().st_mtime
    assert main(["--config", str(config)]) == 0
    after = read_rows(out)
    assert [(r["trial_id"], r["dev_f1"], r["test_f1"]) for r in after] == \
        [(r["trial_id"], r["dev_f1"], r["test_f1"]) for r in before]
    assert (out / "best_trial" / "metrics.json").stat().st_mtime == mtime  # not evaluated again


def test_a_changed_search_is_not_restored_into_the_experiment(search, tmp_path):
    out, _ = search
    config = write_tune_config(tmp_path / "tune.yaml", load_tune_config(search[1]).train_config, out, num_samples=5)
    with pytest.raises(ConfigError, match="num_samples"):
        main(["--config", str(config)])


class _Touch:
    """A pickle that creates a file when it is loaded: stands for code planted in tuner.pkl."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


def _plant_tuner_pickle(experiment, ran):
    import pickle

    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(_Touch(str(ran))))
    (experiment / "tuner.pkl").chmod(0o644)


def test_a_planted_experiment_without_the_marker_is_never_unpickled(train_config_file, tmp_path):
    import pickle

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(str(probe))))
    assert probe.exists()  # the payload does run when unpickled

    ran = tmp_path / "ran"
    _plant_tuner_pickle(tmp_path / "out" / "tune", ran)
    config = write_tune_config(tmp_path / "tune.yaml", train_config_file, tmp_path / "out")
    with pytest.raises(ConfigError, match="knowfree_experiment.json"):
        main(["--config", str(config)])
    assert not ran.exists()


def test_an_experiment_folder_others_can_write_is_not_restored(train_config_file, tmp_path):
    import os

    from jobs.tune.restore import mark_experiment

    if os.name != "posix":
        pytest.skip("mode bits are POSIX")
    config = write_tune_config(tmp_path / "tune.yaml", train_config_file, tmp_path / "out")
    experiment = tmp_path / "out" / "tune"
    mark_experiment(load_tune_config(config), experiment)  # as if this job had created it
    ran = tmp_path / "ran"
    _plant_tuner_pickle(experiment, ran)
    experiment.chmod(0o775)  # group-writable: the group could have replaced tuner.pkl
    with pytest.raises(ConfigError, match="writable by group or others"):
        main(["--config", str(config)])
    assert not ran.exists()

    experiment.chmod(0o755)
    (experiment / "tuner.pkl").chmod(0o666)
    with pytest.raises(ConfigError, match="tuner.pkl is writable by group or others"):
        main(["--config", str(config)])
    assert not ran.exists()


def test_failed_trials_resume_from_their_checkpoints(ray_cluster, train_config_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(FAIL_AFTER_EPOCH, "2")
    config = write_tune_config(tmp_path / "tune.yaml", train_config_file, out, num_samples=1,
                               scheduler={"name": "fifo"})
    assert main(["--config", str(config)]) == 1  # the trial raised after epoch 2
    (run_dir,) = list((out / "trials").iterdir())
    assert (run_dir / FAIL_MARKER).is_file() and history_epochs(run_dir) == [1, 2]
    assert read_rows(out)[0]["status"] == "error"

    assert main(["--config", str(config)]) == 0  # the same command: restored, resumed after epoch 2
    assert history_epochs(run_dir) == [1, 2, 3]
    assert "after epoch 2" in (run_dir / "train.log").read_text(encoding="utf-8")
    (row,) = read_rows(out)
    assert row["status"] == "complete" and row["epochs"] == "3" and row["test_f1"] != ""


def _base(tmp_path, grid_size=40, attn_heads=4):
    from knowfree_core.config import KnowFreeConfig

    config = KnowFreeConfig()
    config.data.train = str(tmp_path / "train.jsonl")
    config.model.grid_size, config.model.attn_heads = grid_size, attn_heads
    return config


def test_attn_heads_must_divide_the_grid_size(tmp_path):
    base = _base(tmp_path)
    space = check_search_space({"model.attn_heads": ParamSpec(type="randint", low=3, high=8)}, base, None)
    assert space["model.attn_heads"].type == "choice" and space["model.attn_heads"].values == [4, 5, 8]
    with pytest.raises(ConfigError, match="attn_heads 3"):
        check_search_space({"model.attn_heads": ParamSpec(type="choice", values=[4, 3])}, base, None)
    with pytest.raises(ConfigError, match="grid_size 30 / attn_heads 4"):
        check_search_space({"model.grid_size": ParamSpec(type="grid", values=[40, 30])}, base, None)
    both = {"model.grid_size": ParamSpec(type="choice", values=[40, 80]),
            "model.attn_heads": ParamSpec(type="grid", values=[5, 10])}
    assert check_search_space(both, base, None) == both


def test_search_space_keys_are_checked_before_anything_runs(tmp_path):
    base = _base(tmp_path)
    with pytest.raises(ConfigError, match="not a key"):
        check_search_space({"model.windw": ParamSpec(type="choice", values=[1])}, base, None)
    with pytest.raises(ConfigError, match="integer"):
        check_search_space({"model.window": ParamSpec(type="uniform", low=1, high=5)}, base, None)
    with pytest.raises(ConfigError, match="prepared once"):
        check_search_space({"data.subset_size": ParamSpec(type="choice", values=[100])}, base, None)
    with pytest.raises(ConfigError, match="Optuna"):
        check_search_space({"model.window": ParamSpec(type="grid", values=[1, 3])}, base, "optuna")
    with pytest.raises(ConfigError, match="decode"):
        check_search_space({"model.decode": ParamSpec(type="choice", values=["flat", "nestd"])}, base, None)


def test_optuna_samples_the_search_space(tmp_path):
    pytest.importorskip("optuna")
    from jobs.tune import TuneJobConfig, to_param_space
    from jobs.tune.driver import _tune_config_objects

    base = _base(tmp_path)
    job = TuneJobConfig(train_config="unused.yaml", output_dir=str(tmp_path), search_alg="optuna", seed=1,
                        search_space={k: ParamSpec(**v) for k, v in SEARCH_SPACE.items()})
    space = check_search_space(job.search_space, base, job.search_alg)
    search_alg = _tune_config_objects(job, base).search_alg
    search_alg.set_search_properties(None, None, to_param_space(space))
    sample = search_alg.suggest("trial-1")
    assert set(sample) == set(KEYS)
    assert sample["model.attn_heads"] in (4, 5) and 3e-4 <= sample["train.encoder_lr"] <= 3e-3


@pytest.mark.slow
def test_ray_train_trials_report_to_tune(ray_cluster, train_config_file, tmp_path):
    """Each trial a Ray Train run (one CPU worker here) reporting through TuneReportCallback."""
    train_config = yaml.safe_load(train_config_file.read_text(encoding="utf-8"))
    train_config["ray_train"] = {"num_workers": 1, "resources_per_worker": {"CPU": 1}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_config), encoding="utf-8")
    out = tmp_path / "out"
    config = write_tune_config(tmp_path / "tune.yaml", tmp_path / "train.yaml", out, num_samples=2,
                               trial_runner="ray_train", max_concurrent_trials=2)
    assert main(["--config", str(config)]) == 0
    rows = read_rows(out)
    assert len(rows) == 2 and rows[0]["test_f1"] != "" and rows[1]["test_f1"] == ""
    for row in rows:
        run_dir = out / "trials" / row["trial_id"]
        assert (run_dir / "ray_train" / row["trial_id"]).is_dir()  # the trial's Train run
    assert load_config(out / "best_config.yaml").model.window == int(rows[0]["model.window"])
    assert json.loads((out / "best_trial" / "metrics.json").read_text())["trial_id"] == rows[0]["trial_id"]
