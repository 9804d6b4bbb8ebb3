"""Local attention along grid rows with a key mask per cell, for narrow (band) grids.

The band form of the span head (``max_span_length``) holds, for each start i, only the few
end columns short spans need, so which keys are real depends on the row as well as the
column. The general :class:`LocalGridAttention` takes one key mask per sample and is built
to keep full L×L grids small in memory; on a band of a couple of dozen columns plain
autograd over the 2ω+1 offsets is both simple and fast. It uses the module's own weights, so
the band and full forms share one set of parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from knowfree_core.model.local_attention import LocalGridAttention


def row_local_attention(module: LocalGridAttention, grid: Tensor, key_mask: Tensor) -> Tensor:
    """``grid`` ``(B, R, C, D)``, ``key_mask`` ``(B, R, C)`` bool (True = real cell).

    Cell ``(r, c)`` attends cells ``(r, c')`` with ``|c - c'| <= ω`` whose key is real; a cell
    with no real key gets zeros. Returns ``(B, R, C, D)``.
    """
    batch, rows, cols, dim = grid.shape
    heads, window = module.num_heads, module.window
    head_dim = dim // heads
    qkv = F.linear(grid, module.in_proj_weight, module.in_proj_bias)
    q, k, v = qkv.view(batch, rows, cols, 3, heads, head_dim).unbind(3)
    q = q * head_dim**-0.5
    # Pad the column axis by ω each side once; each offset is then a view, not a copy.
    k = F.pad(k, (0, 0, 0, 0, window, window))
    v = F.pad(v, (0, 0, 0, 0, window, window))
    valid = F.pad(key_mask, (window, window), value=False)
    offsets = range(2 * window + 1)
    scores = torch.stack([(q * k[:, :, o : o + cols]).sum(-1) for o in offsets], dim=-1)  # (B,R,C,h,O)
    keep = torch.stack([valid[:, :, o : o + cols] for o in offsets], dim=-1)[:, :, :, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    # A cell whose every neighbour is padding: softmax over -inf gives NaN; it attends to nothing.
    weights = torch.nan_to_num(weights, nan=0.0)
    out = sum(weights[..., o, None] * v[:, :, o : o + cols] for o in offsets)
    out = out.reshape(batch, rows, cols, dim)
    return F.linear(out, module.out_proj.weight, module.out_proj.bias)
