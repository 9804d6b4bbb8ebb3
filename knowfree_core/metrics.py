"""Span-level micro precision / recall / F1 on exact ``(start, end, label)`` matches.

NER, word segmentation and POS tagging are all scored this way on their spans (a segmentation
span is a word with a dummy label, a POS span a word with its tag), so there is no special code
per task. Each sentence's spans are compared as sets: a duplicated prediction counts once.
All ratios are 0.0 when their denominator is 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = ["LabelScores", "SpanScores", "SpanScorer", "score_spans", "prf"]


class _SpanLike(Protocol):
    start: int
    end: int
    label: str


def prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1 with 0.0 for every empty denominator."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


@dataclass(frozen=True)
class LabelScores:
    label: str
    support: int  # gold spans
    predicted: int
    correct: int
    precision: float
    recall: float
    f1: float

    @classmethod
    def from_counts(cls, label: str, correct: int, predicted: int, gold: int) -> "LabelScores":
        return cls(label, gold, predicted, correct, *prf(correct, predicted, gold))


@dataclass(frozen=True)
class SpanScores:
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int
    correct: int
    per_label: dict[str, LabelScores] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["per_label"] = {name: asdict(row) for name, row in self.per_label.items()}
        return record

    def format_table(self, digits: int = 2) -> str:
        """Plain-text table: one row per label, then the micro average (values in %)."""
        header = ("label", "support", "pred", "correct", "P", "R", "F1")
        rows = [
            (r.label, str(r.support), str(r.predicted), str(r.correct),
             *(f"{100 * v:.{digits}f}" for v in (r.precision, r.recall, r.f1)))
            for r in self.per_label.values()
        ]
        total = ("micro", str(self.support), str(self.predicted), str(self.correct),
                 *(f"{100 * v:.{digits}f}" for v in (self.precision, self.recall, self.f1)))
        widths = [max(len(row[c]) for row in [header, *rows, total]) for c in range(len(header))]

        def line(row: Sequence[str]) -> str:
            cells = [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]
            return "  ".join(cells)

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, rows), rule, line(total)])


class SpanScorer:
    """Accumulates counts sentence by sentence; :meth:`compute` gives the :class:`SpanScores`."""

    def __init__(self) -> None:
        self._gold: Counter[str] = Counter()
        self._pred: Counter[str] = Counter()
        self._correct: Counter[str] = Counter()

    def update(self, gold: Iterable[_SpanLike], pred: Iterable[_SpanLike]) -> None:
        gold_set = {(s.start, s.end, s.label) for s in gold}
        pred_set = {(s.start, s.end, s.label) for s in pred}
        self._gold.update(label for _, _, label in gold_set)
        self._pred.update(label for _, _, label in pred_set)
        self._correct.update(label for _, _, label in gold_set & pred_set)

    def compute(self) -> SpanScores:
        labels = sorted(set(self._gold) | set(self._pred))
        per_label = {
            name: LabelScores.from_counts(
                name, self._correct[name], self._pred[name], self._gold[name]
            )
            for name in labels
        }
        correct, predicted, gold = (
            sum(c.values()) for c in (self._correct, self._pred, self._gold)
        )
        return SpanScores(*prf(correct, predicted, gold), gold, predicted, correct, per_label)


def score_spans(
    gold: Sequence[Iterable[_SpanLike]], pred: Sequence[Iterable[_SpanLike]]
) -> SpanScores:
    """Score a corpus: ``gold[k]`` and ``pred[k]`` are the spans of sentence k."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    scorer = SpanScorer()
    for gold_spans, pred_spans in zip(gold, pred):
        scorer.update(gold_spans, pred_spans)
    return scorer.compute()
