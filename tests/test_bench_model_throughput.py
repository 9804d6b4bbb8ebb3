"""bench/model_throughput.py on the tiny random encoder (CPU, 1 thread, 2 timed batches): the
table has a train row and a predict row with positive throughput, and --append adds exactly one
section, with the command, to the results file given."""

from __future__ import annotations

import torch
import yaml

from bench_scripts import load_bench_script
from model_fixtures import tiny_run_config


def _table_rows(output: str) -> dict[str, list[str]]:
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    header = lines.index(next(line for line in lines if line.startswith("| phase |")))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    rows = {}
    for line in lines[header + 1 :]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(columns, cells))
    return rows


def test_train_and_predict_rows_and_one_appended_section(tmp_path, capsys):
    bench = load_bench_script("model_throughput", "bench_model_throughput")
    run = tiny_run_config(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(run), encoding="utf-8")
    results = tmp_path / "tmp" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nearlier text\n", encoding="utf-8")
    threads = torch.get_num_threads()
    argv = [
        "--encoder", run["encoder"]["name"], "--config", str(config),
        "--data", run["data"]["train"], "--test", run["data"]["test"], "--limit", "8",
        "--device", "cpu", "--threads", "1", "--batch-size", "4", "--predict-batch-size", "4",
        "--warmup-batches", "1", "--train-batches", "2", "--precision", "fp32", "bf16",
        "--append", "--results", str(results),
    ]
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # leave the other tests their thread count
    output = capsys.readouterr().out

    rows = _table_rows(output.split("Setup:")[-1])
    assert set(rows) == {"train", "predict"}  # bf16 is skipped on a CPU, with a note
    assert "bf16 skipped" in output
    for phase, row in rows.items():
        assert row["precision"] == "fp32" and row["batch size"] == "4"
        assert float(row["sentences/s"]) > 0 and float(row["seconds"]) > 0, phase
        assert float(row["units/s"].replace(",", "")) > 0 and float(row["peak RSS MiB"].replace(",", "")) > 0, phase
    assert rows["train"]["batches"] == "2" and rows["train"]["sentences"] == "8"  # 2 timed batches of 4
    assert rows["predict"]["sentences"] == "8"

    text = results.read_text(encoding="utf-8")
    assert text.startswith("# Results\n\nearlier text\n")  # appended, not rewritten
    assert text.count("\n## ") == 1
    section = text.split("\n## ", 1)[1]
    assert "Command: `python bench/model_throughput.py --encoder " in section
    assert "--limit 8 --device cpu --threads 1" in section and "--append --results" in section
    assert "Machine: " in section and f"torch {torch.__version__}" in section
    assert set(_table_rows(section)) == {"train", "predict"}
