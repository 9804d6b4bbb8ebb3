"""Span decoding from KnowFREE grid logits.

Only the first ``N_tgt = len(labels)`` columns are read, where ``labels`` are the target label
names in column order: extension labels are training-time knowledge and are
never predicted (paper §3.2: "the weights associated with the extension entity labels are
masked"). Each cell keeps its single best target label; it becomes a candidate when that
label's sigmoid probability is strictly above ``threshold``. Candidates are then accepted
greedily, most confident first:

* :func:`decode_flat` rejects a candidate that overlaps any accepted span;
* :func:`decode_nested` rejects one that *crosses* an accepted span (overlaps without one
  containing the other); nesting is allowed.

Candidate extraction is vectorised; only the greedy pass over the few candidates is Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from knowfree_core.records import Span

__all__ = [
    "SpanCandidate",
    "span_candidates",
    "select_flat",
    "select_nested",
    "decode_spans",
    "decode_flat",
    "decode_nested",
    "decode_batch",
]

@dataclass(frozen=True)
class SpanCandidate:
    start: int
    end: int  # exclusive
    label_id: int
    score: float


def span_candidates(
    logits: Tensor,
    num_target_labels: int,
    threshold: float = 0.5,
    length: int | None = None,
    max_span_length: int | None = None,
) -> list[SpanCandidate]:
    """Cells ``(i, j)``, ``i <= j < length``, whose best target label has probability >
    ``threshold``; sorted by descending score, ties by (start, end) for determinism."""
    if logits.dim() != 3 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be (L, L, N), got {tuple(logits.shape)}")
    if not 1 <= num_target_labels <= logits.shape[-1]:
        raise ValueError(
            f"num_target_labels ({num_target_labels}) must be in [1, {logits.shape[-1]}]"
        )
    grid_len = logits.shape[0]
    length = grid_len if length is None else min(length, grid_len)
    with torch.no_grad():
        probs = torch.sigmoid(logits[:length, :length, :num_target_labels].float())
        best, label = probs.max(dim=-1)  # (l, l)
        positions = torch.arange(length, device=logits.device)
        offset = positions[None, :] - positions[:, None]
        keep = (offset >= 0) & (best > threshold)
        if max_span_length is not None:
            keep &= offset < max_span_length
        starts, ends = keep.nonzero(as_tuple=True)
        scores = best[starts, ends]
        labels = label[starts, ends]
    rows = zip(starts.tolist(), ends.tolist(), labels.tolist(), scores.tolist())
    candidates = [SpanCandidate(s, e + 1, lab, sc) for s, e, lab, sc in rows]
    candidates.sort(key=lambda c: (-c.score, c.start, c.end))
    return candidates


def select_flat(candidates: Sequence[SpanCandidate], length: int) -> list[SpanCandidate]:
    """Greedy non-overlapping selection (candidates must be sorted best first)."""
    taken = [False] * length
    chosen: list[SpanCandidate] = []
    for cand in candidates:
        if any(taken[cand.start : cand.end]):
            continue
        taken[cand.start : cand.end] = [True] * (cand.end - cand.start)
        chosen.append(cand)
    return sorted(chosen, key=lambda c: (c.start, c.end))


def _crosses(a: SpanCandidate, b: SpanCandidate) -> bool:
    overlap = a.start < b.end and b.start < a.end
    nested = (a.start <= b.start and b.end <= a.end) or (b.start <= a.start and a.end <= b.end)
    return overlap and not nested


def select_nested(candidates: Sequence[SpanCandidate]) -> list[SpanCandidate]:
    """Greedy selection where spans may nest but never cross (candidates sorted best first)."""
    chosen: list[SpanCandidate] = []
    for cand in candidates:
        if any(_crosses(cand, other) for other in chosen):
            continue
        chosen.append(cand)
    return sorted(chosen, key=lambda c: (c.start, c.end))


def decode_spans(
    logits: Tensor,
    labels: Sequence[str],
    threshold: float = 0.5,
    length: int | None = None,
    max_span_length: int | None = None,
    *,
    nested: bool = False,
) -> list[Span]:
    """The spans of one sentence from ``(L, L, N)`` logits: non-overlapping, or with
    ``nested`` nested but never crossing.

    ``labels``: the target label names in column order; ``N_tgt = len(labels)`` and every later
    column (extension labels) is ignored.
    """
    candidates = span_candidates(logits, len(labels), threshold, length, max_span_length)
    if nested:
        chosen = select_nested(candidates)
    else:
        chosen = select_flat(candidates, logits.shape[0] if length is None else min(length, logits.shape[0]))
    return [Span(c.start, c.end, labels[c.label_id]) for c in chosen]


#: :func:`decode_spans` without and with nesting.
decode_flat = partial(decode_spans, nested=False)
decode_nested = partial(decode_spans, nested=True)


def decode_batch(
    logits: Tensor,
    lengths: Sequence[int] | Tensor,
    labels: Sequence[str],
    nested: bool = False,
    threshold: float = 0.5,
    max_span_length: int | None = None,
) -> list[list[Span]]:
    """Decode ``(B, L, L, N)`` logits, one span list per sample (its first ``lengths[b]`` units)."""
    lengths = lengths.tolist() if isinstance(lengths, Tensor) else list(lengths)
    if len(lengths) != logits.shape[0]:
        raise ValueError(f"{len(lengths)} lengths for a batch of {logits.shape[0]}")
    return [
        decode_spans(logits[b], labels, threshold, int(lengths[b]), max_span_length, nested=nested)
        for b in range(logits.shape[0])
    ]
