"""Annotators that produce extension labels (words, POS tags, entities of any type)."""

from knowfree_core.annotators.alignment import Rejection, align_words
from knowfree_core.annotators.base import (
    ENT_PREFIX,
    POS_PREFIX,
    SEG_LABEL,
    STEPS,
    AnnotationResult,
    Annotator,
    apply_annotations,
    get_annotator,
    known_annotators,
)

__all__ = [
    "ENT_PREFIX",
    "POS_PREFIX",
    "SEG_LABEL",
    "STEPS",
    "AnnotationResult",
    "Annotator",
    "Rejection",
    "align_words",
    "apply_annotations",
    "get_annotator",
    "known_annotators",
]
