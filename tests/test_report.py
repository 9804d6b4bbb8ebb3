"""Per-run reports (knowfree_core.report, ``knowfree report``) on two tiny trained runs: one with
extension labels and synthetic sentences, one without extension labels on a smaller subset."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml

from knowfree_core.cli import main
from knowfree_core.config import load_config
from knowfree_core.formats import read_dataset, write_dataset
from knowfree_core.report import (
    EMBEDDINGS_2D,
    EXTENSION_HEATMAP,
    F1_BY_SIZE,
    LEARNING_CURVE,
    Heading,
    Paragraph,
    Table,
    predict_with_extensions,
    project_2d,
    render_html,
    render_markdown,
    write_report,
)
from knowfree_core.run import run_training

from model_fixtures import tiny_corpus, tiny_run_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SYNTHETIC = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(root, run with extension labels + synthetic data, run without extension labels)."""
    import torch

    threads = torch.get_num_threads()  # train.num_threads sets it for the whole process
    root = tmp_path_factory.mktemp("report")
    # One torch thread: on a busy two-core machine more threads only wait on each other.
    config = tiny_run_config(root, epochs=4, encoder_lr=1e-3, head_lr=3e-3, warmup_ratio=0.0, num_threads=1,
                             threshold_candidates=[0.2, 0.3, 0.5])
    config["model"]["dropout"] = 0.0
    # Synthetic sentences, as the FS variant adds them (they keep their extension spans).
    train = read_dataset(root / "train.jsonl")
    synthetic = [replace(s, synthetic=True) for s in tiny_corpus(SYNTHETIC, seed=7, prefix="syn")]
    write_dataset(train + synthetic, root / "train.jsonl")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")

    with_ext = root / "run-ext"
    run_training(load_config(path, [f"output_dir={with_ext}"]), progress=False)
    without = root / "run-noext"
    # Only its report's skips and its size matter, not its quality: two epochs are enough.
    run_training(load_config(path, [f"output_dir={without}", "model.use_extension_labels=false",
                                    "data.subset_size=12", "train.epochs=2"]), progress=False)
    torch.set_num_threads(threads)
    return root, with_ext, without


def assert_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))  # axes, ticks and marks, not an empty canvas


def test_full_report_has_every_plot_and_label(runs):
    root, run_dir, other = runs
    # The tiny random encoder is a valid sentence-transformers path: seconds instead of e5's load.
    page = write_report(run_dir, embedder=str(root / "encoder"), compare_runs=[other, run_dir])
    out = run_dir / "report"
    assert page == out / "report.html"
    for name in (LEARNING_CURVE, F1_BY_SIZE, EXTENSION_HEATMAP, EMBEDDINGS_2D):
        assert_png(out / name)
    md = (out / "report.md").read_text(encoding="utf-8")
    page_text = page.read_text(encoding="utf-8")
    for text in (md, page_text):
        for label in ("PER", "LOC", "SEG", "POS-n"):  # targets and extension labels
            assert label in text, label
        assert "test:seg" in text and "test:pos" in text  # extension labels by source
        assert "Skipped" not in text
    for name in (LEARNING_CURVE, F1_BY_SIZE, EXTENSION_HEATMAP, EMBEDDINGS_2D):
        assert f'<img src="{name}"' in page_text and f"]({name})" in md
    assert f"| synthetic sentences | {SYNTHETIC} |" in md
    assert "t-SNE" in md  # 20 gold + 6 synthetic + 8 test sentences: enough points for t-SNE

    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert f"| test | {100 * metrics['test']['precision']:.2f} |" in md
    history = (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()
    assert md.count("\n| ") >= len(history)
    # Both runs in the size plot, once each (the run was also passed in compare_runs), by gold
    # size: the 12-sentence subset of the other run may have drawn synthetic sentences too.
    other_gold = sum(not s.synthetic for s in read_dataset(other / "train_data.jsonl"))
    assert f"| {run_dir} | 20 |" in md and f"| {other} | {other_gold} |" in md
    assert md.count(f"| {run_dir} |") == 1


def test_heatmap_skipped_with_a_note_without_extension_labels(runs):
    _, _, run_dir = runs
    (run_dir / "report").mkdir(exist_ok=True)
    (run_dir / "report" / EMBEDDINGS_2D).write_bytes(b"stale")  # from an earlier report
    write_report(run_dir, embeddings=False)
    out = run_dir / "report"
    assert_png(out / LEARNING_CURVE)
    assert_png(out / F1_BY_SIZE)
    assert not (out / EXTENSION_HEATMAP).exists()
    assert not (out / EMBEDDINGS_2D).exists()
    for name in ("report.md", "report.html"):
        text = (out / name).read_text(encoding="utf-8")
        assert "Skipped: the model has no extension labels" in text
        assert "Skipped (embeddings disabled)" in text
        assert "PER" in text and "LOC" in text
        assert EXTENSION_HEATMAP not in text and EMBEDDINGS_2D not in text


def test_cli_report_scores_an_override_test_file(runs):
    root, _, run_dir = runs
    assert main(["report", "--run", str(run_dir), "--data", str(root / "test.jsonl"), "--no-embeddings"]) == 0
    md = (run_dir / "report" / "report.md").read_text(encoding="utf-8")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    # The same file as the config's test split: the fresh evaluation reproduces metrics.json.
    assert f"| test (test.jsonl) | {100 * metrics['test']['precision']:.2f} | " \
           f"{100 * metrics['test']['recall']:.2f} | {100 * metrics['test']['f1']:.2f} |" in md
    assert main(["report", "--run", str(root / "missing")]) == 2


def test_extension_logits_come_with_the_models_own_predictions(runs):
    from knowfree_core.model.knowfree import KnowFreeModel

    root, run_dir, _ = runs
    model = KnowFreeModel.from_pretrained(run_dir / "model")
    test = read_dataset(root / "test.jsonl")
    predictions, affinity = predict_with_extensions(model, test, batch_size=3)
    assert predictions == model.predict(test)
    assert affinity.extensions == ["POS-n", "SEG"] and affinity.targets == ["LOC", "PER"]
    assert affinity.counts.sum() == sum(len(p) for p in predictions) > 0
    assert ((affinity.mean >= 0) & (affinity.mean <= 1)).all()


def test_projection_is_seeded_and_falls_back_to_pca_for_few_points():
    vectors = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    coords, method = project_2d(vectors, seed=1)
    again, _ = project_2d(vectors, seed=1)
    assert method == "t-SNE" and coords.shape == (40, 2) and np.allclose(coords, again)
    few, method = project_2d(vectors[:5], seed=1)
    assert method == "PCA" and few.shape == (5, 2)
    two, _ = project_2d(vectors[:2], seed=1)
    assert two.shape == (2, 2)


def test_text_is_escaped_in_html_and_markdown():
    blocks = [Heading("a <b> & c"), Paragraph("x<script>"), Table(["label", "n"], [["A|B", "<1>"]])]
    page = render_html(blocks, "t<i>")
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt; &amp; c" in page
    assert "<title>t&lt;i&gt;</title>" in page and "<td>&lt;1&gt;</td>" in page
    assert "| A\\|B | <1> |" in render_markdown(blocks)


TOKENS = {"by_step": {"ent": {"prompt_version": "ent-zh-v2", "prompt_tokens": 400, "completion_tokens": 80,
                              "requests": 2, "cached": 1}},
          "per_1000_sentences": {"prompt_tokens": 150000.0, "completion_tokens": 30000.0}}
COST = {"run": 0.0016, "per_1000_sentences": 0.6, "projected": {"sentences": 1000000, "cost": 600.0}}


def test_an_llm_job_folder_reports_its_tokens_and_cost(tmp_path):
    job = tmp_path / "annotate"
    job.mkdir()
    (job / "summary.json").write_text(json.dumps({"sentences": 4, "tokens": TOKENS, "cost": COST}), encoding="utf-8")
    assert main(["report", "--run", str(job)]) == 0
    md = (job / "report" / "report.md").read_text(encoding="utf-8")
    assert "LLM tokens and cost" in md
    assert "| ent | ent-zh-v2 | 400 | 80 | 2 | 1 |" in md
    assert "150000 prompt and 30000 completion tokens" in md
    assert "cost of this output 0.0016; 0.6000 per 1000 sentences, 600.00 projected for 1,000,000 sentences" in md
    # without a price: the tokens, and a note instead of the cost
    (job / "summary.json").write_text(json.dumps({"tokens": TOKENS, "cost": None}), encoding="utf-8")
    write_report(job)
    assert "no price (engine.price_per_million)" in (job / "report" / "report.md").read_text(encoding="utf-8")


def test_token_summaries_of_a_run_in_a_pipeline_cell_include_the_cells_stages(tmp_path):
    from knowfree_core.report import token_summaries

    cell = tmp_path / "k5-seed0"
    for stage, tokens in (("annotate", TOKENS), ("synthesize", TOKENS), ("merge", None)):
        (cell / stage).mkdir(parents=True)
        summary = {"sentences": 4} | ({"tokens": tokens} if tokens else {})
        (cell / stage / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (cell / "train_f").mkdir()
    (cell / "cell.json").write_text("{}", encoding="utf-8")
    found = token_summaries(cell / "train_f")
    assert [(s.name, s.tokens["by_step"]["ent"]["prompt_tokens"]) for s in found] == [
        ("annotate", 400), ("synthesize", 400)]
    assert token_summaries(tmp_path / "nowhere") == []
