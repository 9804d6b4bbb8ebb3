"""The label vocabulary: target labels first, then extension labels.

Targets take ids ``0..num_targets-1`` so the model's prediction head can slice them off
(extension labels are only trained on, never predicted at test time). Both groups are sorted
so the same data always gives the same ids. Counts from the data the vocabulary was built
from are kept because the loss weights extension label i by
``alpha_i = 0.5 * mean(target counts) / C_i``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from knowfree_core.annotators.base import ENT_PREFIX, POS_PREFIX, SEG_LABEL
from knowfree_core.errors import UnknownLabelError
from knowfree_core.records import Sentence

#: The views of extension labels (what kind of knowledge a label carries), from the label's
#: spelling: every annotator names its labels ``SEG``, ``POS-<tag>`` or ``ENT-<type>``
#: (knowfree_core.annotators.base). Anything else is ``other``.
VIEWS = ("ent", "seg", "pos", "other")


def extension_view(label: str) -> str:
    """The view of an extension label: ``ent``, ``seg``, ``pos`` or ``other``."""
    if label == SEG_LABEL:
        return "seg"
    if label.startswith(POS_PREFIX):
        return "pos"
    if label.startswith(ENT_PREFIX):
        return "ent"
    return "other"

_SHOWN_IN_ERRORS = 20


@dataclass
class LabelVocab:
    targets: list[str]
    extensions: list[str] = field(default_factory=list)
    target_counts: dict[str, int] = field(default_factory=dict)
    extension_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        self.extensions = list(self.extensions)
        labels = self.targets + self.extensions
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"labels listed twice (as target and/or extension): {duplicates}")
        self._ids = {label: i for i, label in enumerate(labels)}

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_sentences(
        cls,
        sentences: Iterable[Sentence],
        include_extensions: bool = True,
        min_count: int = 1,
        extension_sources: Iterable[str] | None = None,
    ) -> "LabelVocab":
        """Build the vocabulary from training data.

        min_count: extension labels seen fewer times are dropped. Target labels are always
            kept: dropping a rare gold class would silently make its spans unlearnable.
        extension_sources: keep only extension spans whose source starts with one of these.
        An extension label spelled like a target label is treated as that target and not
        added twice (annotators prefix their labels, so this only guards against accidents).
        """
        sources = tuple(extension_sources) if extension_sources is not None else None
        target_counts: Counter[str] = Counter()
        extension_counts: Counter[str] = Counter()
        for sentence in sentences:
            target_counts.update(span.label for span in sentence.spans)
            if include_extensions:
                extension_counts.update(
                    span.label
                    for span in sentence.extension_spans
                    if sources is None or span.source.startswith(sources)
                )
        extensions = {
            label: count
            for label, count in extension_counts.items()
            if count >= min_count and label not in target_counts
        }
        return cls(
            targets=sorted(target_counts),
            extensions=sorted(extensions),
            target_counts=dict(sorted(target_counts.items())),
            extension_counts=dict(sorted(extensions.items())),
        )

    # -- lookups ----------------------------------------------------------------------

    @property
    def num_targets(self) -> int:
        return len(self.targets)

    @property
    def num_extensions(self) -> int:
        return len(self.extensions)

    @property
    def extension_views(self) -> list[str]:
        """The view of each extension label, in id order (see :func:`extension_view`)."""
        return [extension_view(label) for label in self.extensions]

    @property
    def labels(self) -> list[str]:
        """All labels in id order."""
        return self.targets + self.extensions

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, label: object) -> bool:
        return label in self._ids

    def id(self, label: str) -> int:
        try:
            return self._ids[label]
        except KeyError:
            known = self.labels
            shown = ", ".join(known[:_SHOWN_IN_ERRORS])
            if len(known) > _SHOWN_IN_ERRORS:
                shown += f", ... ({len(known) - _SHOWN_IN_ERRORS} more)"
            raise UnknownLabelError(f"unknown label {label!r}; known labels: {shown or '(none)'}") from None

    def label(self, label_id: int) -> str:
        if not 0 <= label_id < len(self):
            raise UnknownLabelError(f"label id {label_id} outside 0..{len(self) - 1}")
        return self.labels[label_id]

    def is_target(self, label_id: int) -> bool:
        if not 0 <= label_id < len(self):
            raise UnknownLabelError(f"label id {label_id} outside 0..{len(self) - 1}")
        return label_id < self.num_targets

    # -- persistence ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "extensions": list(self.extensions),
            "target_counts": dict(self.target_counts),
            "extension_counts": dict(self.extension_counts),
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "LabelVocab":
        return cls(
            targets=[str(x) for x in record["targets"]],
            extensions=[str(x) for x in record.get("extensions", [])],
            target_counts={str(k): int(v) for k, v in record.get("target_counts", {}).items()},
            extension_counts={str(k): int(v) for k, v in record.get("extension_counts", {}).items()},
        )

    def save(self, path: str | Path) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "LabelVocab":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
