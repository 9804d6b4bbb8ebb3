"""Weighted multi-label BCE over the span grid (paper eq. 13-15).

Choices, and why:

* **Full BCE on every column.** Eq. 13 writes only the positive term ``y log P``. Trained alone
  that term is minimised by predicting 1 everywhere, so we use the standard binary cross
  entropy ``-(y log P + (1 - y) log(1 - P))`` for every label column, target and extension
  alike, and multiply the extension columns by α_i (targets by 1). How α_i is computed is
  :data:`ALPHA_SCHEMES` (the paper's eq. 15 is ``eq15``).
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
* **Partial annotation.** ``unknown_cells`` marks cells whose target label nobody vouches for
  (a pseudo-labelled sentence's doubtful spans): their target columns are left out of the sum,
  as padding is, so the model is taught neither "entity" nor "no entity" there; their
  extension columns (another annotator's labels) still count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ALPHA_SCHEDULES",
    "ALPHA_SCHEMES",
    "extension_weight_factor",
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


#: How the loss weighs extension label i (α_i); ``model.alpha_scheme``.
#:
#: * ``eq15`` — the paper's Appendix H, eq. 15: α_i = scale · Ĉ / C_i, Ĉ the mean count of the
#:   target labels and C_i the count of label i. Every extension label gets the same total
#:   positive weight (α_i · C_i = scale · Ĉ), so a label seen 3 times weighs 100× one seen 300
#:   times: on UD POS at 250 sentences a 2-count LAC tag gets α = 103 (bench/RESULTS.md).
#: * ``uniform`` — α_i = scale for every extension label.
#: * ``view`` — every view (ent, seg, pos: see :func:`knowfree_core.labels.extension_view`)
#:   together weighs ``scale`` times the target labels' total positives T, shared equally by its
#:   labels' spans: α_i = scale · T / C_view(i). A view's pull relative to the targets is then
#:   one number whatever its size or how its labels are split, and no label is up-weighted for
#:   being rare.
ALPHA_SCHEMES = ("eq15", "uniform", "view")


def extension_label_weights(
    target_counts: Counts,
    extension_counts: Counts,
    scale: float = 0.5,
    scheme: str = "eq15",
    views: Sequence[str] | None = None,
    view_weights: Mapping[str, float] | None = None,
    max_weight: float | None = None,
) -> Tensor:
    """α_i for each extension label, in input order (mappings are read in iteration order).

    ``scheme`` is one of :data:`ALPHA_SCHEMES`; ``views`` names each extension label's view
    (needed by ``view`` and by ``view_weights``). ``view_weights`` multiplies the α of every
    label of a view (0 switches a view off; views not named keep 1). ``max_weight`` caps each
    α_i last (None: uncapped, as eq. 15 is published). An extension label with C_i = 0 has no
    positives to learn and gets α_i = 0 instead of a division by zero.
    """
    if max_weight is not None and max_weight <= 0:
        raise ValueError(f"max extension weight must be > 0, got {max_weight}")
    if scale < 0:
        raise ValueError(f"extension weight scale must be >= 0, got {scale}")
    ext = _count_values(extension_counts)
    if views is not None and len(views) != len(ext):
        raise ValueError(f"{len(views)} views given for {len(ext)} extension labels")
    if (scheme == "view" or view_weights) and views is None:
        raise ValueError(f"alpha scheme {scheme!r} (or view weights) needs views: the view of every extension label")
    alphas = _scheme_weights(_count_values(target_counts), ext, scale, scheme, views)
    if view_weights:
        if any(w < 0 for w in view_weights.values()):
            raise ValueError(f"view weights must be >= 0, got {dict(view_weights)}")
        alphas = alphas * torch.tensor([float(view_weights.get(v, 1.0)) for v in views or ()])
    return alphas if max_weight is None else alphas.clamp(max=float(max_weight))


def _scheme_weights(
    targets: list[float], ext: list[float], scale: float, scheme: str, views: Sequence[str] | None
) -> Tensor:
    if scheme not in ALPHA_SCHEMES:
        raise ValueError(f"alpha scheme must be one of {', '.join(ALPHA_SCHEMES)}, got {scheme!r}")
    if scheme == "uniform":
        return torch.tensor([float(scale) if c > 0 else 0.0 for c in ext])
    if not targets:
        raise ValueError("target_counts is empty: the target counts the weights are relative to are undefined")
    if any(c < 0 for c in targets + ext):
        raise ValueError("label counts must be >= 0")
    if scheme == "eq15":
        mean_target = sum(targets) / len(targets)
        return torch.tensor([scale * mean_target / c if c > 0 else 0.0 for c in ext])
    view_totals: dict[str, float] = {}
    for view, count in zip(views or (), ext):
        view_totals[view] = view_totals.get(view, 0.0) + count
    total_target = sum(targets)
    return torch.tensor([
        scale * total_target / view_totals[view] if c > 0 else 0.0 for view, c in zip(views or (), ext)
    ])


#: How the extension weights change over training; ``model.alpha_schedule``.
#:
#: * ``constant`` — α_i throughout (the paper).
#: * ``linear`` — α_i · (1 − progress), progress running from 0 at the first step to 1 after the
#:   last: the extension labels shape the shared span features early, and the last epochs (where
#:   the dev-chosen checkpoint usually is) fit the target labels alone.
ALPHA_SCHEDULES = ("constant", "linear")


def extension_weight_factor(schedule: str, progress: float) -> float:
    """The multiplier of every α_i at ``progress`` (0..1) of training under ``schedule``."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - float(progress))
    raise ValueError(f"alpha schedule must be one of {', '.join(ALPHA_SCHEDULES)}, got {schedule!r}")


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
    unknown_cells: Tensor | None = None,
    num_target_labels: int | None = None,
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
        unknown_cells: ``(B, L, L)`` bool, True where the first ``num_target_labels`` columns
            (the targets) are left out of the loss (partial annotation).
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
    if unknown_cells is not None:
        if num_target_labels is None:
            raise ValueError("unknown_cells needs num_target_labels: which columns are the targets")
        if unknown_cells.shape != logits.shape[:3]:
            raise ValueError(f"unknown_cells {tuple(unknown_cells.shape)} must be {tuple(logits.shape[:3])}")
        columns = torch.arange(logits.shape[-1], device=logits.device) < num_target_labels
        per_entry = per_entry.masked_fill(unknown_cells.bool().unsqueeze(-1) & columns, 0.0)
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
