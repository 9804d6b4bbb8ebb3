"""What a report computes with the trained model and an embedder: full span logits with the
extension labels unmasked (the Figure 8 heatmap), seeded sentence samples and their 2-D
projection (Figure 5)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..records import Sentence, Span

if TYPE_CHECKING:  # pragma: no cover
    from ..embeddings import SentenceEmbedder
    from ..model.knowfree import KnowFreeModel

logger = logging.getLogger(__name__)

# t-SNE on a handful of points is noise around a random layout; PCA is exact and stable there.
TSNE_MIN_POINTS = 30


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
    from ..embeddings import load_embedder

    return load_embedder(str(embedder))


