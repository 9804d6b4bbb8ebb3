"""Local (banded) multi-head attention over the rows of a biaffine span grid (paper eq. 9-10).

The grid ``H_B`` has shape ``(B, L, L, D)``. Row ``i`` (span start) is treated as a sequence of
``L`` cells ``(i, 0) .. (i, L-1)``; cell ``(i, j)`` attends to the cells ``(i, j')`` of the same
row with ``|j - j'| <= window`` whose column ``j'`` is a real unit of the sentence.

Parameters are laid out exactly like :class:`torch.nn.MultiheadAttention` (``in_proj_weight``,
``in_proj_bias``, ``out_proj``), so :func:`dense_local_attention_reference` can run the stock
dense implementation with an additive band mask on the same weights. The dense form costs
O(B·L³·D) time and O(B·K·L³) memory; the banded form here costs O(B·L²·(2ω+1)·D).

Memory: the banded computation is a custom autograd function that processes the grid in chunks
of rows and *recomputes* q/k/v and the attention weights in backward instead of storing them.
Autograd therefore keeps nothing but the input grid alive; peak memory is about four grids
(input, output, output gradient, input gradient) plus one chunk of scratch space.
``save_projections=True`` keeps q/k/v instead (three more grids, a faster backward).

Positions whose column is padding get an output of exactly zero (not ``out_proj.bias``, and never
NaN): they have no meaning and zeros keep the later LayerNorm/residual numerically tame. A real
position always has at least itself as a valid key, so the softmax is never empty for it.

Attention-weight dropout is deliberately not offered: the backward pass recomputes the weights,
which would need the dropout mask replayed. Regularise the head's outputs instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LocalGridAttention",
    "banded_local_attention",
    "dense_local_attention_reference",
    "lengths_to_mask",
]

# Grid elements (rows × L × D) processed per chunk; bounds the scratch memory (about twenty
# chunk-sized buffers). On CPU the speed is flat from 2^18 to 2^22 elements, so take a small
# chunk; GPUs get bigger chunks because there the cost is the number of kernel launches.
_DEFAULT_CHUNK_ELEMENTS_CPU = 1 << 19
_DEFAULT_CHUNK_ELEMENTS_CUDA = 1 << 24


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``(B,)`` integer lengths -> ``(B, max_len)`` bool mask, True on real positions."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.to(positions.device).unsqueeze(1)


def _as_key_mask(
    lengths_or_mask: Tensor | None, batch: int, length: int, device: torch.device
) -> Tensor:
    """Accept ``(B,)`` lengths or a ``(B, L)`` bool mask (or None = no padding); return the mask."""
    if lengths_or_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if lengths_or_mask.dim() == 1:
        return lengths_to_mask(lengths_or_mask.to(device), length)
    if lengths_or_mask.shape != (batch, length):
        raise ValueError(
            f"key mask has shape {tuple(lengths_or_mask.shape)}, expected ({batch}, {length})"
        )
    return lengths_or_mask.to(device=device, dtype=torch.bool)


class _Band:
    """Index ranges of one offset δ: query positions [lo, hi) see key positions [lo+δ, hi+δ)."""

    __slots__ = ("index", "delta", "lo", "hi")

    def __init__(self, index: int, delta: int, length: int):
        self.index = index
        self.delta = delta
        self.lo = max(0, -delta)
        self.hi = min(length, length - delta)


def _bands(window: int, length: int) -> list[_Band]:
    """The offsets with at least one in-range (query, key) pair, δ = 0 first.

    δ = 0 covers every position, so the first band can *write* each accumulator (``out=``)
    and the rest add to it: no zero-filled accumulators, one memory pass less each.
    """
    order = [window] + [o for o in range(2 * window + 1) if o != window]
    bands = [_Band(o, o - window, length) for o in order]
    return [b for b in bands if b.hi > b.lo]


def _accumulate(target: Tensor, first: bool, a: Tensor, b: Tensor) -> None:
    """``target = a * b`` on the first band (which covers all of target), else ``+=``."""
    if first:
        torch.mul(a, b, out=target)
    else:
        target.addcmul_(a, b)


def _neighbour_valid(row_key_mask: Tensor, window: int) -> Tensor:
    """``(n, L)`` key mask -> ``(n, L, 2ω+1)``: is the key at offset δ of position j real?"""
    padded = F.pad(row_key_mask, (window, window), value=False)
    return padded.unfold(1, 2 * window + 1, 1)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision grids: do the softmax/accumulation arithmetic in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _project(x: Tensor, in_weight: Tensor, in_bias: Tensor | None, num_heads: int) -> list[Tensor]:
    """q, k, v of ``x`` ``(n, L, D)``, each a separate *contiguous* ``(n, L, K, d)`` tensor.

    Three GEMMs instead of one fused (n·L, 3D) GEMM: the banded loops below are memory bound,
    and they run about twice as fast on contiguous q/k/v as on the strided views of one buffer.
    """
    n, length, dim = x.shape
    work = _work_dtype(x.dtype)
    biases = (None, None, None) if in_bias is None else in_bias.chunk(3)
    return [
        F.linear(x, w, b).to(work).view(n, length, num_heads, dim // num_heads)
        for w, b in zip(in_weight.chunk(3), biases)
    ]


def _attend(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, window: int
) -> tuple[Tensor, Tensor]:
    """Banded softmax attention on ``(n, L, K, d)`` q/k/v; returns (probs ``(n, L, K, 2ω+1)``,
    attended ``(n, L, K, d)``). One pass per offset δ over shifted *views* of k and v."""
    n, length, num_heads, head_dim = q.shape
    scores = q.new_empty(n, length, num_heads, 2 * window + 1)
    for b in _bands(window, length):
        queries, keys = slice(b.lo, b.hi), slice(b.lo + b.delta, b.hi + b.delta)
        torch.linalg.vecdot(q[:, queries], k[:, keys], out=scores[:, queries, :, b.index])
    scores.mul_(1.0 / math.sqrt(head_dim))
    # Every entry not written above is an out-of-range neighbour, hence masked here. A finite
    # fill instead of -inf: fully masked (padding) positions then get finite weights that are
    # zeroed right after, instead of NaN that would leak into gradients.
    valid = _neighbour_valid(key_mask, window).unsqueeze(2)  # (n, L, 1, W)
    scores.masked_fill_(~valid, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    probs.masked_fill_(~key_mask[:, :, None, None], 0.0)

    attended = torch.empty_like(q)
    for first, b in enumerate(_bands(window, length)):
        _accumulate(
            attended[:, b.lo : b.hi],
            first == 0,
            probs[:, b.lo : b.hi, :, b.index : b.index + 1],
            v[:, b.lo + b.delta : b.hi + b.delta],
        )
    return probs, attended


def _row_chunks(num_rows: int, row_elements: int, chunk_elements: int) -> list[tuple[int, int]]:
    rows = max(1, chunk_elements // max(1, row_elements))
    return [(start, min(num_rows, start + rows)) for start in range(0, num_rows, rows)]


class _BandedAttentionFunction(torch.autograd.Function):
    """in_proj -> banded softmax attention -> out_proj, chunked over rows.

    Saved for backward: the input rows (alive anyway) and, if ``save_projections``, q/k/v
    (3 grids). Everything else - and q/k/v when not saved - is recomputed chunk by chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,  # (N, L, D) rows
        row_key_mask: Tensor,  # (N, L) bool
        in_weight: Tensor,
        in_bias: Tensor | None,
        out_weight: Tensor,
        out_bias: Tensor | None,
        num_heads: int,
        window: int,
        chunk_elements: int,
        save_projections: bool,
    ) -> Tensor:
        num_rows, length, dim = x.shape
        out = torch.empty_like(x)
        saved: list[Tensor] = []
        if save_projections:
            shape = (num_rows, length, num_heads, dim // num_heads)
            saved = [x.new_empty(shape, dtype=_work_dtype(x.dtype)) for _ in range(3)]
        for r0, r1 in _row_chunks(num_rows, length * dim, chunk_elements):
            q, k, v = _project(x[r0:r1], in_weight, in_bias, num_heads)
            for buffer, value in zip(saved, (q, k, v)):
                buffer[r0:r1] = value
            _, attended = _attend(q, k, v, row_key_mask[r0:r1], window)
            y = out[r0:r1].view(-1, dim)
            flat = attended.view(-1, dim).to(x.dtype)
            if out_bias is None:
                torch.mm(flat, out_weight.t(), out=y)
            else:
                torch.addmm(out_bias, flat, out_weight.t(), out=y)
            out[r0:r1].masked_fill_(~row_key_mask[r0:r1, :, None], 0.0)
        ctx.save_for_backward(x, row_key_mask, in_weight, in_bias, out_weight, out_bias, *saved)
        ctx.num_heads = num_heads
        ctx.window = window
        ctx.chunk_elements = chunk_elements
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, row_key_mask, in_weight, in_bias, out_weight, out_bias, *saved = ctx.saved_tensors
        num_heads: int = ctx.num_heads
        window: int = ctx.window
        num_rows, length, dim = x.shape
        scale = 1.0 / math.sqrt(dim // num_heads)
        need_x, _, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:6]

        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w_in = torch.zeros_like(in_weight) if need_w_in else None
        grad_b_in = torch.zeros_like(in_bias) if (need_b_in and in_bias is not None) else None
        grad_w_out = torch.zeros_like(out_weight) if need_w_out else None
        grad_b_out = torch.zeros_like(out_bias) if (need_b_out and out_bias is not None) else None
        need_inner = grad_x is not None or grad_w_in is not None or grad_b_in is not None
        bands = _bands(window, length)

        for r0, r1 in _row_chunks(num_rows, length * dim, ctx.chunk_elements):
            key_mask = row_key_mask[r0:r1]
            x_flat = x[r0:r1].reshape(-1, dim)
            if saved:
                q, k, v = (t[r0:r1] for t in saved)
            else:
                q, k, v = _project(x[r0:r1], in_weight, in_bias, num_heads)
            probs, attended = _attend(q, k, v, key_mask, window)
            # Padding positions were overwritten with zeros: no gradient flows through them.
            dy = grad_out[r0:r1].masked_fill(~key_mask[:, :, None], 0.0).view(-1, dim)

            if grad_w_out is not None:
                grad_w_out.addmm_(dy.t(), attended.view(-1, dim).to(x.dtype))
            if grad_b_out is not None:
                grad_b_out.add_(dy.sum(0))
            if not need_inner:
                continue

            d_att = (dy @ out_weight).to(q.dtype).view(q.shape)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            d_probs = torch.zeros_like(probs)  # small; out-of-range entries must be 0, not junk
            for first, b in enumerate(bands):
                queries, keys = slice(b.lo, b.hi), slice(b.lo + b.delta, b.hi + b.delta)
                torch.linalg.vecdot(
                    d_att[:, queries], v[:, keys], out=d_probs[:, queries, :, b.index]
                )
                p = probs[:, queries, :, b.index : b.index + 1]
                _accumulate(dv[:, keys], first == 0, p, d_att[:, queries])
            # Softmax backward; masked neighbours have probability 0 and so get no gradient.
            d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
            d_scores.mul_(scale)
            for first, b in enumerate(bands):
                queries, keys = slice(b.lo, b.hi), slice(b.lo + b.delta, b.hi + b.delta)
                ds = d_scores[:, queries, :, b.index : b.index + 1]
                _accumulate(dq[:, queries], first == 0, ds, k[:, keys])
                _accumulate(dk[:, keys], first == 0, ds, q[:, queries])

            grads = [g.view(-1, dim).to(x.dtype) for g in (dq, dk, dv)]
            weights = in_weight.chunk(3)
            for part, (grad, weight) in enumerate(zip(grads, weights)):
                rows = slice(part * dim, (part + 1) * dim)
                if grad_w_in is not None:
                    grad_w_in[rows].addmm_(grad.t(), x_flat)
                if grad_b_in is not None:
                    grad_b_in[rows].add_(grad.sum(0))
                if grad_x is not None:
                    target = grad_x[r0:r1].view(-1, dim)
                    if part == 0:
                        torch.mm(grad, weight, out=target)
                    else:
                        target.addmm_(grad, weight)

        return grad_x, None, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None, None


def banded_local_attention(
    grid: Tensor,
    key_mask: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    num_heads: int,
    window: int,
    chunk_elements: int | None = None,
    save_projections: bool = False,
) -> Tensor:
    """Functional form of :class:`LocalGridAttention` (see the module docstring)."""
    batch, rows, length, dim = grid.shape
    if rows == 0 or length == 0 or batch == 0:
        return grid.new_zeros(grid.shape)
    if chunk_elements is None:
        chunk_elements = (
            _DEFAULT_CHUNK_ELEMENTS_CUDA if grid.is_cuda else _DEFAULT_CHUNK_ELEMENTS_CPU
        )
    dtype = grid.dtype

    def cast(t: Tensor | None) -> Tensor | None:  # weights follow the grid dtype (autocast off)
        return None if t is None else t.to(dtype)

    # Every row of sample b shares the sample's key mask; expand is a view, the chunks copy it.
    row_key_mask = key_mask[:, None, :].expand(batch, rows, length).reshape(batch * rows, length)
    with torch.autocast(device_type=grid.device.type, enabled=False):
        out = _BandedAttentionFunction.apply(
            grid.reshape(batch * rows, length, dim).contiguous(),
            row_key_mask,
            cast(in_proj_weight),
            cast(in_proj_bias),
            cast(out_proj_weight),
            cast(out_proj_bias),
            num_heads,
            window,
            chunk_elements,
            save_projections,
        )
    return out.view(batch, rows, length, dim)


class LocalGridAttention(nn.Module):
    """Multi-head attention restricted to a window of ``±window`` cells along each grid row.

    Args:
        embed_dim: channel size D̃ of the grid; must be divisible by ``num_heads``.
        num_heads: number of heads K (paper: 10).
        window: ω, how many neighbours on each side a cell sees (paper: 3).
        chunk_elements: scratch budget (grid elements per chunk); None picks a per-device default.
        save_projections: keep q/k/v (three grids) for backward instead of recomputing them:
            faster backward (no second in_proj GEMM), higher peak memory.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 10,
        window: int = 3,
        *,
        chunk_elements: int | None = None,
        save_projections: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) and num_heads ({num_heads}) must be positive"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.window = window
        self.chunk_elements = chunk_elements
        self.save_projections = save_projections
        # Same names, shapes and initialisation as torch.nn.MultiheadAttention.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, grid: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``grid`` ``(B, L, L, D̃)``; ``key_mask`` ``(B, L)`` bool (True = real unit) or ``(B,)``
        lengths or None. Returns ``(B, L, L, D̃)``; zero at padding columns."""
        if grid.dim() != 4 or grid.shape[-1] != self.embed_dim:
            raise ValueError(
                f"grid must have shape (B, L, L, {self.embed_dim}), got {tuple(grid.shape)}"
            )
        batch, _, length, _ = grid.shape
        mask = _as_key_mask(key_mask, batch, length, grid.device)
        return banded_local_attention(
            grid,
            mask,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
            self.num_heads,
            self.window,
            self.chunk_elements,
            self.save_projections,
        )

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window={self.window}"


def dense_local_attention_reference(
    module: LocalGridAttention, grid: Tensor, lengths: Tensor | None = None
) -> Tensor:
    """The same computation via ``F.multi_head_attention_forward`` with an additive band mask.

    O(L³) time and memory: for tests and benchmarks only. ``lengths`` may be ``(B,)`` lengths or
    a ``(B, L)`` bool mask. Masked entries use a large finite negative instead of -inf so that
    fully masked (padding) positions stay finite; they are then zeroed like in the banded form.
    """
    batch, rows, length, dim = grid.shape
    key_mask = _as_key_mask(lengths, batch, length, grid.device)
    neg = -1e9
    positions = torch.arange(length, device=grid.device)
    band = (positions[:, None] - positions[None, :]).abs() <= module.window
    attn_mask = torch.zeros(length, length, dtype=grid.dtype, device=grid.device)
    attn_mask.masked_fill_(~band, neg)
    row_key_mask = key_mask[:, None, :].expand(batch, rows, length).reshape(batch * rows, length)
    padding_mask = torch.zeros(batch * rows, length, dtype=grid.dtype, device=grid.device)
    padding_mask.masked_fill_(~row_key_mask, neg)

    seq_first = grid.reshape(batch * rows, length, dim).transpose(0, 1)  # (L, N, D)
    out, _ = F.multi_head_attention_forward(
        seq_first,
        seq_first,
        seq_first,
        dim,
        module.num_heads,
        module.in_proj_weight,
        module.in_proj_bias,
        None,
        None,
        False,
        0.0,
        module.out_proj.weight,
        module.out_proj.bias,
        training=False,
        key_padding_mask=padding_mask,
        need_weights=False,
        attn_mask=attn_mask,
    )
    out = out.transpose(0, 1).reshape(batch, rows, length, dim)
    return out * key_mask[:, None, :, None].to(out.dtype)
