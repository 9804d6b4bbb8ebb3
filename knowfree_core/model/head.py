"""The KnowFREE span head (paper §3.2, eq. 7-12): biaffine grid + local attention + classifier.

Input: unit-level hidden states ``H`` ``(B, L, D)`` and a bool mask ``(B, L)`` (True = real unit).
Output: logits ``(B, L, L, N_tgt + N_ext)``; cell ``(i, j)`` scores the span of units ``i..j``
(inclusive), i.e. ``Span(i, j + 1, label)``. Only the cells of :func:`span_grid_mask` are
meaningful; the rest is left unmasked for the loss/decoder to ignore.

The paper writes σ* = GeLU in eq. 12 (Appendix H); a probability needs a sigmoid, and training
uses BCE with logits, so this head returns logits and the decoder applies the sigmoid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from knowfree_core.model.biaffine import BiaffineSpanEncoder
from knowfree_core.model.grid_cnn import MaskedGridCNN
from knowfree_core.model.local_attention import LocalGridAttention
from knowfree_core.model.row_attention import row_local_attention

__all__ = ["KnowFreeHead", "span_grid_mask", "prior_logit"]


def prior_logit(prior: float) -> float:
    """``log(π / (1 - π))``: the bias that makes every cell start at probability π."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    return -math.log((1.0 - prior) / prior)


def span_grid_mask(mask: Tensor, max_span_length: int | None = None) -> Tensor:
    """``(B, L)`` unit mask -> ``(B, L, L)`` bool: cells ``(i, j)`` with i <= j, both real units,
    and (optionally) span length ``j - i + 1 <= max_span_length``."""
    mask = mask.bool()
    length = mask.shape[-1]
    positions = torch.arange(length, device=mask.device)
    offset = positions[None, :] - positions[:, None]  # j - i
    allowed = offset >= 0
    if max_span_length is not None:
        if max_span_length < 1:
            raise ValueError(f"max_span_length must be >= 1, got {max_span_length}")
        allowed = allowed & (offset < max_span_length)
    return mask[:, :, None] & mask[:, None, :] & allowed


class KnowFreeHead(nn.Module):
    """Biaffine span head with optional local grid attention (the KnowFREE decoder).

    Args:
        hidden_size: D of the encoder states.
        num_labels: N_tgt + N_ext output columns (targets first, then extension labels).
        ffn_size: D' of the boundary projections (paper: 200).
        grid_size: D̃ of the biaffine grid (paper: 200).
        biaffine_heads: heads of the multi-head biaffine (must divide ffn_size and grid_size).
        window: ω of the local attention (paper: 3).
        attn_heads: K of the local attention (paper: 10; must divide grid_size).
        use_local_attention: False gives the plain biaffine baseline, logits = W_O(H_B) + b.
        grid_mixer: ``attention`` (the paper's local multi-head attention) or ``cnn`` (the
            ablation of the paper's Table 3, "w/o local attn w cnn": in its place, the grid
            module of CNN Nested NER, :class:`MaskedGridCNN` -- ``cnn_depth`` masked 3×3
            convolutions, each with a residual, LayerNorm and GELU; the classifier reads
            ``H_B + CNN(H_B)``). ``window`` and ``attn_heads`` do not apply to it, and the
            band form of ``max_span_length`` is not used with it (a 2-D neighbourhood).
        cnn_depth: convolutions of the ``cnn`` mixer (CNN Nested NER: 3); a cell reads the
            cells up to ``cnn_depth`` units away in both indices (ω reaches along the row only).
        dropout: on the boundary features and on the classifier input.
        output_prior: initial probability π of every cell/label; the output bias starts at
            logit(π) because almost all of the L² cells are negatives, and starting at 0.5
            wastes the first epochs on learning "everything is 0".
        chunk_elements: forwarded to :class:`LocalGridAttention`.
        input_norm: LayerNorm the encoder states before the boundary projections. Encoders
            whose last layer is nearly collinear (the offline e5: mean cosine 0.85 between the
            vectors of one sentence) hand the head a large shared component; normalising
            per vector lets the projections see the differences from the start.
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        ffn_size: int = 200,
        grid_size: int = 200,
        biaffine_heads: int = 4,
        window: int = 3,
        attn_heads: int = 10,
        use_local_attention: bool = True,
        grid_mixer: str = "attention",
        cnn_depth: int = 3,
        dropout: float = 0.1,
        output_prior: float = 0.01,
        chunk_elements: int | None = None,
        input_norm: bool = False,
        max_span_length: int | None = None,
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.use_local_attention = use_local_attention
        if max_span_length is not None and max_span_length < 1:
            raise ValueError(f"max_span_length must be >= 1, got {max_span_length}")
        self.max_span_length = max_span_length
        self.window = window if use_local_attention else 0
        self.input_norm = nn.LayerNorm(hidden_size) if input_norm else None
        self.biaffine = BiaffineSpanEncoder(
            hidden_size, ffn_size, grid_size, biaffine_heads, dropout=dropout
        )
        if grid_mixer not in ("attention", "cnn"):
            raise ValueError(f"grid_mixer must be 'attention' or 'cnn', got {grid_mixer!r}")
        self.local_attention: LocalGridAttention | None = None
        self.grid_cnn: MaskedGridCNN | None = None
        self.norm: nn.LayerNorm | None = None
        if use_local_attention and grid_mixer == "cnn":
            # The CNN ends in its own LayerNorm (its residual stream), so no self.norm here.
            self.grid_cnn = MaskedGridCNN(grid_size, depth=cnn_depth, kernel_size=3)
        elif use_local_attention:
            self.local_attention = LocalGridAttention(
                grid_size, attn_heads, window, chunk_elements=chunk_elements
            )
            self.norm = nn.LayerNorm(grid_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(grid_size, num_labels)
        self.output_prior = output_prior
        nn.init.constant_(self.classifier.bias, prior_logit(output_prior))

    def grid(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """The classifier input: ``H_B + H_G`` (``H_B + CNN(H_B)`` with the cnn mixer, ``H_B``
        without local attention)."""
        if self.input_norm is not None:
            hidden = self.input_norm(hidden)
        grid = self.biaffine(hidden)
        if self.grid_cnn is not None:
            # Padding cells are zeroed before every convolution, as the attention masks its keys.
            return grid + self.grid_cnn(grid, mask)
        if self.local_attention is None or self.norm is None:
            return grid
        attended = self.local_attention(grid, mask)
        fused = self.norm(grid + attended)  # H_G, eq. 11
        return grid + fused  # eq. 12's H_B + H_G

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
            raise ValueError(
                f"expected hidden (B, L, D) and mask (B, L), got {tuple(hidden.shape)} and "
                f"{tuple(mask.shape)}"
            )
        length = hidden.shape[1]
        # The band form covers the attention mixer only: the CNN reads a 2-D neighbourhood.
        if (self.grid_cnn is None and self.max_span_length is not None
                and self.max_span_length + 2 * self.window < length):
            return self._forward_band(hidden, mask.bool())
        return self.classifier(self.dropout(self.grid(hidden, mask.bool())))

    def _forward_band(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """The same logits as the full grid on every span of at most ``max_span_length`` units.

        Only the cells those spans need are computed: for start i, ends i-ω .. i+M-1+ω (the
        spans plus the ω neighbours each side that their row attention reads; cells left of
        the diagonal are real keys in the full grid too). Cost O(L·(M+2ω)) instead of O(L²).
        Cells outside the band get a large negative logit: never predicted, and masked out of
        the loss by ``span_grid_mask(mask, max_span_length)``.
        """
        batch, length, _ = hidden.shape
        span, window = self.max_span_length, self.window
        width = span + 2 * window
        if self.input_norm is not None:
            hidden = self.input_norm(hidden)
        band = self.biaffine.biaffine.forward_band(*self.biaffine.boundaries(hidden), -window, width)
        if self.local_attention is not None and self.norm is not None:
            # Row i of the band holds ends j = i - ω + c; a key is real when 0 <= j < n.
            ends = torch.arange(length, device=hidden.device)[:, None] - window + torch.arange(
                width, device=hidden.device
            )[None, :]
            inside = (ends >= 0) & (ends < length)
            key_mask = mask[:, ends.clamp(0, length - 1)] & inside  # (B, L, W)
            attended = row_local_attention(self.local_attention, band, key_mask)
            band = band + self.norm(band + attended)
        band_logits = self.classifier(self.dropout(band[:, :, window : window + span]))  # (B, L, M, N)
        logits = band_logits.new_full((batch, length, length, band_logits.shape[-1]), -1e4)
        for offset in range(min(span, length)):
            # The offset-th diagonal of the grid holds the spans of offset + 1 units.
            logits.diagonal(offset, 1, 2).copy_(band_logits[:, : length - offset, offset].transpose(1, 2))
        return logits
