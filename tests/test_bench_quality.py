"""bench/quality.py, the paper-table harness: the table (mean ± std over seeds beside the paper's
figure), resuming from the results file, and one tiny cell run end to end on the local Ray
cluster (a second invocation runs nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[1]

quality = load_bench_script("quality", "bench_quality")
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


def _paired_module():
    return sys.modules.get("quality_paired") or __import__("quality_paired")


def test_paired_differences_wins_and_p_values_per_cell():
    paired = _paired_module()
    results = []
    for seed, (f, noext) in enumerate([(0.50, 0.49), (0.51, 0.49), (0.52, 0.49), (0.53, 0.49), (0.54, 0.49)], 1):
        results += [_result("weibo", "n250", "F", seed, f), _result("weibo", "n250", "noext", seed, noext)]
    results.append(_result("weibo", "n250", "F", 6, 0.6))  # no noext partner: not paired
    results.append(_result("ud", "n250", "F", 1, 0.70))
    results.append(_result("ud", "n250", "noext", 1, 0.75))
    latest = quality.latest_results(results)
    by_cell = {(c.dataset, c.setting): c for c in paired.paired_comparisons(latest, "F", "noext")}
    weibo = by_cell["weibo", "n250"]
    assert weibo.seeds == [1, 2, 3, 4, 5]
    assert weibo.differences == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert weibo.mean == pytest.approx(3.0) and weibo.sd == pytest.approx(1.5811, abs=1e-4)
    assert (weibo.wins, weibo.losses, weibo.ties) == (5, 0, 0)
    # 5 of 5 seeds the same way: both exact two-sided tests give 2 / 2^5.
    assert weibo.sign_p == pytest.approx(0.0625) and weibo.wilcoxon_p == pytest.approx(0.0625)
    ud = by_cell["ud", "n250"]
    assert ud.differences == pytest.approx([-5.0]) and ud.sd is None and ud.wilcoxon_p is None
    assert ud.sign_p == pytest.approx(1.0)
    table = paired.paired_table(list(by_cell.values()), {"weibo": "Weibo", "ud": "UD"}, order=["weibo", "ud"])
    lines = table.splitlines()
    assert lines[0].startswith("| cell | F − noext (points) |")
    assert lines[2].startswith("| Weibo n250 (5 seeds) | +3.0 ± 1.6 | 1: +1.0, 2: +2.0")
    assert "| 5 / 0 / 0 | 0.062 | 0.062 |" in lines[2]
    assert lines[3].startswith("| UD n250 (1 seed) | −5.0 |")


def test_default_pairs_and_the_compare_option(tmp_path, capsys):
    paired = _paired_module()
    assert paired.default_pairs(["biaffine", "noext", "F", "F-view"]) == [
        ("F", "noext"), ("F-view", "noext"), ("F", "biaffine"), ("F-view", "biaffine"), ("noext", "biaffine")]
    # what adds samples to F's is compared with F first; FU is not "no extension labels" either
    assert paired.default_pairs(["noext", "F", "FU", "FU-msra", "FS"])[:3] == [("FU", "F"), ("FU-msra", "F"), ("FS", "F")]
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(_result("weibo", "n250", v, s, f)) for v, s, f in [
        ("F", 1, 0.5), ("noext", 1, 0.4), ("F", 2, 0.5), ("noext", 2, 0.45)]) + "\n", encoding="utf-8")
    config = tmp_path / "quality.yaml"
    config.write_text(yaml.safe_dump({"datasets": {"weibo": {"paper_name": "Weibo", "train_config": "x.yaml",
                                                             "subset_sizes": [250], "seeds": [1],
                                                             "variants": ["F"]}}}), encoding="utf-8")
    assert quality.main(["--config", str(config), "--results", str(results), "--table-only",
                         "--compare", "F:noext"]) == 0
    out = capsys.readouterr().out
    assert "| Weibo n250 (2 seeds) | +7.5 ± 3.5 | 1: +10.0, 2: +5.0 | 2 / 0 / 0 | 0.500 | 0.500 |" in out
    with pytest.raises(quality.ConfigError, match="VARIANT:BASELINE"):
        quality.parse_pair("F")


def test_custom_variants_are_planned_from_the_shared_and_dataset_sections(tmp_path):
    config = quality.load_structured(quality.QualityConfig, None, [
        "custom_variants={F-view: {train_overrides: [model.alpha_scheme=view]}}",
        "datasets={tiny: {train_config: x.yaml, subset_sizes: [10], seeds: [1], variants: [F-view, F-ud],"
        " custom_variants: {F-ud: {train_overrides: [model.view_weights.pos=0]}}}}"])
    cells = quality.plan_cells(config, {})
    assert [c.variants for c in cells] == [["F-view", "F-ud"]]
    assert set(cells[0].pipeline.custom_variants) == {"F-view", "F-ud"}
    with pytest.raises(quality.ConfigError, match="F-other"):
        quality.dataset_grids("tiny", quality.DatasetEntry(train_config="x.yaml", subset_sizes=[10],
                                                           variants=["F-other"]), config.custom_variants)
