"""bench/quality_gpu.py: export a tiny grid's pending cells here (pipeline stages on the local Ray
cluster, a pruned encoder), train the bundle as the GPU machine would (subprocesses, no Ray),
and import the records into the harness's results file without duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench_scripts import load_bench_script


def test_export_train_import_round_trip(ray_cluster, tmp_path, capsys):
    from model_fixtures import tiny_quality_config

    quality_gpu = load_bench_script("quality_gpu")
    config_path = tiny_quality_config(tmp_path, seeds=[1, 2], variants=["noext", "biaffine"])
    results = tmp_path / "results.jsonl"
    # one cell is already done: export leaves it out
    quality_gpu.append_result(results, {"dataset": "tiny", "setting": "n10", "variant": "noext", "seed": 1,
                                        "test_f1": 0.5, "dev_f1": 0.5})

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(SystemExit, match="not a bundle"):  # a user's folder is never emptied
        quality_gpu.main(["export", "--config", str(config_path), "--out", str(tmp_path / "notes")])
    assert (tmp_path / "notes" / "todo.txt").is_file()

    bundle = tmp_path / "bundle"
    quality_gpu.main(["export", "--config", str(config_path), "--out", str(bundle)])
    runs = json.loads((bundle / "runs.json").read_text(encoding="utf-8"))["runs"]
    assert sorted((r["seed"], r["variant"]) for r in runs) == [(1, "biaffine"), (2, "biaffine"), (2, "noext")]
    for run in runs:  # self-contained: every path in a config lies inside the bundle
        exported = yaml.safe_load((bundle / run["config"]).read_text(encoding="utf-8"))
        for path in (exported["data"]["train"], exported["data"]["dev"], exported["data"]["test"],
                     exported["encoder"]["name"]):
            assert not Path(path).is_absolute() and (bundle / path).exists(), path
        assert exported["encoder"]["unit_mode"] == "char"
    assert (bundle / "e5" / "pruning.json").is_file()
    assert "3 runs of 2 cells" in capsys.readouterr().out

    gpu_results = tmp_path / "gpu" / "results.jsonl"
    assert quality_gpu.main(["train", "--bundle", str(bundle), "--results", str(gpu_results),
                             "--parallel", "2", "--deadline", "300"]) == 0
    records = quality_gpu.read_results(gpu_results)
    assert sorted((r["seed"], r["variant"]) for r in records) == [(1, "biaffine"), (2, "biaffine"), (2, "noext")]
    assert all(0.0 <= r["test_f1"] <= 1.0 and r["train_sentences"] == 10 for r in records)
    # the subset is the pipeline's: a GPU run trains on the cell's own training file
    cell_subset = (tmp_path / "runs" / "tiny" / "n10-seed2" / "train_subset.jsonl").read_text(encoding="utf-8")
    exported = (bundle / "cells" / "tiny" / "n10-seed2" / "noext" / "train.jsonl").read_text(encoding="utf-8")
    assert exported == cell_subset

    # a second train call finds nothing left to do
    assert quality_gpu.main(["train", "--bundle", str(bundle), "--results", str(gpu_results)]) == 0
    assert len(quality_gpu.read_results(gpu_results)) == 3

    quality_gpu.main(["import", "--from", str(gpu_results), "--config", str(config_path)])
    quality_gpu.main(["import", "--from", str(gpu_results), "--config", str(config_path)])  # idempotent
    keys = [quality_gpu.result_key(r) for r in quality_gpu.read_results(results)]
    assert sorted(keys) == sorted({("tiny", "n10", v, s) for v in ("noext", "biaffine") for s in (1, 2)})

    # every cell is done now: nothing to export, and the old bundle is left as it is
    with pytest.raises(SystemExit, match="nothing to export"):
        quality_gpu.main(["export", "--config", str(config_path), "--out", str(bundle)])
    assert (bundle / "runs.json").is_file()


def test_the_bundle_keeps_only_the_layers_the_runs_read(tmp_path):
    import torch

    from knowfree_core.encoders.unit_encoder import UnitEncoder
    from model_fixtures import make_random_encoder

    quality_gpu = load_bench_script("quality_gpu")
    assert quality_gpu.deepest_layer([(6, None), ([2, 4], None)]) == 6
    assert quality_gpu.deepest_layer([(6, None), ("mix", 3)]) == 6
    assert quality_gpu.deepest_layer([(6, None), ("mix", None)]) is None
    assert quality_gpu.deepest_layer([(-1, None)]) is None

    folder = make_random_encoder(tmp_path / "enc")  # 2 layers
    full = UnitEncoder(str(folder), layers=1).eval()
    batch = full.collate([list("张三在北京")])
    with torch.no_grad():
        expected = full(batch).hidden
    quality_gpu.keep_first_layers(folder, 1)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 1
    from safetensors.torch import load_file

    names = list(load_file(str(folder / "model.safetensors")))
    assert any("layer.0." in n for n in names) and not any("layer.1." in n for n in names)
    cut = UnitEncoder(str(folder), layers=1).eval()
    with torch.no_grad():
        assert torch.allclose(cut(batch).hidden, expected)
