"""The ``knowfree`` command as a user runs it: train → evaluate → predict, and its errors."""

from __future__ import annotations

import json

import pytest

from knowfree_core.cli import main
from knowfree_core.config import load_config
from knowfree_core.errors import ConfigError
from knowfree_core.formats import write_dataset

from model_fixtures import make_random_encoder, tiny_corpus


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    encoder = make_random_encoder(root / "encoder")
    write_dataset(tiny_corpus(48, seed=1), root / "train.jsonl")
    write_dataset(tiny_corpus(12, seed=2, prefix="d", with_extensions=False), root / "dev.jsonl")
    write_dataset(tiny_corpus(12, seed=3, prefix="t", with_extensions=False), root / "test.jsonl")
    config = root / "config.yaml"
    config.write_text(
        "data:\n"
        f"  train: {root / 'train.jsonl'}\n"
        f"  dev: {root / 'dev.jsonl'}\n"
        f"  test: {root / 'test.jsonl'}\n"
        "encoder:\n"
        f"  name: {encoder}\n"
        "model: {ffn_size: 40, grid_size: 40, biaffine_heads: 2, attn_heads: 4, dropout: 0.0}\n"
        "train: {epochs: 3, batch_size: 8, encoder_lr: 1.0e-3, head_lr: 3.0e-3, warmup_ratio: 0.0}\n"
    )
    run_dir = root / "run"
    code = main(["train", "--config", str(config), "--quiet", "--set", "train.epochs=20",
                 "--set", f"output_dir={run_dir}"])
    assert code == 0
    return root, run_dir, config


def test_train_writes_a_complete_run_folder(trained_run):
    _, run_dir, _ = trained_run
    for name in ("config.yaml", "train.log", "history.jsonl", "train_data.jsonl", "metrics.json"):
        assert (run_dir / name).is_file(), name
    for name in ("knowfree.json", "labels.json", "head.safetensors", "encoder/config.json"):
        assert (run_dir / "model" / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"dev", "test", "best_epoch", "seconds_per_epoch", "peak_rss_mib", "threshold"} <= set(metrics)
    assert metrics["test"]["f1"] > 0.8
    # --set overrides the file, and the resolved config is what the run folder records.
    assert load_config(run_dir / "config.yaml").train.epochs == 20
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == metrics["epochs_run"]
    assert metrics["best_epoch"] == max(history, key=lambda h: h["dev_f1"])["epoch"]


def test_evaluate_reproduces_the_run_metrics(trained_run, capsys):
    root, run_dir, _ = trained_run
    assert main(["evaluate", "--model", str(run_dir / "model"), "--data", str(root / "test.jsonl"),
                 "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert printed["f1"] == pytest.approx(metrics["test"]["f1"])
    assert main(["evaluate", "--model", str(run_dir / "model"), "--data", str(root / "test.jsonl"),
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "PER" in table and "LOC" in table


def test_predict_writes_jsonl_spans(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    source = tmp_path / "input.txt"
    source.write_text("张三在北京工作。\n\n李四去了上海。\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(run_dir / "model"), "--input", str(source), "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in records] == ["张三在北京工作。", "", "李四去了上海。"]
    assert records[1]["spans"] == []
    first = {(s["text"], s["label"]) for s in records[0]["spans"]}
    assert ("张三", "PER") in first and ("北京", "LOC") in first
    # every span with the model's probability for it; every line with the windows it took
    assert all(set(s) == {"start", "end", "label", "text", "score"} for r in records for s in r["spans"])
    assert all(0.5 < s["score"] <= 1.0 for s in records[0]["spans"])
    assert [r["windows"] for r in records] == [1, 0, 1]


def test_predict_min_score_and_a_line_longer_than_the_encoder(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    model = str(run_dir / "model")
    source = tmp_path / "input.txt"
    long_line = "张三在北京工作。李四去了上海。" * 14  # 210 characters; the tiny encoder takes 62
    source.write_text(f"张三在北京工作。\n{long_line}\n", encoding="utf-8")

    def predict(*options):
        out = tmp_path / "out.jsonl"
        assert main(["predict", "--model", model, "--input", str(source), "--output", str(out), *options]) == 0
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    every = predict("--batch-size", "2")
    assert every[1]["windows"] == 6 and every[1]["text"] == long_line
    # the end of the line is labelled as well as its start
    assert max(s["start"] for s in every[1]["spans"]) > 2 * 62
    scores = sorted(s["score"] for r in every for s in r["spans"])
    cut = scores[len(scores) // 2]
    kept = predict("--min-score", str(cut))
    assert [[s for s in r["spans"] if s["score"] >= cut] for r in every] == [r["spans"] for r in kept]
    assert predict("--max-units", "20")[1]["windows"] == len(long_line) // 10 - 1



def test_predict_option_out_of_range_is_one_line_before_the_model_loads(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nowhere"), "--min-score", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "min_score must be in [0, 1], got 1.5" in err


def test_malformed_data_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.conll"
    bad.write_text("张\tB-PER\n三\n", encoding="utf-8")
    code = main(["train", "--quiet", "--set", f"data.train={bad}", "--set", f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "Traceback" not in err


def test_unknown_config_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="epochz"):
        load_config(None, ["data.train=x", "train.epochz=3"])
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["data.train=x", "model.attn_heads=7"])


def test_rerunning_a_finished_run_resumes_and_a_changed_config_is_refused(trained_run, capsys):
    _, run_dir, config = trained_run
    before = json.loads((run_dir / "metrics.json").read_text())
    history = (run_dir / "history.jsonl").read_text()
    args = ["train", "--config", str(config), "--quiet", "--set", "train.epochs=20", "--set", f"output_dir={run_dir}"]
    # Every epoch is in the checkpoint: nothing is trained again. Thread count is not part of
    # what a run computes, so it may differ on resume.
    assert main(args + ["--set", "train.num_threads=1"]) == 0
    assert (run_dir / "history.jsonl").read_text() == history
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["test"]["f1"] == before["test"]["f1"] and after["best_epoch"] == before["best_epoch"]

    assert main(args + ["--set", "train.head_lr=0.01"]) == 2
    assert "train.head_lr" in capsys.readouterr().err
