"""Extension labels from jieba's POS segmenter (``jieba.posseg``).

Each instance owns a private ``POSTokenizer(jieba.Tokenizer())`` so that user
dictionaries or settings of one annotator never leak into another (or into code that
uses the global ``jieba.posseg.cut``).

jieba tags words with ICTCLAS-style POS tags and has no NER, so ``ent`` is derived from
the proper-noun tags:

    ``nr``, ``nrt`` (transliterated name), ``nrfg`` (full name) -> ``ENT-PER``
    ``ns`` -> ``ENT-LOC``,  ``nt`` -> ``ENT-ORG``,  ``nz`` (other proper noun) -> ``ENT-OTHER``

Produces (source ``jieba:<step>``): seg ``SEG``; pos ``POS-<jieba tag>`` (``n``, ``v``,
``x`` for punctuation and symbols, ``eng`` for Latin words, ``m``, ``ul`` ...); ent as above.
"""

from __future__ import annotations

import logging
from typing import Any

from knowfree_core.annotators.base import WordTaggerAnnotator

#: jieba proper-noun tags -> entity type.
JIEBA_ENTITY_TYPES: dict[str, str] = {
    "nr": "PER",
    "nrt": "PER",
    "nrfg": "PER",
    "ns": "LOC",
    "nt": "ORG",
    "nz": "OTHER",
}


class JiebaAnnotator(WordTaggerAnnotator):
    name = "jieba"
    supported_steps = ("ent", "seg", "pos")

    def __init__(self, dictionary: str | None = None, hmm: bool = True) -> None:
        self._dictionary = dictionary
        self._hmm = hmm
        self._tokenizer: Any = None  # built on first use: ~1.3 s to load the dictionary

    def _model(self) -> Any:
        if self._tokenizer is None:
            import jieba
            import jieba.posseg

            # jieba logs "Building prefix dict ..." at DEBUG straight to stderr on every
            # load. Quiet its logger for the load only and restore it, so that we do not
            # change logging for anyone else in the process.
            logger = logging.getLogger("jieba")
            level = logger.level
            logger.setLevel(logging.WARNING)
            try:
                base = jieba.Tokenizer(self._dictionary) if self._dictionary else jieba.Tokenizer()
                base.initialize()
                self._tokenizer = jieba.posseg.POSTokenizer(base)
            finally:
                logger.setLevel(level)
        return self._tokenizer

    def _tag_texts(self, texts: list[str]) -> list[list[tuple[str, str]]]:
        tokenizer = self._model()
        return [[(pair.word, pair.flag) for pair in tokenizer.cut(text, HMM=self._hmm)] for text in texts]

    def _pos_tag(self, tag: str) -> str | None:
        return tag or None

    def _entity_type(self, tag: str) -> str | None:
        return JIEBA_ENTITY_TYPES.get(tag)
