"""Typed records shared by every part of the library.

A sentence is a sequence of *units*: characters for Chinese/Japanese (``joiner=""``),
whitespace tokens for English (``joiner=" "``). All span offsets count units, with
``end`` exclusive, so ``units[start:end]`` is the span's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, order=True)
class Span:
    """A target span: what the model is trained to predict."""

    start: int
    end: int  # exclusive
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "label": self.label}


@dataclass(frozen=True, order=True)
class ExtensionSpan:
    """A non-target span that feeds the model extra knowledge during training only.

    ``source`` says which annotator produced it (``lac:pos``, ``jieba:seg``, ``llm:ent`` ...),
    so extension labels can be filtered per source in ablations.
    """

    start: int
    end: int  # exclusive
    label: str
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "label": self.label, "source": self.source}


@dataclass
class Sentence:
    """One training/evaluation sample."""

    id: str
    units: list[str]
    spans: list[Span] = field(default_factory=list)
    extension_spans: list[ExtensionSpan] = field(default_factory=list)
    synthetic: bool = False
    #: Labelled by a trained model, not a person (self-training, variant FU): its spans are
    #: the model's confident predictions, and its loss is weighted by ``model.beta_unlabeled``.
    pseudo_labeled: bool = False
    #: Spans whose label nobody vouches for (self-training: the labelling model scored them
    #: under the pseudo-label threshold τ but above ``rule.doubt_score``). The loss leaves
    #: their cells out of the target columns: neither "entity" nor "not an entity" is taught
    #: there (partial annotation). Never used at inference.
    uncertain_spans: list[Span] = field(default_factory=list)
    joiner: str = ""  # "" for character-level languages, " " for token-level ones

    @property
    def sample_kind(self) -> str:
        """``gold``, ``synthetic`` (pipeline 2) or ``pseudo`` (self-training): what weighs its loss."""
        return "synthetic" if self.synthetic else "pseudo" if self.pseudo_labeled else "gold"

    @property
    def text(self) -> str:
        return self.joiner.join(self.units)

    def __len__(self) -> int:
        return len(self.units)

    def span_text(self, span: Span | ExtensionSpan) -> str:
        return self.joiner.join(self.units[span.start : span.end])

    def validate(self) -> None:
        """Raise ValueError when a span lies outside the sentence or is empty."""
        n = len(self.units)
        for span in [*self.spans, *self.extension_spans, *self.uncertain_spans]:
            if not (0 <= span.start < span.end <= n):
                raise ValueError(
                    f"sentence {self.id!r}: span {span} outside 0..{n} or empty"
                )

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": self.id,
            "text": self.text,
            "spans": [s.to_dict() for s in self.spans],
            "extension_spans": [s.to_dict() for s in self.extension_spans],
            "synthetic": self.synthetic,
        }
        if self.pseudo_labeled:  # written only when set: gold and synthetic files stay as they were
            record["pseudo_labeled"] = True
        if self.uncertain_spans:
            record["uncertain_spans"] = [s.to_dict() for s in self.uncertain_spans]
        # Units are only needed when the text cannot be split back unambiguously.
        if self.joiner not in ("",) or any(len(u) != 1 for u in self.units):
            record["units"] = list(self.units)
            record["joiner"] = self.joiner
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Sentence":
        joiner = record.get("joiner", "")
        if "units" in record:
            units = [str(u) for u in record["units"]]
        else:
            text = str(record["text"])
            units = list(text) if joiner == "" else text.split(joiner)
        return cls(
            id=str(record["id"]),
            units=units,
            spans=[Span(int(s["start"]), int(s["end"]), str(s["label"])) for s in record.get("spans", [])],
            extension_spans=[
                ExtensionSpan(int(s["start"]), int(s["end"]), str(s["label"]), str(s.get("source", "")))
                for s in record.get("extension_spans", [])
            ],
            synthetic=bool(record.get("synthetic", False)),
            pseudo_labeled=bool(record.get("pseudo_labeled", False)),
            uncertain_spans=[Span(int(s["start"]), int(s["end"]), str(s["label"]))
                             for s in record.get("uncertain_spans", [])],
            joiner=joiner,
        )
