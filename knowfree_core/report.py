"""Per-run reports: ``run_dir/report/`` with report.md, report.html and PNG plots.

What :func:`write_report` puts in the folder:

    report.md / report.html     scores (dev/test), per-label scores, training history,
                                training-set summary, and the plots below
    learning_curve.png          dev F1 and training loss per epoch
    f1_by_training_size.png     test F1 against the number of gold training sentences
    extension_heatmap.png       mean sigmoid of the extension-label logits at spans predicted as
                                each target label (the paper's Figure 8)
    embeddings_2d.png           training, synthetic and test sentence embeddings in 2-D
                                (the paper's Figure 5)

Plots are drawn on matplotlib ``Figure`` objects with the Agg canvas, never through pyplot, so a
report can be written from any process (a notebook, a Ray worker) without touching its global
backend. matplotlib, torch, scikit-learn and sentence-transformers are imported inside the
functions that need them: importing ``knowfree_core`` stays light.
"""

from __future__ import annotations

import html
import json
import logging
import random
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from .config import KnowFreeConfig, load_config
from .errors import KnowFreeError
from .labels import LabelVocab
from .records import Sentence, Span

if TYPE_CHECKING:  # pragma: no cover
    from .embeddings import SentenceEmbedder
    from .model.knowfree import KnowFreeModel

__all__ = [
    "REPORT_DIR",
    "PLOT_FILES",
    "RunRecord",
    "SizePoint",
    "ExtensionAffinity",
    "load_run",
    "write_report",
    "full_span_logits",
    "predict_with_extensions",
    "training_size_points",
    "sample_sentences",
    "project_2d",
    "plot_learning_curve",
    "plot_f1_by_training_size",
    "plot_extension_heatmap",
    "plot_embeddings",
    "render_markdown",
    "render_html",
]

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
LEARNING_CURVE = "learning_curve.png"
F1_BY_SIZE = "f1_by_training_size.png"
EXTENSION_HEATMAP = "extension_heatmap.png"
EMBEDDINGS_2D = "embeddings_2d.png"
PLOT_FILES = (LEARNING_CURVE, F1_BY_SIZE, EXTENSION_HEATMAP, EMBEDDINGS_2D)

# t-SNE on a handful of points is noise around a random layout; PCA is exact and stable there.
TSNE_MIN_POINTS = 30
# Fonts that carry CJK glyphs, tried in this order when installed: Chinese labels (extension
# labels such as LLM entity types) would otherwise be drawn as empty boxes.
_CJK_FONT_HINTS = ("Noto Sans CJK", "Noto Serif CJK", "Source Han", "WenQuanYi", "SimHei",
                   "Microsoft YaHei", "PingFang", "Heiti", "IPAGothic", "AR PL")


# ====================================================================== the run folder
@dataclass
class RunRecord:
    """What a finished (or still running) run folder holds, read from disk."""

    run_dir: Path
    config: KnowFreeConfig
    metrics: dict
    history: list[dict]
    train: list[Sentence]
    vocab: Optional[LabelVocab]  # None while the model is not exported yet

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def _read_jsonl_dicts(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_run(run_dir: Union[str, Path]) -> RunRecord:
    """Read a run folder; only config.yaml is required, so a run still training gets a
    report of its history too (missing parts become notes in the report)."""
    from .formats import read_dataset

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise KnowFreeError(f"{run_dir} is not a run folder (no config.yaml); see `knowfree train`")
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    train_path = run_dir / "train_data.jsonl"
    labels_path = run_dir / "model" / "labels.json"
    return RunRecord(
        run_dir=run_dir,
        config=load_config(run_dir / "config.yaml"),
        metrics=metrics,
        history=_read_jsonl_dicts(run_dir / "history.jsonl"),
        train=read_dataset(train_path, format="jsonl") if train_path.is_file() else [],
        vocab=LabelVocab.load(labels_path) if labels_path.is_file() else None,
    )


def _read_split(config: KnowFreeConfig, path: Union[str, Path], override: bool = False) -> list[Sentence]:
    """Read an evaluation file as the run read its data (format and reader options). An
    override file of another format than the run's (``--data x.jsonl`` for a CoNLL run) is
    read by its own format instead: the run's reader options belong to the other reader."""
    from .formats import detect_format, read_dataset

    if override:
        reference = next((p for p in (config.data.test, config.data.train) if p and Path(p).is_file()), None)
        if reference is None or detect_format(path) != detect_format(reference):
            return read_dataset(path)
    return read_dataset(path, format=config.data.format, **dict(config.data.read_options or {}))


# ====================================================================== model outputs
@dataclass
class ExtensionAffinity:
    """Per target label T: how strongly each extension label fires at spans predicted as T.

    ``sums[t, e]`` adds sigmoid(extension logit e) over the ``counts[t]`` spans predicted as
    target t; the heatmap shows the mean.
    """

    targets: list[str]
    extensions: list[str]
    sums: np.ndarray  # (T, E) float64
    counts: np.ndarray  # (T,) int64

    @property
    def mean(self) -> np.ndarray:
        return self.sums / np.maximum(self.counts, 1)[:, None]


def _length_sorted_batches(units: Sequence[Sequence[str]], batch_size: int) -> Iterator[list[int]]:
    # As KnowFreeModel.target_logits: sorting by length keeps padding (an L x L grid) small;
    # empty sentences have no grid at all and are left out.
    order = [i for i in sorted(range(len(units)), key=lambda i: len(units[i])) if units[i]]
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def full_span_logits(model: "KnowFreeModel", units_batch: Sequence[Sequence[str]]):
    """``(B, L, L, N_tgt + N_ext)`` float32 CPU logits of a batch, extension columns included.

    ``KnowFreeModel.target_logits`` cuts the extension columns off (inference must not use
    them); the report needs them to show what the model learned from extension labels.
    Call under ``torch.no_grad()`` with the model in eval mode.
    """
    logits, _ = model([list(u) for u in units_batch])
    return logits.float().cpu()


def predict_with_extensions(
    model: "KnowFreeModel", sentences: Sequence[Sentence], batch_size: int = 32
) -> tuple[list[list[Span]], ExtensionAffinity]:
    """Predicted target spans per sentence (as ``model.predict`` decodes them) and the
    extension-label affinity of those predictions, in one pass over the data."""
    import torch

    vocab = model.vocab
    n_targets = vocab.num_targets
    units = [s.units for s in sentences]
    predictions: list[list[Span]] = [[] for _ in sentences]
    sums = np.zeros((n_targets, vocab.num_extensions), dtype=np.float64)
    counts = np.zeros(n_targets, dtype=np.int64)
    was_training = model.training
    model.eval()  # dropout off: the same logits as prediction
    try:
        with torch.no_grad():
            for index in _length_sorted_batches(units, batch_size):
                logits = full_span_logits(model, [units[i] for i in index])
                for row, i in enumerate(index):
                    n = len(units[i])
                    grid = logits[row, :n, :n]
                    # Decoded from the target columns only, exactly as inference does.
                    predictions[i] = model.decode([grid[..., :n_targets]])[0]
                    for span in predictions[i]:
                        t = vocab.id(span.label)
                        # Cell (start, end - 1) holds the span [start, end): see decoding.span_candidates.
                        sums[t] += torch.sigmoid(grid[span.start, span.end - 1, n_targets:]).double().numpy()
                        counts[t] += 1
    finally:
        model.train(was_training)
    return predictions, ExtensionAffinity(list(vocab.targets), list(vocab.extensions), sums, counts)


# ====================================================================== F1 against training size
@dataclass(frozen=True)
class SizePoint:
    run: str
    train_sentences: int  # gold (non-synthetic) training sentences
    f1: float  # test F1


def _gold_training_size(run_dir: Path, metrics: dict) -> int:
    """Gold training sentences of a run. Synthetic sentences are augmentation, not training
    size: counting them would put an FS run to the right of the F run it extends."""
    records = _read_jsonl_dicts(run_dir / "train_data.jsonl")
    if records:
        return sum(1 for r in records if not r.get("synthetic", False))
    return int(metrics.get("train_sentences", 0))


def training_size_points(run_dirs: Sequence[Union[str, Path]]) -> list[SizePoint]:
    """One point per run folder with a test score; runs without one are skipped (logged)."""
    points = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        if "test" not in metrics:
            logger.warning("%s has no test scores in metrics.json; left out of the F1-by-size plot", run_dir)
            continue
        points.append(SizePoint(str(run_dir), _gold_training_size(run_dir, metrics), float(metrics["test"]["f1"])))
    return sorted(points, key=lambda p: (p.train_sentences, p.run))


# ====================================================================== embeddings
def sample_sentences(sentences: Sequence[Sentence], cap: int, seed: int) -> list[Sentence]:
    """At most ``cap`` sentences, a seeded sample kept in file order (same input, same sample)."""
    if len(sentences) <= cap:
        return list(sentences)
    chosen = sorted(random.Random(seed).sample(range(len(sentences)), cap))
    return [sentences[i] for i in chosen]


def project_2d(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """``(n, 2)`` coordinates and the method's name: t-SNE for enough points, else PCA."""
    n = len(vectors)
    if n < 2:
        raise ValueError(f"need at least 2 points to project, got {n}")
    if n >= TSNE_MIN_POINTS:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        # Perplexity must stay below the number of points; 30 is the usual value for many.
        perplexity = float(min(30.0, (n - 1) / 3))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine")
        # One OpenMP thread: Barnes-Hut t-SNE on a busy machine (or beside torch's own OpenMP
        # pool) spin-waits, 40 points took 28 s with two threads against 0.3 s with one; a
        # report's <= 1,500 points take seconds on one thread.
        with threadpool_limits(limits=1, user_api="openmp"):
            coords = tsne.fit_transform(vectors)
        return np.asarray(coords, dtype=np.float64), "t-SNE"
    from sklearn.decomposition import PCA

    components = min(2, n, vectors.shape[1])
    coords = PCA(n_components=components, random_state=seed).fit_transform(vectors)
    if components < 2:  # two points or one dimension: pad so the plot still has two axes
        coords = np.pad(coords, ((0, 0), (0, 2 - components)))
    return np.asarray(coords, dtype=np.float64), "PCA"


def _embedding_sets(train: Sequence[Sentence], test: Sequence[Sentence], cap: int, seed: int) -> dict[str, list[Sentence]]:
    # Each set is sampled with its own seed offset so adding synthetic data does not change
    # which gold sentences are drawn.
    sets = {
        "training": [s for s in train if not s.synthetic],
        "synthetic": [s for s in train if s.synthetic],
        "test": list(test),
    }
    return {name: sample_sentences(items, cap, seed + k) for k, (name, items) in enumerate(sets.items()) if items}


def _load_embedder(embedder: Union[str, "SentenceEmbedder", Any]) -> Any:
    # A name or path goes through load_embedder; an object with .embed (an already loaded
    # embedder) is used as is, so callers can share one across many reports.
    if hasattr(embedder, "embed"):
        return embedder
    from .embeddings import load_embedder

    return load_embedder(str(embedder))


# ====================================================================== plots
@contextmanager
def _plot_style() -> Iterator[None]:
    """Local matplotlib settings: a CJK fallback font when one is installed, and no warning
    per missing glyph when none is (the labels then show as boxes, the plot stays valid)."""
    import matplotlib
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [name for hint in _CJK_FONT_HINTS for name in sorted(installed) if name.startswith(hint)]
    families = ["DejaVu Sans", *cjk[:1]]
    with matplotlib.rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        yield


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # the Agg canvas, attached to this figure only (no pyplot state)
    return figure


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def plot_learning_curve(history: Sequence[dict], path: Union[str, Path]) -> Path:
    """Dev F1 (left axis, %) and training loss (right axis) per epoch; the best epoch marked."""
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    epochs = [int(h["epoch"]) for h in history]
    with _plot_style():
        figure = _new_figure(7, 4)
        ax = figure.add_subplot(1, 1, 1)
        loss_ax = ax.twinx()
        loss_ax.plot(epochs, [float(h["train_loss"]) for h in history], color="tab:orange", marker=".",
                     label="train loss")
        loss_ax.set_ylabel("train loss")
        dev = [(e, 100 * float(h["dev_f1"])) for e, h in zip(epochs, history) if h.get("dev_f1") is not None]
        if dev:
            ax.plot([e for e, _ in dev], [f for _, f in dev], color="tab:blue", marker="o", label="dev F1")
            best = max(dev, key=lambda p: p[1])  # first epoch with the best F1, as fit() keeps
            ax.axvline(best[0], color="grey", linestyle=":", label=f"best epoch {best[0]}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 2.5
        ax.set_ylabel("dev F1 (%)")
        ax.set_title("Learning curve")
        handles = ax.get_legend_handles_labels()
        loss_handles = loss_ax.get_legend_handles_labels()
        ax.legend(handles[0] + loss_handles[0], handles[1] + loss_handles[1], loc="best", fontsize=8)
        return _save(figure, path)


def plot_f1_by_training_size(points: Sequence[SizePoint], path: Union[str, Path],
                             highlight: Optional[str] = None) -> Path:
    """Every run as a dot; the mean per size joined by a line with +-1 std bars (seeds).
    ``highlight``: the run this report is about, drawn as a star."""
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    by_size: dict[int, list[float]] = {}
    for point in points:
        by_size.setdefault(point.train_sentences, []).append(100 * point.f1)
    sizes = sorted(by_size)
    with _plot_style():
        figure = _new_figure(6, 4)
        ax = figure.add_subplot(1, 1, 1)
        ax.scatter([p.train_sentences for p in points], [100 * p.f1 for p in points], color="tab:blue",
                   alpha=0.5, label="run")
        ax.errorbar(sizes, [float(np.mean(by_size[s])) for s in sizes],
                    yerr=[float(np.std(by_size[s])) for s in sizes], color="tab:blue", capsize=3,
                    label="mean ± std")
        mine = [p for p in points if highlight is not None and p.run == highlight]
        if mine:
            ax.scatter([mine[0].train_sentences], [100 * mine[0].f1], marker="*", s=200, color="tab:red",
                       zorder=3, label="this run")
        ax.set_xlabel("gold training sentences")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test F1 (%)")
        ax.set_title("F1 against training size")
        ax.legend(loc="best", fontsize=8)
        return _save(figure, path)


def _heatmap_columns(mean: np.ndarray, names: Sequence[str], top_n: int) -> list[int]:
    # Columns by their strongest response (ties by name, for determinism), then the top N.
    order = sorted(range(len(names)), key=lambda e: (-float(mean[:, e].max()), names[e]))
    return order[:top_n]


def plot_extension_heatmap(affinity: ExtensionAffinity, path: Union[str, Path], top_n: int = 30) -> list[str]:
    """The paper's Figure 8: rows are target labels with predicted spans, columns the
    ``top_n`` extension labels by their highest mean; returns the extension labels shown."""
    path = Path(path)
    rows = [t for t in range(len(affinity.targets)) if affinity.counts[t] > 0]
    if not rows or not affinity.extensions:
        raise ValueError("no predicted target spans or no extension labels: nothing to draw")
    mean = affinity.mean[rows]
    columns = _heatmap_columns(mean, affinity.extensions, top_n)
    values = mean[:, columns]
    with _plot_style():
        figure = _new_figure(max(6.0, 2.0 + 0.35 * len(columns)), max(3.0, 1.8 + 0.4 * len(rows)))
        ax = figure.add_subplot(1, 1, 1)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(columns)), [affinity.extensions[e] for e in columns], rotation=90, fontsize=8)
        ax.set_yticks(range(len(rows)), [f"{affinity.targets[t]} (n={affinity.counts[t]})" for t in rows],
                      fontsize=8)
        if values.size <= 300:  # numbers stay legible only on small grids
            for (r, c), value in np.ndenumerate(values):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 else "white")
        ax.set_xlabel("extension label")
        ax.set_ylabel("predicted target label")
        ax.set_title("Mean sigmoid of extension-label logits\nat spans predicted as each target label", fontsize=10)
        figure.colorbar(image, ax=ax, fraction=0.04)
        _save(figure, path)
    return [affinity.extensions[e] for e in columns]


def plot_embeddings(coords: np.ndarray, groups: Sequence[str], method: str, path: Union[str, Path]) -> Path:
    """Scatter of 2-D sentence embeddings, one colour per set (training, synthetic, test)."""
    path = Path(path)
    colours = {"training": "tab:blue", "synthetic": "tab:orange", "test": "tab:green"}
    with _plot_style():
        figure = _new_figure(6, 5)
        ax = figure.add_subplot(1, 1, 1)
        for name in dict.fromkeys(groups):  # first-seen order, fixed by _embedding_sets
            mask = np.array([g == name for g in groups])
            ax.scatter(coords[mask, 0], coords[mask, 1], s=12, alpha=0.7, color=colours.get(name),
                       label=f"{name} ({int(mask.sum())})")
        ax.set_title(f"Sentence embeddings ({method})")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8)
        return _save(figure, path)


# ====================================================================== the document
@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Image:
    file: str  # a file name in the report folder
    alt: str


Block = Union[Heading, Paragraph, Table, Image]


def _md_cell(text: str) -> str:
    # A pipe would end the cell, a newline the row.
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in block.header) + " |",
                     "|" + "|".join("---" for _ in block.header) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            parts.append("\n".join(lines))
        elif isinstance(block, Image):
            parts.append(f"![{_md_cell(block.alt)}]({block.file})")
    return "\n\n".join(parts) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.2em .6em}"
        "th{background:#f0f0f0}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}")


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained page (inline CSS, no scripts); images are the PNGs next to it."""
    e = html.escape
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{e(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{e(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{e(str(h))}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Image):
            body.append(f'<p><img src="{e(block.file)}" alt="{e(block.alt)}"></p>')
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


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

    from .metrics import score_spans
    from .model.knowfree import KnowFreeModel

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
    """
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

    (out / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(blocks, title), encoding="utf-8")
    logger.info("report written to %s", page)
    return page
