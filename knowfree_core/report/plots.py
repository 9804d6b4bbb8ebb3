"""The report's PNG plots, drawn on matplotlib ``Figure`` objects with the Agg canvas (never
pyplot, so any process can draw without touching a global backend)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .analysis import ExtensionAffinity
from .run_folder import SizePoint

logger = logging.getLogger(__name__)

LEARNING_CURVE = "learning_curve.png"
F1_BY_SIZE = "f1_by_training_size.png"
EXTENSION_HEATMAP = "extension_heatmap.png"
EMBEDDINGS_2D = "embeddings_2d.png"
PLOT_FILES = (LEARNING_CURVE, F1_BY_SIZE, EXTENSION_HEATMAP, EMBEDDINGS_2D)

# Fonts that carry CJK glyphs, tried in this order when installed: Chinese labels (extension
# labels such as LLM entity types) would otherwise be drawn as empty boxes.
_CJK_FONT_HINTS = ("Noto Sans CJK", "Noto Serif CJK", "Source Han", "WenQuanYi", "SimHei",
                   "Microsoft YaHei", "PingFang", "Heiti", "IPAGothic", "AR PL")




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


