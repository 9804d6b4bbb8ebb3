"""A stack of masked 2-D convolutions over the span grid (the paper's Table 3 "w/o local attn w cnn").

The ablation replaces the local attention with the grid module of CNN Nested NER (Yan et al.
2022, "An Embarrassingly Easy but Strong Baseline for Nested Named Entity Recognition").
That module, as published, is ``depth`` (default 3) blocks of

    conv (k×k, 'same' padding, no bias; padding cells zeroed first)
    -> + the block's input (residual) -> LayerNorm over the channels (eps 1e-6) -> GELU

where the residual stream is the normalised value *before* the GELU, and the module returns
that stream (the last block's LayerNorm output). It also builds a final 3×3 convolution whose
output it never returns; that layer has no effect, so it is left out here. The caller adds
the result to the grid it came from (``H_B + CNN(H_B)``).

Because LayerNorm and GELU act per cell, a cell's output depends only on the cells within
Chebyshev distance ``depth * (kernel_size // 2)`` of it: 3 units each way at the default
depth 3 and kernel 3, in both the start and the end index (the attention's ω = 3 reaches as
far, but along the row only).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MaskedGridCNN"]


class MaskedGridCNN(nn.Module):
    """Masked residual convolutions over a ``(B, L, L, D)`` grid.

    Args:
        channels: D, the grid's channels (input and output).
        depth: number of conv blocks; each widens the receptive field by ``kernel_size // 2``.
        kernel_size: odd side of the square kernel (odd, so that 'same' padding keeps cell
            (i, j) at the kernel's centre).
    """

    def __init__(self, channels: int, depth: int = 3, kernel_size: int = 3) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if depth < 1:
            raise ValueError(f"cnn depth must be >= 1, got {depth}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.depth = depth
        self.kernel_size = kernel_size
        # No bias, as published: the LayerNorm that follows has its own shift.
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
            for _ in range(depth)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(channels, eps=1e-6) for _ in range(depth))

    @property
    def receptive_radius(self) -> int:
        """How many units away (Chebyshev distance) a cell's output can read."""
        return self.depth * (self.kernel_size // 2)

    def forward(self, grid: Tensor, mask: Tensor) -> Tensor:
        """``grid`` ``(B, L, L, D)``, ``mask`` ``(B, L)`` (True = real unit) -> ``(B, L, L, D)``.

        Only the cells whose two units are real are meaningful; the others hold whatever the
        normalisation leaves there and are zeroed again before each convolution reads them.
        """
        if grid.dim() != 4 or grid.shape[1] != grid.shape[2] or mask.shape != grid.shape[:2]:
            raise ValueError(
                f"expected grid (B, L, L, D) and mask (B, L), got {tuple(grid.shape)} and {tuple(mask.shape)}"
            )
        mask = mask.bool()
        padding = ~(mask[:, :, None] & mask[:, None, :]).unsqueeze(-1)  # (B, L, L, 1)
        stream = grid.masked_fill(padding, 0.0)
        mixed = stream
        for conv, norm in zip(self.convs, self.norms):
            mixed = self._conv(conv, mixed.masked_fill(padding, 0.0))
            stream = norm(mixed + stream)
            mixed = F.gelu(stream)
        return stream

    @staticmethod
    def _conv(conv: nn.Conv2d, cells: Tensor) -> Tensor:
        # Conv2d wants channels first; the head keeps the grid channels-last for the classifier.
        return conv(cells.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
