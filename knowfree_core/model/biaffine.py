"""Span-boundary projections and the multi-head biaffine grid (paper eq. 7-8).

``H_s = LeakyReLU(H W_s)``, ``H_e = LeakyReLU(H W_e)`` (D' features each), then a multi-head
biaffine form in the style of Yu et al. (2020) as extended by CNN-Nested-NER: D' is split into
``h`` heads, a 1 is appended to each side (so the bilinear form also carries the linear and
constant terms), and head ``t`` produces D̃/h output channels with its own tensor
``U_t ∈ R^{(D'/h+1) × (D'/h+1) × D̃/h}``. The heads' channels are concatenated to D̃.

Splitting into heads keeps the parameter count at about D'²·D̃/h² (≈0.5 M for 200/200/4)
instead of D'²·D̃ (8 M) for a single full biaffine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiHeadBiaffine", "BiaffineSpanEncoder"]

# E[LeakyReLU(z)^2] for z = Linear(H) with PyTorch's default Linear init and unit-variance H:
# Var(z) = D·Var(H)/(3D) = 1/3, and LeakyReLU keeps about half of that second moment.
_FEATURE_SECOND_MOMENT = 1.0 / 6.0


class MultiHeadBiaffine(nn.Module):
    """``(B, L, D'), (B, L, D') -> (B, L, L, D̃)``; cell ``(i, j)`` scores start i, end j."""

    def __init__(self, in_dim: int, out_dim: int = 200, num_heads: int = 4) -> None:
        super().__init__()
        if in_dim % num_heads != 0 or out_dim % num_heads != 0:
            raise ValueError(
                f"in_dim ({in_dim}) and out_dim ({out_dim}) must both be divisible by "
                f"num_heads ({num_heads})"
            )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.head_in = in_dim // num_heads
        self.head_out = out_dim // num_heads
        self.weight = nn.Parameter(
            torch.empty(num_heads, self.head_in + 1, self.head_in + 1, self.head_out)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each output sums (d+1)² products x_a·y_b; with feature second moment m² the sum of the
        # (non-constant) terms has variance ≈ std²·(d·m² + 1)². Choosing std = 1/(d·m² + 1)
        # makes grid values O(1) at initialisation.
        std = 1.0 / (self.head_in * _FEATURE_SECOND_MOMENT + 1.0)
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, start: Tensor, end: Tensor) -> Tensor:
        batch, length, _ = start.shape
        h, d = self.num_heads, self.head_in

        def with_bias(t: Tensor) -> Tensor:
            t = t.reshape(batch, length, h, d)
            return F.pad(t, (0, 1), value=1.0)  # (B, L, h, d+1)

        s, e = with_bias(start), with_bias(end)
        # Contract the start side first: (B, L, h, d+1, o) is small (no L² factor).
        left = torch.einsum("bihx,hxyo->bihyo", s, self.weight)
        grid = torch.einsum("bihyo,bjhy->bijho", left, e)
        return grid.reshape(batch, length, length, self.out_dim)

    def forward_band(self, start: Tensor, end: Tensor, first_offset: int, width: int) -> Tensor:
        """``(B, L, width, D̃)``: cell ``(i, c)`` scores start i, end ``j = i + first_offset + c``.

        The same values as :meth:`forward` at those cells, computed for ``width`` ends per start
        instead of L: what makes long sentences affordable when spans are short. Ends outside
        ``0..L-1`` get the score of an all-zero end vector; callers mask them.
        """
        batch, length, _ = start.shape
        h, d = self.num_heads, self.head_in
        s = F.pad(start.reshape(batch, length, h, d), (0, 1), value=1.0)
        e = F.pad(end.reshape(batch, length, h, d), (0, 1), value=1.0)
        before = max(0, -first_offset)
        after = max(0, first_offset + width - 1)
        # Zero rows outside the sentence, then a sliding view: no copy of the (B, L, width) ends.
        e = F.pad(e, (0, 0, 0, 0, before, after))
        skip = first_offset + before
        windows = e[:, skip : skip + length + width - 1].unfold(1, width, 1)  # (B, L, h, d+1, W)
        left = torch.einsum("bihx,hxyo->bihyo", s, self.weight)
        grid = torch.einsum("bihyo,bihyw->biwho", left, windows)
        return grid.reshape(batch, length, width, self.out_dim)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_heads={self.num_heads}"


class BiaffineSpanEncoder(nn.Module):
    """Hidden states ``(B, L, D)`` -> biaffine span grid ``H_B`` ``(B, L, L, D̃)``.

    Args:
        hidden_size: D, the encoder's hidden size.
        ffn_size: D', the boundary feature size (paper: 200).
        grid_size: D̃, the grid channel size (paper: 200).
        num_heads: biaffine heads; must divide both ``ffn_size`` and ``grid_size``.
        dropout: applied to ``H_s``/``H_e`` after the activation.
        negative_slope: LeakyReLU slope (σ in eq. 7).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int = 200,
        grid_size: int = 200,
        num_heads: int = 4,
        dropout: float = 0.0,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        self.start_proj = nn.Linear(hidden_size, ffn_size)
        self.end_proj = nn.Linear(hidden_size, ffn_size)
        self.activation = nn.LeakyReLU(negative_slope)
        self.dropout = nn.Dropout(dropout)
        self.biaffine = MultiHeadBiaffine(ffn_size, grid_size, num_heads)

    @property
    def grid_size(self) -> int:
        return self.biaffine.out_dim

    def boundaries(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``H_s``, ``H_e`` (eq. 7)."""
        start = self.dropout(self.activation(self.start_proj(hidden)))
        end = self.dropout(self.activation(self.end_proj(hidden)))
        return start, end

    def forward(self, hidden: Tensor) -> Tensor:
        return self.biaffine(*self.boundaries(hidden))

