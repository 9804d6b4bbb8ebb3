"""jobs.predict end to end on a local Ray cluster: the rows are what ``knowfree predict``
writes for the same model, every sentence exactly once through an actor crash, a rerun does
no work, a changed model or setting is refused, and long sentences go through windows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from knowfree_core.cli import main as knowfree
from knowfree_core.errors import ConfigError
from knowfree_core.formats import write_dataset

from model_fixtures import save_trained_tiny_model, tiny_corpus

pytest.importorskip("ray")
from jobs.fault_injection import EXIT_MARKER, EXIT_ON_ID  # noqa: E402
from jobs.predict import load_job_config, run_prediction  # noqa: E402

LONG = "张三在北京工作。李四去了上海。我和王五住在广州" * 6  # 138 characters; the encoder takes 62


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_trained_tiny_model(tmp_path_factory.mktemp("predict_model"))


def _config(tmp_path: Path, model: Path, inputs: list[Path], *overrides: str):
    return load_job_config(
        None,
        [f"model={model}", f"input=[{','.join(map(str, inputs))}]", f"output_dir={tmp_path / 'job'}",
         "pool.num_actors=2", "pool.cpus_per_actor=0.5", "pool.batch_size=8", "batch_size=4", *overrides],
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _spans(record: dict) -> list[tuple]:
    return [(s["start"], s["end"], s["label"], s["text"]) for s in record["spans"]]


def test_rows_are_knowfree_predicts_and_a_rerun_writes_nothing(ray_cluster, model_dir, tmp_path):
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    lines = [s.text for s in tiny_corpus(20, seed=4, with_extensions=False)] + [LONG]
    (text_dir / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = run_prediction(_config(tmp_path, model_dir, [text_dir]))

    rows = _lines(tmp_path / "job" / "predictions.jsonl")
    assert [row["id"] for row in rows] == [f"lines.txt:{n}" for n in range(1, len(lines) + 1)]
    assert summary["sentences"] == len(lines) and summary["duplicates_dropped"] == 0
    out = tmp_path / "cli.jsonl"
    assert knowfree(["predict", "--model", str(model_dir), "--input", str(text_dir / "lines.txt"),
                     "--output", str(out)]) == 0
    expected = _lines(out)
    assert sum(len(r["spans"]) for r in expected) > len(lines)
    for row, record in zip(rows, expected):
        assert (row["text"], _spans(row), row["windows"]) == (record["text"], _spans(record), record["windows"])
        assert [s["score"] for s in row["spans"]] == pytest.approx([s["score"] for s in record["spans"]], abs=1e-6)
    # the long line went through windows, the model is named and versioned on every row
    assert rows[-1]["windows"] == 4 and summary["sentences_in_several_windows"] == 1 and summary["most_windows"] == 4
    assert {(row["model"], len(row["model_version"])) for row in rows} == {(str(model_dir), 16)}
    assert summary["spans_by_label"] == {
        label: sum(s["label"] == label for r in expected for s in r["spans"]) for label in ("LOC", "PER")}
    assert summary["sentences_per_second"] > 0

    # the same command again does no work and keeps the output
    again = run_prediction(_config(tmp_path, model_dir, [text_dir]))
    assert again["written_this_run"] == 0 and _lines(tmp_path / "job" / "predictions.jsonl") == rows
    # so does the same model copied elsewhere: the version is the folder's content, not its path
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert run_prediction(_config(tmp_path, copy, [text_dir]))["written_this_run"] == 0

    # a changed model, or a changed setting, on the same folder is refused in one line
    manifest = json.loads((copy / "knowfree.json").read_text(encoding="utf-8"))
    manifest["model"]["threshold"] = 0.3
    (copy / "knowfree.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ConfigError, match="holds a prediction job with different model; use a new output_dir") as error:
        run_prediction(_config(tmp_path, copy, [text_dir]))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="different settings.min_score"):
        run_prediction(_config(tmp_path, model_dir, [text_dir], "min_score=0.9"))
    restarted = run_prediction(_config(tmp_path, copy, [text_dir], "restart=true"))
    assert restarted["written_this_run"] == len(lines) and restarted["model_version"] != summary["model_version"]


def test_killed_actor_loses_no_row_and_duplicates_none(ray_cluster, model_dir, tmp_path, monkeypatch):
    sentences = tiny_corpus(60, seed=6, prefix="k", with_extensions=False)
    write_dataset(sentences, tmp_path / "input.jsonl")
    monkeypatch.setenv(EXIT_ON_ID, "k37")  # the actor labelling k37 exits once, mid-batch
    summary = run_prediction(_config(tmp_path, model_dir, [tmp_path / "input.jsonl"]))
    assert (tmp_path / "job" / EXIT_MARKER).exists(), "the actor was supposed to die once"
    rows = _lines(tmp_path / "job" / "predictions.jsonl")
    assert [row["id"] for row in rows] == [s.id for s in sentences]
    # every row file together: each id once (not only in the collected file)
    from knowfree_core.annotation import read_output_rows

    written = [row["id"] for row in read_output_rows(tmp_path / "job" / "rows")]
    assert sorted(written) == sorted(s.id for s in sentences)
    assert summary["duplicates_dropped"] == 0 and summary["actor_restarts"] >= 1


def test_parquet_in_parquet_out_with_a_long_sentence_in_windows(ray_cluster, model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from knowfree_core.model.knowfree import KnowFreeModel
    from knowfree_core.prediction import PredictSettings, predict_sentences
    from knowfree_core.records import Sentence

    texts = [s.text for s in tiny_corpus(6, seed=8, with_extensions=False)] + [LONG * 2]
    pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), tmp_path / "docs.parquet")
    summary = run_prediction(_config(tmp_path, model_dir, [tmp_path / "docs.parquet"], "text_column=body",
                                     "output_format=parquet", "max_units=40", "pool.num_actors=1",
                                     "pool.memory_mb=256"))  # a reservation Ray can honour
    rows = pq.read_table(tmp_path / "job" / "predictions.parquet").to_pylist()
    assert [row["id"] for row in rows] == [f"docs.parquet:{n}" for n in range(1, len(texts) + 1)]
    assert [row["text"] for row in rows] == texts
    assert list(rows[0]) == ["id", "text", "spans", "windows", "model", "model_version"]
    model = KnowFreeModel.from_pretrained(model_dir)
    expected = predict_sentences(model, [Sentence(str(i), list(t)) for i, t in enumerate(texts)],
                                 PredictSettings(max_units=40))
    assert [row["windows"] for row in rows] == [p.windows for p in expected] == [1] * 6 + [13]
    assert [_spans(row) for row in rows] == [[(s.start, s.end, s.label, s.text) for s in p.spans] for p in expected]
    # the whole long sentence is labelled: spans in each of its thirds
    assert {s["start"] * 3 // len(texts[-1]) for s in rows[-1]["spans"]} == {0, 1, 2}
    assert summary["windows"] == 6 + 13 and summary["most_windows"] == 13


def test_the_example_config_loads_and_a_folder_without_a_model_is_one_line(tmp_path, capsys):
    from jobs.cli import PREDICT
    from knowfree_core.commandline import main

    root = Path(__file__).resolve().parents[1]
    config = load_job_config(str(root / "configs" / "predict.yaml"), [])
    assert config.model == "runs/demo/model" and config.pool.num_actors == 2
    code = main(PREDICT, ["--config", str(root / "configs" / "predict.yaml"), "--set", f"model={tmp_path}",
                          "--set", f"output_dir={tmp_path / 'job'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not a saved KnowFREE model" in err
    assert not (tmp_path / "job").exists()  # nothing written, no Ray started
