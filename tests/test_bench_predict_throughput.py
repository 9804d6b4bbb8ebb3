"""bench/predict_throughput.py on a tiny saved model and a raw-text file (CPU, 1 thread): the
table has a loop row and a 1-actor jobs.predict row over the same sentences, the targets are
printed (the 2-actor one unmeasured), nothing is appended without --append; --loop-only with
--append adds exactly one section, with the command, to the results file given."""

from __future__ import annotations

import pytest
import torch

from bench_scripts import load_bench_script, markdown_table_rows
from model_fixtures import save_trained_tiny_model, tiny_corpus


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        return save_trained_tiny_model(tmp_path_factory.mktemp("predict-bench"), epochs=1)
    finally:
        torch.set_num_threads(threads)


def _text_file(tmp_path, count=30):
    path = tmp_path / "sentences.txt"
    path.write_text("".join(s.text + "\n" for s in tiny_corpus(count, seed=4, with_extensions=False)), encoding="utf-8")
    return path


def _run(bench, argv):
    threads = torch.get_num_threads()
    try:
        return bench.main(argv)
    finally:
        torch.set_num_threads(threads)  # leave the other tests their thread count


def test_loop_and_one_actor_rows_and_nothing_appended(tiny_model, tmp_path, capsys, ray_cluster):
    bench = load_bench_script("predict_throughput", "bench_predict_throughput")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n", encoding="utf-8")
    default_results = bench.RESULTS.read_bytes()
    argv = ["--model", str(tiny_model), "--data", str(_text_file(tmp_path)), "--format", "text", "--limit", "20",
            "--actors", "1", "--batch-size", "4", "--rows-per-call", "8", "--results", str(results)]
    assert _run(bench, argv) == 0
    output = capsys.readouterr().out

    rows = markdown_table_rows(output.split("Setup:")[-1])
    assert list(rows) == ["single-process loop (fp32, 1 thread)", "jobs.predict, 1 actor"]
    loop, job = rows.values()
    for row in rows.values():
        assert row["sentences"] == "20" and float(row["seconds"]) > 0 and float(row["sentences/s"]) > 0
        assert row["× 1 actor"] == "—"
    assert loop["× loop"] == "—" and job["× loop"].endswith("×")
    assert loop["spans"] == job["spans"]  # the same sentences, model and settings
    assert float(job["Ray Data s (summary)"]) > 0 and float(job["busy s per actor"]) > 0
    assert loop["Ray Data s (summary)"] == "—"
    assert "- 1 actor ≥ 0.9× the loop: " in output and ("pass" in output or "FAIL" in output)
    assert "- 2 single-thread actors ≥ 1.7× one: not measured" in output

    assert results.read_text(encoding="utf-8") == "# Results\n"  # no --append: nothing written
    assert bench.RESULTS.read_bytes() == default_results


def test_loop_only_appends_one_section(tiny_model, tmp_path, capsys):
    bench = load_bench_script("predict_throughput", "bench_predict_throughput")
    results = tmp_path / "out" / "RESULTS.md"
    argv = ["--model", str(tiny_model), "--data", str(_text_file(tmp_path)), "--format", "text", "--loop-only",
            "--precision", "fp32", "bf16", "--batch-size", "4", "--append", "--results", str(results)]
    assert _run(bench, argv) == 0
    output = capsys.readouterr().out
    assert "bf16 skipped" in output and "Targets" not in output

    text = results.read_text(encoding="utf-8")
    assert text.count("\n## ") == 1 and "## Prediction throughput (CPU): a single-process loop on sentences.txt" in text
    assert "Command: `python bench/predict_throughput.py --model " in text and "--loop-only" in text
    assert "Machine: " in text and f"torch {torch.__version__}" in text
    assert list(markdown_table_rows(text.split("Setup:")[-1])) == ["single-process loop (fp32, 1 thread)"]
    assert markdown_table_rows(text.split("Setup:")[-1])["single-process loop (fp32, 1 thread)"]["sentences"] == "30"
