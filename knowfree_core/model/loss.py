"""Weighted multi-label BCE over the span grid (paper eq. 13-15).

Choices, and why:

* **Full BCE on every column.** Eq. 13 writes only the positive term ``y log P``. Trained alone
  that term is minimised by predicting 1 everywhere, so we use the standard binary cross
  entropy ``-(y log P + (1 - y) log(1 - P))`` for every label column, target and extension
  alike, and multiply the extension columns by α_i (targets by 1).
* **Valid cells only.** Cells outside :func:`~knowfree_core.model.head.span_grid_mask`
  (padding, lower triangle, over-long spans) contribute nothing and receive exactly zero
  gradient: their logits are replaced by a constant before the BCE, so even inf/NaN there
  cannot leak in.
* **Reduction.** ``normalize="sample"`` (default): per sample, *sum* over its valid cells and
  labels; then average over the samples of the batch. Every span cell in the corpus counts the
  same whatever its sentence length (a per-cell mean would shrink the weight of each entity in
  a long sentence by 1/L²), and the batch size does not change the scale.
  ``normalize="cell"`` divides the same weighted sum by the number of valid cells instead.
* **Synthetic samples** get weight β, real ones 1: summed over a batch this is eq. 14's
  ``L + β·L_syn`` with both terms on the same per-sample scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "extension_label_weights",
    "label_weight_vector",
    "synthetic_sample_weights",
    "span_bce_loss",
]

Counts = Sequence[float] | Mapping[str, float] | Tensor


def _count_values(counts: Counts) -> list[float]:
    if isinstance(counts, Tensor):
        return [float(c) for c in counts.flatten().tolist()]
    if isinstance(counts, Mapping):
        return [float(c) for c in counts.values()]
    return [float(c) for c in counts]


def extension_label_weights(
    target_counts: Counts,
    extension_counts: Counts,
    scale: float = 0.5,
    fixed: float | None = None,
    max_weight: float | None = None,
) -> Tensor:
    """α_i = scale · Ĉ / C_i (Appendix H, eq. 15), one per extension label, in input order.

    Ĉ is the mean count of the target labels, C_i the count of extension label i (mappings are
    read in their iteration order). ``fixed`` replaces every α_i by that one number. An
    extension label with C_i = 0 has no positives to learn; it gets α_i = 0 instead of a
    division by zero. ``max_weight`` caps each α_i, fixed or computed (None: uncapped, as eq. 15
    is published).
    """
    if max_weight is not None and max_weight <= 0:
        raise ValueError(f"max extension weight must be > 0, got {max_weight}")
    alphas = _uncapped_extension_weights(target_counts, extension_counts, scale, fixed)
    return alphas if max_weight is None else alphas.clamp(max=float(max_weight))


def _uncapped_extension_weights(
    target_counts: Counts, extension_counts: Counts, scale: float, fixed: float | None
) -> Tensor:
    ext = _count_values(extension_counts)
    if fixed is not None:
        if fixed < 0:
            raise ValueError(f"fixed extension weight must be >= 0, got {fixed}")
        return torch.full((len(ext),), float(fixed))
    targets = _count_values(target_counts)
    if not targets:
        raise ValueError("target_counts is empty: the mean target count Ĉ is undefined")
    if any(c < 0 for c in targets + ext):
        raise ValueError("label counts must be >= 0")
    mean_target = sum(targets) / len(targets)
    return torch.tensor([scale * mean_target / c if c > 0 else 0.0 for c in ext])


def label_weight_vector(
    num_target_labels: int, extension_weights: Tensor | Sequence[float]
) -> Tensor:
    """``(N_tgt + N_ext,)``: 1 for every target column, then α_i for each extension column."""
    ext = torch.as_tensor(extension_weights, dtype=torch.float32).flatten()
    return torch.cat([torch.ones(num_target_labels), ext])


def synthetic_sample_weights(synthetic: Tensor | Sequence[bool], beta: float) -> Tensor:
    """``(B,)``: β where the sample is synthetic, 1 otherwise."""
    flags = torch.as_tensor(synthetic, dtype=torch.bool)
    return torch.where(flags, torch.tensor(float(beta)), torch.tensor(1.0))


def span_bce_loss(
    logits: Tensor,
    targets: Tensor,
    cell_mask: Tensor,
    label_weights: Tensor | None = None,
    sample_weights: Tensor | None = None,
    *,
    synthetic: Tensor | Sequence[bool] | None = None,
    beta: float = 1.0,
    normalize: Literal["sample", "cell"] = "sample",
) -> Tensor:
    """Weighted BCE-with-logits over the valid span cells (see the module docstring).

    Args:
        logits: ``(B, L, L, N)``.
        targets: ``(B, L, L, N)`` multi-hot (0/1; soft targets also work).
        cell_mask: ``(B, L, L)`` bool, True on the cells that count.
        label_weights: ``(N,)``; None = all 1. Build with :func:`label_weight_vector`.
        sample_weights: ``(B,)`` per-sample weights, e.g. from :func:`synthetic_sample_weights`.
        synthetic, beta: the alternative to ``sample_weights``: ``(B,)`` flags, synthetic
            samples weighted by ``beta``.
        normalize: ``"sample"`` (sum over cells, mean over samples) or ``"cell"``.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    if cell_mask.shape != logits.shape[:3]:
        raise ValueError(f"cell_mask {tuple(cell_mask.shape)} must be {tuple(logits.shape[:3])}")
    valid = cell_mask.bool().unsqueeze(-1)
    # Replace invalid logits before the BCE so nothing (not even NaN) flows back through them.
    safe_logits = logits.masked_fill(~valid, 0.0)
    per_entry = F.binary_cross_entropy_with_logits(
        safe_logits, targets.to(logits.dtype), reduction="none"
    )
    if label_weights is not None:
        per_entry = per_entry * label_weights.to(device=logits.device, dtype=logits.dtype)
    per_entry = per_entry.masked_fill(~valid, 0.0)
    per_sample = per_entry.flatten(1).sum(1)  # (B,)
    if synthetic is not None:
        if sample_weights is not None:
            raise ValueError("give either sample_weights or synthetic flags, not both")
        sample_weights = synthetic_sample_weights(synthetic, beta)
    if sample_weights is not None:
        if sample_weights.shape != per_sample.shape:
            raise ValueError(
                f"sample_weights {tuple(sample_weights.shape)} must be {tuple(per_sample.shape)}"
            )
        per_sample = per_sample * sample_weights.to(device=logits.device, dtype=logits.dtype)
    if normalize == "sample":
        return per_sample.sum() / max(1, logits.shape[0])
    if normalize == "cell":
        return per_sample.sum() / cell_mask.sum().clamp(min=1).to(logits.dtype)
    raise ValueError(f"normalize must be 'sample' or 'cell', got {normalize!r}")
