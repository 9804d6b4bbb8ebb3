"""Assembles a run's report: the sections (scores, per-label scores, training history,
training data, the plots) rendered to ``run_dir/report/report.md`` and ``report.html`` by
:func:`write_report` (see the package docstring for what the folder holds)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import KnowFreeError
from ..labels import LabelVocab
from ..records import Sentence
from .analysis import _embedding_sets, _load_embedder, predict_with_extensions, project_2d
from .document import Block, Heading, Image, Paragraph, Table, render_html, render_markdown
from .plots import (
    EMBEDDINGS_2D,
    EXTENSION_HEATMAP,
    F1_BY_SIZE,
    LEARNING_CURVE,
    plot_embeddings,
    plot_extension_heatmap,
    plot_f1_by_training_size,
    plot_learning_curve,
)
from ..llm.ledger import TOKEN_HEADER, token_rows
from .run_folder import RunRecord, TokenSummary, _read_split, load_run, token_summaries, training_size_points

logger = logging.getLogger(__name__)

REPORT_DIR = "report"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}"


def _score_row(name: str, scores: dict) -> list[str]:
    return [name, _pct(scores["precision"]), _pct(scores["recall"]), _pct(scores["f1"]),
            str(scores["support"]), str(scores["predicted"]), str(scores["correct"])]


_SCORE_HEADER = ["", "P (%)", "R (%)", "F1 (%)", "gold", "predicted", "correct"]


def _scores_section(metrics: dict, extra: Optional[tuple[str, dict]]) -> list[Block]:
    blocks: list[Block] = [Heading("Scores")]
    rows = [_score_row(split, metrics[split]) for split in ("dev", "test") if split in metrics]
    if extra:
        rows.append(_score_row(*extra))
    if not rows:
        return blocks + [Paragraph("No scores yet: metrics.json is missing (the run has not finished).")]
    blocks.append(Paragraph("Span-level micro precision, recall and F1 on exact (start, end, label) matches."))
    blocks.append(Table(_SCORE_HEADER, rows))
    return blocks


def _per_label_section(name: str, scores: Optional[dict]) -> list[Block]:
    if not scores:
        return []
    rows = [_score_row(label, row) for label, row in scores["per_label"].items()]
    return [Heading(f"Per-label scores ({name})"), Table(["label", *_SCORE_HEADER[1:]], rows)]


def _history_section(history: Sequence[dict], plot: Optional[str]) -> list[Block]:
    blocks: list[Block] = [Heading("Training history")]
    if not history:
        return blocks + [Paragraph("history.jsonl is empty or missing.")]
    rows = [[str(h["epoch"]), f"{float(h['train_loss']):.4f}", _pct(h.get("dev_f1")),
             "yes" if h.get("is_best") else "", f"{float(h.get('seconds', 0.0)):.1f}"] for h in history]
    blocks.append(Table(["epoch", "train loss", "dev F1 (%)", "best so far", "seconds"], rows))
    if plot:
        blocks.append(Image(plot, "learning curve: dev F1 and training loss per epoch"))
    return blocks


def _training_data_section(train: Sequence[Sentence], vocab: Optional[LabelVocab]) -> list[Block]:
    synthetic = sum(1 for s in train if s.synthetic)
    target_counts = Counter(span.label for s in train for span in s.spans)
    summary = Table(["", "count"], [
        ["sentences", str(len(train))],
        ["gold sentences", str(len(train) - synthetic)],
        ["synthetic sentences", str(synthetic)],
        ["target spans", str(sum(target_counts.values()))],
        ["extension spans", str(sum(len(s.extension_spans) for s in train))],
    ])
    blocks: list[Block] = [Heading("Training data"), summary, Heading("Target labels", 3),
                           Table(["label", "spans"], [[k, str(v)] for k, v in sorted(target_counts.items())])]
    by_source: dict[str, Counter] = {}
    for sentence in train:
        for span in sentence.extension_spans:
            by_source.setdefault(span.source or "(no source)", Counter())[span.label] += 1
    blocks.append(Heading("Extension labels by source", 3))
    if not by_source:
        blocks.append(Paragraph("The training data has no extension spans."))
    else:
        rows = [[source, str(sum(c.values())), str(len(c)),
                 ", ".join(f"{label} ({n})" for label, n in sorted(c.items(), key=lambda x: (-x[1], x[0]))[:8])]
                for source, c in sorted(by_source.items())]
        blocks.append(Table(["source", "spans", "labels", "most frequent labels"], rows))
    if vocab is not None:
        shown = ", ".join(vocab.extensions[:40]) + (f", ... ({vocab.num_extensions - 40} more)"
                                                   if vocab.num_extensions > 40 else "")
        blocks.append(Paragraph(
            f"The model's vocabulary: {vocab.num_targets} target labels ({', '.join(vocab.targets)}) and "
            f"{vocab.num_extensions} extension labels" + (f" ({shown})." if vocab.num_extensions else ".")))
    return blocks


def _tokens_section(summaries: Sequence[TokenSummary]) -> list[Block]:
    """Each LLM job's tokens per step and, with a price, its cost (as in its summary.json)."""
    if not summaries:
        return []
    blocks: list[Block] = [Heading("LLM tokens and cost")]
    for summary in summaries:
        blocks += [Heading(summary.name, 3), Table(TOKEN_HEADER, token_rows(summary.tokens))]
        facts = []
        per_1000 = summary.tokens.get("per_1000_sentences")
        if per_1000:
            facts.append(f"per 1000 sentences (every answer asked anew): {per_1000['prompt_tokens']:.0f} prompt and "
                         f"{per_1000['completion_tokens']:.0f} completion tokens")
        cost = summary.cost
        if cost:
            facts.append(f"cost of this output {cost['run']:.4f}")
            if cost.get("per_1000_sentences") is not None:
                projected = cost["projected"]
                facts.append(f"{cost['per_1000_sentences']:.4f} per 1000 sentences, "
                             f"{projected['cost']:.2f} projected for {projected['sentences']:,} sentences")
        else:
            facts.append("no price (engine.price_per_million) to cost it")
        blocks.append(Paragraph("; ".join(facts) + ". Cached answers used no new tokens."))
    return blocks


def _write_job_report(folder: Path, summaries: Sequence[TokenSummary]) -> Path:
    """The report of a folder that holds LLM job summaries but no training run."""
    out = folder / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    title = f"KnowFREE LLM job report: {folder.name}"
    blocks: list[Block] = [Heading(title, 1), Paragraph(f"Folder {folder}: no training run (config.yaml).")]
    blocks += _tokens_section(summaries)
    (out / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(blocks, title), encoding="utf-8")
    logger.info("report written to %s", page)
    return page


def _run_facts(run: RunRecord, test_name: Optional[str]) -> Paragraph:
    config, metrics = run.config, run.metrics
    facts = [f"run folder {run.run_dir}", f"encoder {config.encoder.name}",
             f"extension labels {'on' if config.model.use_extension_labels else 'off'}"]
    for key, label in (("best_epoch", "best epoch"), ("epochs_run", "epochs run"), ("threshold", "threshold"),
                       ("seconds", "seconds")):
        if key in metrics:
            facts.append(f"{label} {metrics[key]}")
    if test_name:
        facts.append(f"test file {test_name}")
    return Paragraph("; ".join(facts) + ".")


def _remove(path: Path) -> None:
    # A plot skipped this time must not be left over from an earlier report of the same run.
    if path.exists():
        path.unlink()


# ====================================================================== the report
def _test_sentences(run: RunRecord, test_path: Optional[Union[str, Path]]) -> tuple[list[Sentence], Optional[str]]:
    # Relative config paths are relative to the current directory, as for `knowfree train`.
    path = test_path if test_path is not None else run.config.data.test
    if not path:
        return [], None
    if not Path(path).is_file():
        raise KnowFreeError(f"test file not found: {path}")
    return _read_split(run.config, path, override=test_path is not None), str(path)


def _heatmap_section(run: RunRecord, test: Sequence[Sentence], test_path: Optional[Union[str, Path]],
                     out: Path, top_n: int, batch_size: int, device: str) -> tuple[list[Block], Optional[tuple[str, dict]]]:
    """The Figure 8 heatmap and, for a ``test_path`` override, that file's scores (the model
    runs once for both)."""
    blocks: list[Block] = [Heading("Extension labels at predicted target spans (paper Figure 8)")]
    target = out / EXTENSION_HEATMAP
    no_extensions = "Skipped: the model has no extension labels (extension labels off, or none in the training data)."
    has_extensions = run.vocab is not None and run.vocab.num_extensions > 0
    skip = (
        "Skipped: there is no exported model yet." if run.vocab is None
        else "Skipped: there is no test file." if not test
        else no_extensions if not has_extensions and test_path is None
        else None
    )
    if skip:  # the model is not even loaded: nothing to draw and no file to score
        _remove(target)
        return blocks + [Paragraph(skip)], None

    from ..metrics import score_spans
    from ..model.knowfree import KnowFreeModel

    model = KnowFreeModel.from_pretrained(run.model_dir, device=device)
    predictions, affinity = predict_with_extensions(model, test, batch_size)
    extra = None
    if test_path is not None:
        extra = (f"test ({Path(test_path).name})", score_spans([s.spans for s in test], predictions).to_dict())
    if not has_extensions:
        _remove(target)
        return blocks + [Paragraph(no_extensions)], extra
    if not affinity.counts.any():
        _remove(target)
        return blocks + [Paragraph("Skipped: the model predicts no target span on the test file.")], extra
    shown = plot_extension_heatmap(affinity, target, top_n)
    blocks.append(Paragraph(
        f"For every span the model predicts as a target label (rows) on the {len(test)} test sentences, the "
        f"sigmoid of each extension label's logit at that span, averaged per target label. Extension logits "
        f"are masked at inference; this shows which external knowledge each target label learned to align "
        f"with. Columns: {len(shown)} of {len(affinity.extensions)} extension labels, strongest first."))
    blocks.append(Image(EXTENSION_HEATMAP, "heatmap: extension-label activation per predicted target label"))
    return blocks, extra


def _f1_by_size_section(run: RunRecord, compare_runs: Sequence[Union[str, Path]], out: Path) -> list[Block]:
    blocks: list[Block] = [Heading("F1 against training size")]
    target = out / F1_BY_SIZE
    # The run itself is always a point; a run also listed in compare_runs counts once.
    unique: dict[str, Path] = {}
    for path in [run.run_dir, *map(Path, compare_runs)]:
        unique.setdefault(str(path.resolve()), path)
    points = training_size_points(list(unique.values()))
    if not points:
        _remove(target)
        return blocks + [Paragraph("Skipped: no run has test scores yet.")]
    plot_f1_by_training_size(points, target, highlight=str(run.run_dir))
    rows = [[p.run, str(p.train_sentences), _pct(p.f1)] for p in points]
    blocks.append(Paragraph("Test F1 of each run against its number of gold (non-synthetic) training sentences; "
                            "the line joins the mean per size (pass runs of one variant, e.g. a grid's seeds)."))
    blocks += [Table(["run", "gold training sentences", "test F1 (%)"], rows),
               Image(F1_BY_SIZE, "test F1 against training size")]
    return blocks


def _embeddings_section(run: RunRecord, test: Sequence[Sentence], out: Path, enabled: bool,
                        embedder: Any, cap: int, seed: int) -> list[Block]:
    blocks: list[Block] = [Heading("Sentence embeddings (paper Figure 5)")]
    target = out / EMBEDDINGS_2D
    if not enabled:
        _remove(target)
        return blocks + [Paragraph("Skipped (embeddings disabled).")]
    sets = _embedding_sets(run.train, test, cap, seed)
    groups = [name for name, items in sets.items() for _ in items]
    if len(groups) < 2:
        _remove(target)
        return blocks + [Paragraph("Skipped: fewer than two sentences to project.")]
    model = _load_embedder(embedder)
    vectors = model.embed([s.text for items in sets.values() for s in items])
    coords, method = project_2d(vectors, seed)
    plot_embeddings(coords, groups, method, target)
    counts = ", ".join(f"{len(items)} {name}" for name, items in sets.items())
    blocks.append(Paragraph(f"{counts} sentences (at most {cap} per set, seeded sample), embedded with "
                            f"{getattr(model, 'name', embedder)} and projected with {method}."))
    blocks.append(Image(EMBEDDINGS_2D, "2-D projection of training, synthetic and test sentence embeddings"))
    return blocks


def write_report(
    run_dir: Union[str, Path],
    test_path: Optional[Union[str, Path]] = None,
    embeddings: bool = True,
    embedder: Union[str, Any] = "offline-e5",
    compare_runs: Sequence[Union[str, Path]] = (),
    *,
    max_per_set: int = 500,
    top_extensions: int = 30,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
) -> Path:
    """Write ``run_dir/report/`` (report.md, report.html, PNGs); returns report.html's path.

    test_path: labelled file for the heatmap, the embeddings and an extra score row
        (default: the config's data.test, whose scores metrics.json already holds).
    embedder: a name or path for :func:`~knowfree_core.embeddings.load_embedder`, or a loaded
        embedder (anything with ``embed(texts) -> array``).
    compare_runs: other run folders (e.g. the cells of a pipeline grid) for the F1 against
        training size plot; this run is always included.
    Skipped parts (no extension labels, no test file, embeddings off) get a note instead.

    The LLM jobs' token counts and cost (their summary.json, :func:`token_summaries`) get a
    section; a folder with such summaries but no run (a jobs.annotate output folder) gets a
    report of them alone.
    """
    if not (Path(run_dir) / "config.yaml").is_file():
        summaries = token_summaries(run_dir)
        if summaries:
            return _write_job_report(Path(run_dir), summaries)
    run = load_run(run_dir)
    out = run.run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    test, test_name = _test_sentences(run, test_path)

    heatmap_blocks, extra_scores = _heatmap_section(run, test, test_path, out, top_extensions, batch_size, device)
    learning_plot = plot_learning_curve(run.history, out / LEARNING_CURVE).name if run.history else None
    if learning_plot is None:
        _remove(out / LEARNING_CURVE)
    # Per-label rows of the file the report is about: the override's fresh scores, else metrics.json's
    # test (dev when the run has no test split).
    per_label = extra_scores or next(
        ((split, run.metrics[split]) for split in ("test", "dev") if split in run.metrics), ("test", None))

    title = f"KnowFREE run report: {run.run_dir.name}"
    blocks: list[Block] = [Heading(title, 1), _run_facts(run, test_name)]
    blocks += _scores_section(run.metrics, extra_scores)
    blocks += _per_label_section(*per_label)
    blocks += _history_section(run.history, learning_plot)
    blocks += _training_data_section(run.train, run.vocab)
    blocks += _f1_by_size_section(run, compare_runs, out)
    blocks += heatmap_blocks
    blocks += _embeddings_section(run, test, out, embeddings, embedder, max_per_set, seed)
    blocks += _tokens_section(token_summaries(run.run_dir))

    (out / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(blocks, title), encoding="utf-8")
    logger.info("report written to %s", page)
    return page
