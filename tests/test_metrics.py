"""Span-level micro P/R/F1 on hand-computed examples."""

from __future__ import annotations

import pytest

from knowfree_core.metrics import SpanScorer, prf, score_spans
from knowfree_core.records import Span


def test_hand_computed_corpus():
    gold = [
        [Span(0, 2, "PER"), Span(3, 5, "LOC")],
        [Span(0, 1, "LOC"), Span(2, 4, "ORG")],
    ]
    pred = [
        [Span(0, 2, "PER"), Span(3, 5, "PER")],  # 1 right, 1 wrong label
        [Span(0, 1, "LOC"), Span(2, 3, "ORG"), Span(2, 3, "ORG")],  # duplicate counts once
    ]
    scores = score_spans(gold, pred)
    # correct = 2, predicted = 4, gold = 4.
    assert (scores.correct, scores.predicted, scores.support) == (2, 4, 4)
    assert scores.precision == pytest.approx(0.5)
    assert scores.recall == pytest.approx(0.5)
    assert scores.f1 == pytest.approx(0.5)
    per = scores.per_label
    assert list(per) == ["LOC", "ORG", "PER"]
    assert (per["PER"].support, per["PER"].predicted, per["PER"].correct) == (1, 2, 1)
    assert per["PER"].precision == pytest.approx(0.5) and per["PER"].recall == 1.0
    assert per["PER"].f1 == pytest.approx(2 / 3)
    assert per["LOC"].precision == 1.0 and per["LOC"].recall == pytest.approx(0.5)
    assert per["ORG"].f1 == 0.0


def test_zero_division_is_safe():
    empty = score_spans([[], []], [[], []])
    assert (empty.precision, empty.recall, empty.f1) == (0.0, 0.0, 0.0)
    only_pred = score_spans([[]], [[Span(0, 1, "X")]])
    assert only_pred.precision == 0.0 and only_pred.recall == 0.0
    assert only_pred.per_label["X"].support == 0
    assert prf(0, 0, 3) == (0.0, 0.0, 0.0)


def test_segmentation_and_pos_are_plain_spans():
    # Segmentation: words with one dummy label; boundaries decide correctness.
    gold = [[Span(0, 2, "w"), Span(2, 3, "w"), Span(3, 5, "w")]]
    pred = [[Span(0, 2, "w"), Span(2, 5, "w")]]
    scores = score_spans(gold, pred)
    assert scores.precision == pytest.approx(1 / 2)
    assert scores.recall == pytest.approx(1 / 3)
    assert scores.f1 == pytest.approx(0.4)


def test_scorer_accumulates_like_score_spans():
    gold = [[Span(0, 1, "A")], [Span(1, 2, "B")]]
    pred = [[Span(0, 1, "A")], [Span(1, 2, "A")]]
    scorer = SpanScorer()
    for g, p in zip(gold, pred):
        scorer.update(g, p)
    assert scorer.compute() == score_spans(gold, pred)


def test_to_dict_and_table():
    scores = score_spans([[Span(0, 1, "A"), Span(1, 2, "B")]], [[Span(0, 1, "A")]])
    record = scores.to_dict()
    assert record["f1"] == pytest.approx(2 / 3)
    assert record["per_label"]["A"] == {
        "label": "A", "support": 1, "predicted": 1, "correct": 1,
        "precision": 1.0, "recall": 1.0, "f1": 1.0,
    }
    table = scores.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["label", "support", "pred", "correct", "P", "R", "F1"]
    assert lines[2].split() == ["A", "1", "1", "1", "100.00", "100.00", "100.00"]
    assert lines[3].split() == ["B", "1", "0", "0", "0.00", "0.00", "0.00"]
    assert lines[-1].split() == ["micro", "2", "1", "1", "100.00", "50.00", "66.67"]


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        score_spans([[]], [])
