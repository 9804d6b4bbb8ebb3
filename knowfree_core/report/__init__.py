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

A folder holding LLM job summaries (jobs.annotate / jobs.synthesize ``summary.json`` with
``tokens``) gets their tokens per step and cost; one without a training run gets only that.

The modules: ``run_folder`` reads a run back, ``analysis`` computes with its model and an
embedder, ``plots`` draws, ``document`` renders Markdown and HTML, ``writer`` assembles the
report. matplotlib, torch, scikit-learn and sentence-transformers are imported inside the
functions that need them: importing ``knowfree_core`` stays light.
"""

from .analysis import ExtensionAffinity, full_span_logits, predict_with_extensions, project_2d, sample_sentences
from .document import Block, Heading, Image, Paragraph, Table, render_html, render_markdown
from .plots import (
    EMBEDDINGS_2D,
    EXTENSION_HEATMAP,
    F1_BY_SIZE,
    LEARNING_CURVE,
    PLOT_FILES,
    plot_embeddings,
    plot_extension_heatmap,
    plot_f1_by_training_size,
    plot_learning_curve,
)
from .run_folder import RunRecord, SizePoint, TokenSummary, load_run, token_summaries, training_size_points
from .writer import REPORT_DIR, write_report

__all__ = [
    "REPORT_DIR",
    "PLOT_FILES",
    "LEARNING_CURVE",
    "F1_BY_SIZE",
    "EXTENSION_HEATMAP",
    "EMBEDDINGS_2D",
    "RunRecord",
    "SizePoint",
    "TokenSummary",
    "token_summaries",
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
    "Block",
    "Heading",
    "Paragraph",
    "Table",
    "Image",
]
