"""bench/quality.py, the paper-table harness: the table (mean ± std over seeds beside the paper's
figure), resuming from the results file, and one tiny cell run end to end on the local Ray
cluster (a second invocation runs nothing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load_harness():
    # bench/ is not a package; registered in sys.modules because OmegaConf reads the
    # dataclasses' annotations through their module.
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


quality = _load_harness()
PAPER = yaml.safe_load((ROOT / "bench" / "paper_results.yaml").read_text(encoding="utf-8"))


def _result(dataset, setting, variant, seed, f1):
    return {"dataset": dataset, "setting": setting, "variant": variant, "seed": seed, "test_f1": f1}


def _table_lines(results, paper_names):
    return quality.quality_table(results, PAPER, paper_names).splitlines()


def test_table_cells_show_mean_std_seeds_and_the_paper_figure():
    results = [
        _result("weibo", "n250", "F", 1, 0.455), _result("weibo", "n250", "F", 2, 0.463),
        _result("weibo", "n250", "F", 3, 0.471),
        _result("weibo", "n250", "noext", 1, 0.40),       # Table 3 is at 1000 only: no paper figure
        _result("weibo", "n1000", "noext", 1, 0.70),      # one seed: no std
        _result("weibo", "n1000", "biaffine", 1, 0.65),   # Table 1 BiaffineNER and Table 3
        _result("weibo", "k5", "FS", 1, 0.30), _result("weibo", "k5", "FS", 2, 0.34),
        _result("msra", "n250", "F", 1, 0.80),            # no paper column
    ]
    lines = _table_lines(results, {"weibo": "Weibo", "msra": None})
    assert lines[0] == "| variant | Weibo k5 | Weibo n250 | Weibo n1000 | msra n250 |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == ["biaffine", "noext", "F", "FS"]
    assert rows["F"][1] == "46.3 ± 0.8 (3) · paper 66.76"
    assert rows["F"][3].rstrip(" |") == "80.0 (1)"
    assert rows["noext"][1] == "40.0 (1)"
    assert rows["noext"][2] == "70.0 (1) · paper 72.32"
    assert rows["biaffine"][2] == "65.0 (1) · paper 69.70 (T1), 69.87 (T3)"
    assert rows["FS"][0] == "32.0 ± 2.8 (2) · paper 35.58 ± 2.33"
    assert rows["F"][0] == "–"  # no F result at k5


def test_paper_lookup_and_latest_record_per_seed():
    assert quality.paper_figures(PAPER, "UD", "n500", "F") == [("T1", "92.71")]
    assert quality.paper_figures(PAPER, "UD", "n500", "noext") == []
    assert quality.paper_figures(PAPER, "Weibo", "k10", "F") == []   # Table 2 has FS ("Ours") only
    assert quality.paper_figures(PAPER, None, "n250", "F") == []
    # a cell rerun on purpose (its line deleted and the run redone) appends again: the last one counts
    lines = _table_lines([_result("weibo", "n250", "F", 1, 0.1), _result("weibo", "n250", "F", 1, 0.5)],
                         {"weibo": "Weibo"})
    assert lines[2] == "| F | 50.0 (1) · paper 66.76 |"


def _dry_config(tmp_path: Path, results: Path) -> Path:
    train = tmp_path / "train.yaml"
    train.write_text(yaml.safe_dump({"data": {"train": "unused.jsonl"}}), encoding="utf-8")
    config = {
        "results": str(results), "runs_dir": str(tmp_path / "runs"),
        "paper_results": str(ROOT / "bench" / "paper_results.yaml"),
        "datasets": {
            "weibo": {"paper_name": "Weibo", "train_config": str(train),
                      "grids": [{"subset_sizes": [250], "seeds": [1, 2], "variants": ["noext", "F"]},
                                {"subset_sizes": [500], "seeds": [1], "variants": ["F"]}]},
            "pos": {"train_config": str(train), "k_shot": [5], "seeds": [1], "variants": ["noext"]},
        },
    }
    path = tmp_path / "quality.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")  # dataset order matters
    return path


def test_finished_cells_are_skipped_and_dry_run_lists_the_rest(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    config_path = _dry_config(tmp_path, results)
    config = quality.load_structured(quality.QualityConfig, config_path)
    cells = quality.plan_cells(config, {})
    assert [(c.dataset, c.name, c.variants) for c in cells] == [
        ("weibo", "n250-seed1", ["noext", "F"]), ("weibo", "n250-seed2", ["noext", "F"]),
        ("weibo", "n500-seed1", ["F"]), ("pos", "k5-seed1", ["noext"]),
    ]
    assert cells[0].root == tmp_path / "runs" / "weibo" / "n250-seed1"
    assert "data.subset_size=250" in cells[0].overrides and "train.seed=1" in cells[0].overrides

    for record in (_result("weibo", "n250", "noext", 1, 0.4), _result("weibo", "n250", "F", 1, 0.5),
                   _result("weibo", "n250", "F", 2, 0.5)):
        quality.append_result(results, record)
    with results.open("a", encoding="utf-8") as out:
        out.write('{"dataset": "weibo", "sett')  # a torn last line (killed while appending) is ignored
    pending = quality.pending_cells(cells, quality.read_results(results))
    assert [(c.name, c.variants) for c in pending] == [
        ("n250-seed2", ["noext"]), ("n500-seed1", ["F"]), ("k5-seed1", ["noext"])]

    assert quality.main(["--config", str(config_path), "--dry-run", "--only", "dataset=weibo"]) == 0
    out = capsys.readouterr().out
    assert "weibo n250-seed2: noext " in out and "weibo n500-seed1: F " in out
    assert "n250-seed1" not in out and "pos" not in out
    assert "2 of 3 cells to run" in out

    selection = quality.parse_selection("setting=n250,seed=2,seed=3")
    assert [(c.name, c.variants) for c in quality.plan_cells(config, selection)] == [("n250-seed2", ["noext", "F"])]
    with pytest.raises(quality.ConfigError):
        quality.parse_selection("size=250")


def test_a_grid_needs_known_variants(tmp_path):
    entry = quality.DatasetEntry(train_config="x.yaml", subset_sizes=[10], variants=["F", "crf"])
    with pytest.raises(quality.ConfigError, match="crf"):
        quality.dataset_grids("bad", entry)


def test_one_tiny_cell_end_to_end_and_a_rerun_runs_nothing(ray_cluster, tmp_path, capsys, monkeypatch):
    from model_fixtures import tiny_quality_config

    config_path = tiny_quality_config(tmp_path, seeds=[1], variants=["noext"])
    results = tmp_path / "results.jsonl"

    assert quality.main(["--config", str(config_path)]) == 0
    lines = results.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert {k: record[k] for k in ("dataset", "setting", "variant", "seed", "train_sentences", "best_epoch")} == {
        "dataset": "tiny", "setting": "n10", "variant": "noext", "seed": 1, "train_sentences": 10, "best_epoch": 1}
    assert 0.0 <= record["test_f1"] <= 1.0 and record["dev_f1"] is not None
    assert record["synthesis_engine"] is None and "CPUs" in record["machine"]
    assert record["command"] == f"python bench/quality.py --config {config_path}"
    assert (tmp_path / "runs" / "tiny" / "n10-seed1" / "train_noext" / "metrics.json").is_file()
    out = capsys.readouterr().out
    assert "| variant | Weibo n10 |" in out and f"| noext | {100 * record['test_f1']:.1f} (1) |" in out

    class NoRun:  # the second invocation must not build a single cell
        def __init__(self, *args):
            raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(quality, "Cell", NoRun)
    assert quality.main(["--config", str(config_path)]) == 0
    assert results.read_text(encoding="utf-8").splitlines() == lines
    assert "| noext |" in capsys.readouterr().out
