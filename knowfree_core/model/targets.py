"""Multi-hot span targets ``(B, L, L, N_tgt + N_ext)`` from the spans of each sample.

A span ``[start, end)`` lights cell ``(start, end - 1)`` in the column of its label. One label
space: ``label_to_id`` maps target labels to ``[0, N_tgt)`` and extension labels to
``[N_tgt, N)`` (e.g. ``LabelVocab.id``).

Data problems are counted, never raised, so one odd sentence cannot stop training:

* labels the mapping does not know are skipped and counted per label;
* a label in the wrong group (an extension span whose label maps to a target column, or the
  reverse) is skipped and counted: LLM extension annotations must not become gold targets;
* spans that do not fit the (possibly truncated) sample, are empty, or exceed
  ``max_span_length`` are dropped and counted.

A mapping that returns an id outside ``[0, N)`` is a programming error and raises.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from knowfree_core.errors import UnknownLabelError

__all__ = ["LabelLookup", "SpanTargets", "build_span_targets", "uncertain_cells"]


class _SpanLike(Protocol):
    start: int
    end: int
    label: str


class _SampleLike(Protocol):
    """What a sample must offer (``records.Sentence`` does)."""

    spans: Sequence[_SpanLike]
    extension_spans: Sequence[_SpanLike]


# label -> id: a mapping, or a callable returning the id, None, or raising KeyError /
# UnknownLabelError for an unknown label.
LabelLookup = Mapping[str, int] | Callable[[str], int | None]


@dataclass
class SpanTargets:
    """The target tensor plus what had to be left out of it."""

    targets: Tensor  # (B, L, L, N) float
    unknown_labels: Counter[str] = field(default_factory=Counter)
    misplaced_labels: Counter[str] = field(default_factory=Counter)  # label in the wrong group
    dropped_out_of_range: int = 0  # outside [0, length) after truncation, or empty
    dropped_too_long: int = 0  # longer than max_span_length
    duplicates: int = 0  # (cell, label) already set by another span

    @property
    def num_skipped(self) -> int:
        return (
            sum(self.unknown_labels.values())
            + sum(self.misplaced_labels.values())
            + self.dropped_out_of_range
            + self.dropped_too_long
        )


def _lookup(lookup: LabelLookup, label: str) -> int | None:
    if isinstance(lookup, Mapping):
        return lookup.get(label)
    try:
        return lookup(label)
    except (KeyError, UnknownLabelError):
        return None


def build_span_targets(
    samples: Sequence[_SampleLike],
    seq_len: int,
    label_to_id: LabelLookup,
    num_target_labels: int,
    num_labels: int,
    *,
    include_extensions: bool = True,
    lengths: Sequence[int] | None = None,
    max_span_length: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> SpanTargets:
    """Build ``(B, seq_len, seq_len, num_labels)`` multi-hot targets.

    Args:
        samples: objects with ``spans`` and ``extension_spans`` (e.g. ``Sentence``).
        seq_len: L of the batch grid.
        label_to_id: label -> global column id (targets first).
        num_target_labels: N_tgt; ``spans`` must map below it, ``extension_spans`` at or above.
        num_labels: N = N_tgt + N_ext, the number of columns.
        include_extensions: False ignores ``extension_spans`` (no-knowledge baseline).
        lengths: per-sample unit counts after truncation (default: ``seq_len`` for all).
        max_span_length: drop (and count) longer spans.
    """
    batch = len(samples)
    if not 0 <= num_target_labels <= num_labels:
        raise ValueError(
            f"need 0 <= num_target_labels ({num_target_labels}) <= num_labels ({num_labels})"
        )
    if lengths is not None and len(lengths) != batch:
        raise ValueError(f"{len(lengths)} lengths for {batch} samples")
    result = SpanTargets(torch.zeros(batch, seq_len, seq_len, num_labels, dtype=dtype))
    cells: set[tuple[int, int, int, int]] = set()

    def add(sample: int, spans: Iterable[_SpanLike], is_target: bool) -> None:
        length = seq_len if lengths is None else min(seq_len, lengths[sample])
        for span in spans:
            if not 0 <= span.start < span.end <= length:
                result.dropped_out_of_range += 1
                continue
            if max_span_length is not None and span.end - span.start > max_span_length:
                result.dropped_too_long += 1
                continue
            label_id = _lookup(label_to_id, span.label)
            if label_id is None:
                result.unknown_labels[span.label] += 1
                continue
            if not 0 <= label_id < num_labels:
                raise ValueError(
                    f"label {span.label!r} mapped to id {label_id}, outside [0, {num_labels})"
                )
            if (label_id < num_target_labels) != is_target:
                result.misplaced_labels[span.label] += 1
                continue
            cell = (sample, span.start, span.end - 1, label_id)
            if cell in cells:
                result.duplicates += 1
                continue
            cells.add(cell)

    for index, sample in enumerate(samples):
        add(index, sample.spans, is_target=True)
        if include_extensions:
            add(index, sample.extension_spans, is_target=False)

    if cells:
        # One vectorised scatter instead of a Python write per span.
        index_tensor = torch.tensor(sorted(cells), dtype=torch.long).t()
        result.targets[tuple(index_tensor)] = 1.0
    if device is not None:
        result.targets = result.targets.to(device)
    return result


def uncertain_cells(
    samples: Sequence[object],
    seq_len: int,
    *,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """``(B, seq_len, seq_len)`` bool, True at cell ``(start, end - 1)`` of every span in a
    sample's ``uncertain_spans`` (partial annotation, see ``records.Sentence``); None when no
    sample of the batch has any, so ordinary batches pay nothing. Spans that do not fit the
    (possibly truncated) grid are skipped: a left-out cell needs no count."""
    spans = [getattr(sample, "uncertain_spans", None) or [] for sample in samples]
    if not any(spans):
        return None
    cells = torch.zeros(len(samples), seq_len, seq_len, dtype=torch.bool)
    for index, sample_spans in enumerate(spans):
        for span in sample_spans:
            if 0 <= span.start < span.end <= seq_len:
                cells[index, span.start, span.end - 1] = True
    return cells.to(device) if device is not None else cells
