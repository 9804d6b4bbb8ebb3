"""Flat and nested span decoding from grid logits."""

from __future__ import annotations

import math

import pytest
import torch

from knowfree_core.decoding import (
    decode_batch,
    decode_flat,
    decode_nested,
    span_candidates,
)
from knowfree_core.records import Span

LABELS = ["PER", "LOC"]  # the target labels; grid columns 2.. are extension labels
NEG = -20.0


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _grid(length: int = 6, columns: int = 4) -> torch.Tensor:
    return torch.full((length, length, columns), NEG)


def _set(grid: torch.Tensor, start: int, end: int, label_id: int, prob: float) -> None:
    grid[start, end - 1, label_id] = _logit(prob)


def _overlap(a: Span, b: Span) -> bool:
    return a.start < b.end and b.start < a.end


def _crosses(a: Span, b: Span) -> bool:
    nested = (a.start <= b.start and b.end <= a.end) or (b.start <= a.start and a.end <= b.end)
    return _overlap(a, b) and not nested


def test_flat_prefers_confident_span_and_never_overlaps():
    grid = _grid()
    _set(grid, 0, 3, 0, 0.9)  # PER 0..3
    _set(grid, 2, 5, 1, 0.95)  # LOC 2..5 overlaps and is more confident
    _set(grid, 0, 1, 1, 0.7)  # LOC 0..1 fits next to it
    assert decode_flat(grid, LABELS) == [Span(0, 1, "LOC"), Span(2, 5, "LOC")]


def test_nested_allows_nesting_but_not_crossing():
    grid = _grid()
    _set(grid, 0, 5, 0, 0.9)  # outer
    _set(grid, 1, 3, 1, 0.8)  # nested inside: kept
    _set(grid, 4, 6, 1, 0.85)  # crosses the outer one: rejected
    _set(grid, 1, 3, 0, 0.6)  # same cell, weaker label: one label per span
    assert decode_nested(grid, LABELS) == [Span(0, 5, "PER"), Span(1, 3, "LOC")]


def test_extension_columns_are_never_predicted():
    grid = _grid()
    grid[..., 2:] = 50.0  # huge extension logits everywhere
    _set(grid, 1, 2, 0, 0.8)
    for decode in (decode_flat, decode_nested):
        assert decode(grid, LABELS) == [Span(1, 2, "PER")]


def test_threshold_is_respected_and_strict():
    grid = _grid()
    _set(grid, 0, 1, 0, 0.6)
    _set(grid, 2, 3, 1, 0.4)
    assert decode_flat(grid, LABELS) == [Span(0, 1, "PER")]
    assert decode_flat(grid, LABELS, threshold=0.3) == [Span(0, 1, "PER"), Span(2, 3, "LOC")]
    assert decode_flat(grid, LABELS, threshold=0.7) == []
    exact = _grid()
    exact[0, 0, 0] = 0.0  # probability exactly 0.5 is not above 0.5
    assert decode_flat(exact, LABELS) == []


def test_lower_triangle_padding_and_length_are_ignored():
    grid = _grid()
    grid[3, 1, 0] = 10.0  # lower triangle: not a span
    grid[4, 5, 0] = 10.0  # beyond the sentence length of 4
    _set(grid, 0, 2, 1, 0.9)
    assert decode_nested(grid, LABELS, length=4) == [Span(0, 2, "LOC")]
    assert decode_nested(grid, LABELS, max_span_length=1) == []


@pytest.mark.parametrize("seed", range(5))
def test_random_grids_respect_structure(seed):
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(12, 12, 5, generator=generator) * 3
    flat = decode_flat(grid, ["a", "b", "c"])
    nested = decode_nested(grid, ["a", "b", "c"])
    assert flat and nested
    assert not any(_overlap(a, b) for i, a in enumerate(flat) for b in flat[i + 1 :])
    assert not any(_crosses(a, b) for i, a in enumerate(nested) for b in nested[i + 1 :])
    assert all(s.label in {"a", "b", "c"} for s in flat + nested)
    # Every decoded span has its best target probability above the threshold.
    probs = torch.sigmoid(grid[..., :3])
    assert all(probs[s.start, s.end - 1].max() > 0.5 for s in flat + nested)
    # The single most confident candidate is always kept.
    best = span_candidates(grid, 3)[0]
    assert any((s.start, s.end) == (best.start, best.end) for s in flat)


def test_decode_batch_uses_each_length():
    grid = torch.stack([_grid(), _grid()])
    _set(grid[0], 3, 5, 0, 0.9)
    _set(grid[1], 3, 5, 0, 0.9)
    assert decode_batch(grid, torch.tensor([6, 4]), LABELS) == [[Span(3, 5, "PER")], []]
    assert decode_batch(grid, [6, 6], ["X", "Y"], nested=True) == [
        [Span(3, 5, "X")],
        [Span(3, 5, "X")],
    ]
