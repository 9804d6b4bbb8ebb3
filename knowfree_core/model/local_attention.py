"""Local (banded) multi-head attention over the rows of a biaffine span grid (paper eq. 9-10).

The grid ``H_B`` has shape ``(B, L, L, D)``. Row ``i`` (span start) is treated as a sequence of
``L`` cells ``(i, 0) .. (i, L-1)``; cell ``(i, j)`` attends to the cells ``(i, j')`` of the same
row with ``|j - j'| <= window`` whose column ``j'`` is a real unit of the sentence.

Parameters are laid out exactly like :class:`torch.nn.MultiheadAttention` (``in_proj_weight``,
``in_proj_bias``, ``out_proj``), so :func:`dense_local_attention_reference` (the functional dense
form) and :func:`nn_multihead_attention_reference` (an ``nn.MultiheadAttention`` module called
the ordinary way) run the stock dense implementation with a band mask on the same weights. The
dense form costs O(B·L³·D) time and O(B·K·L³) memory; the banded form here O(B·L²·(2ω+1)·D).

How the banded form is computed: a custom autograd function processes the grid in chunks of
whole rows. Per chunk, one GEMM ``W_in·xᵀ`` gives q/k/v *channel-major* ``(3, K, d, cells)``:
the cells of the chunk's rows lie one after the other on the contiguous axis, so each of the
2ω+1 offsets δ is one elementwise pass over shifted views of k/v (pairs that cross a row end
are masked like padding), and the reduction over the head dimension sums whole planes. The
projection GEMMs dominate the cost (about two thirds of a forward+backward on CPU); the banded
passes are memory bound. Columns after a sample's last real key are not computed at all (they only
ever give zeros), nor are samples without any real key.

Memory: autograd keeps the input grid (alive anyway) and, with ``save_projections=True`` (the
default), q/k/v and the attention weights: 3 + (2ω+1)·K/D grids (3.35 at D=200, K=10, ω=3), so
backward skips the in-projection GEMM and the softmax. With ``save_projections=False`` those
are recomputed chunk by chunk in backward; peak memory is then about four grids (input, output,
output gradient, input gradient) plus one chunk of scratch, at ~15-20% more time on CPU.

Positions whose column is padding get an output of exactly zero (not ``out_proj.bias``, and never
NaN): they have no meaning and zeros keep the later LayerNorm/residual numerically tame. A real
position always has at least itself as a valid key, so the softmax is never empty for it.

Attention-weight dropout is deliberately not offered: the backward pass may recompute the
weights, which would need the dropout mask replayed. Regularise the head's outputs instead.
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
    "nn_multihead_attention_reference",
]

# Grid elements (rows × L × D) processed per chunk; bounds the scratch memory (about twenty
# chunk-sized buffers). On CPU 2^18-2^19 is best (a chunk's q/k/v and gradients then stay
# near the 8 MiB L3; 2^16 pays per-op overhead, 2^21 goes to DRAM); GPUs get bigger chunks
# because there the cost is the number of kernel launches.
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
    """Flat index ranges of one offset δ: queries [lo, hi) see keys [lo+δ, hi+δ) of a chunk."""

    __slots__ = ("index", "delta", "lo", "hi")

    def __init__(self, index: int, delta: int, size: int):
        self.index = index
        self.delta = delta
        self.lo = max(0, -delta)
        self.hi = min(size, size - delta)

    def slices(self) -> tuple[slice, slice]:
        return slice(self.lo, self.hi), slice(self.lo + self.delta, self.hi + self.delta)


def _bands(window: int, size: int) -> list[_Band]:
    """The offsets with at least one in-range (query, key) pair, δ = 0 first.

    δ = 0 covers every position, so the first band can *write* each accumulator (``out=``)
    and the rest add to it: no zero-filled accumulators, one memory pass less each.
    """
    order = [window] + [o for o in range(2 * window + 1) if o != window]
    bands = [_Band(o, o - window, size) for o in order]
    return [b for b in bands if b.hi > b.lo]


class _Chunk:
    """Rows ``[r0, r1)`` of the (B·L, L, D) row tensor that share one key mask, cut to the first
    ``length`` columns (the columns after the last real key only ever give zeros).

    ``offset`` is the chunk's first cell in the packed buffers of saved tensors; ``holes`` is
    the (length,) key mask when it has padding *inside* the first ``length`` columns, else None.
    """

    __slots__ = ("r0", "r1", "length", "offset", "holes")

    def __init__(self, r0: int, r1: int, length: int, offset: int, holes: Tensor | None):
        self.r0, self.r1, self.length, self.offset, self.holes = r0, r1, length, offset, holes

    @property
    def cells(self) -> int:
        return (self.r1 - self.r0) * self.length


def _plan_chunks(
    key_mask: Tensor, rows: int, dim: int, chunk_elements: int
) -> tuple[list[_Chunk], int]:
    """Split the B·rows grid rows into chunks; returns (chunks, total cells computed).

    Consecutive samples with the same key mask form one run (their rows are contiguous), so a
    batch without padding is chunked as if it were one sample. Samples without any real key
    get no chunk at all: their output and gradients are exactly zero.
    """
    mask = key_mask.detach().to("cpu", torch.bool)
    chunks: list[_Chunk] = []
    offset = 0
    batch = mask.shape[0]
    start = 0
    while start < batch:
        stop = start + 1
        while stop < batch and torch.equal(mask[stop], mask[start]):
            stop += 1
        real = mask[start].nonzero()
        if real.numel():
            length = int(real[-1]) + 1
            prefix = mask[start, :length]
            holes = None if bool(prefix.all()) else prefix.to(key_mask.device)
            per_chunk = max(1, chunk_elements // (length * dim))
            for r0 in range(start * rows, stop * rows, per_chunk):
                r1 = min(stop * rows, r0 + per_chunk)
                chunks.append(_Chunk(r0, r1, length, offset, holes))
                offset += (r1 - r0) * length
        start = stop
    return chunks, offset


def _chunk_masks(chunk: _Chunk, window: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """``valid`` ``(2ω+1, 1, cells)``: is the key at offset δ of each position in its row and
    real? ``query_pad`` ``(cells,)`` (None without holes): is the position itself padding?"""
    n, length = chunk.r1 - chunk.r0, chunk.length
    key = (
        torch.ones(length, dtype=torch.bool, device=device)
        if chunk.holes is None
        else chunk.holes
    )
    padded = F.pad(key, (window, window), value=False)
    valid = padded.unfold(0, 2 * window + 1, 1).t()  # (W, length)
    valid = valid[:, None, None, :].expand(-1, 1, n, length).reshape(-1, 1, n * length)
    query_pad = None if chunk.holes is None else (~key).repeat(n)
    return valid, query_pad


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision grids: do the softmax/accumulation arithmetic in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _project(x_flat: Tensor, in_weight: Tensor, in_bias: Tensor | None, out: Tensor) -> None:
    """``out`` ``(3D, cells)`` = q/k/v of ``x_flat`` ``(cells, D)``, channel-major: one GEMM.

    Channel-major (``W·xᵀ`` rather than ``x·Wᵀ``) puts the cells on the contiguous axis, so every
    banded pass below runs over long contiguous runs, the per-head reduction over the head
    dimension is a sum of whole planes, and q, k and v are contiguous blocks of one buffer.
    """
    if out.dtype == x_flat.dtype:
        if in_bias is None:
            torch.mm(in_weight, x_flat.t(), out=out)
        else:
            torch.addmm(in_bias[:, None], in_weight, x_flat.t(), out=out)
    else:  # half-precision grid: GEMM in its dtype, banded arithmetic in float32
        out.copy_(F.linear(x_flat, in_weight, in_bias).t())


def _softmax_weights(
    q: Tensor,
    k: Tensor,
    valid: Tensor,
    query_pad: Tensor | None,
    window: int,
    scratch: Tensor,
) -> Tensor:
    """Banded attention weights ``(2ω+1, K, cells)`` of channel-major ``(K, d, cells)`` q/k.

    One pass per offset δ over shifted views of k along the flat cell axis (whole grid rows
    one after the other). Pairs that cross a row boundary or reach a padding key are junk that
    ``valid`` masks before the softmax, so their weight is exactly 0. ``scratch`` is a
    ``(K, d, ≥cells)`` buffer for the products.
    """
    heads, head_dim, cells = q.shape
    scores = q.new_empty(2 * window + 1, heads, cells)
    for b in _bands(window, cells):
        queries, keys = b.slices()
        products = scratch[..., queries]
        torch.mul(q[..., queries], k[..., keys], out=products)
        torch.sum(products, dim=1, out=scores[b.index, :, queries])
    scores.mul_(1.0 / math.sqrt(head_dim))
    # Every entry not written above is out of range, hence masked here. A finite fill instead
    # of -inf: a position without any valid key (padding) gets finite weights, zeroed below.
    scores.masked_fill_(~valid, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=0)
    if query_pad is not None:
        probs.masked_fill_(query_pad, 0.0)
    return probs


def _weighted_sum(probs: Tensor, v: Tensor, window: int) -> Tensor:
    """``attended`` ``(K, d, cells)``: Σ_δ probs[δ] · v shifted by δ."""
    attended = torch.empty_like(v)
    for first, b in enumerate(_bands(window, v.shape[-1])):
        queries, keys = b.slices()
        p = probs[b.index, :, None, queries]
        if first == 0:
            torch.mul(p, v[..., keys], out=attended[..., queries])
        else:
            attended[..., queries].addcmul_(p, v[..., keys])
    return attended


def _rows_in(t: Tensor, chunk: _Chunk) -> Tensor:
    """The chunk's cells of a ``(N, L, D)`` tensor as ``(cells, D)`` (a copy if cut short)."""
    return t[chunk.r0 : chunk.r1, : chunk.length].reshape(chunk.cells, t.shape[-1])


def _write_rows(target: Tensor, chunk: _Chunk) -> Tensor:
    """Where the chunk's ``(cells, D)`` result goes: a view of ``target`` when the chunk spans
    whole rows, else a scratch tensor that :func:`_store_rows` copies in."""
    if chunk.length == target.shape[1]:
        return target[chunk.r0 : chunk.r1].view(chunk.cells, target.shape[-1])
    return target.new_empty(chunk.cells, target.shape[-1])


def _store_rows(target: Tensor, chunk: _Chunk, flat: Tensor) -> None:
    rows = target[chunk.r0 : chunk.r1]
    if chunk.length != target.shape[1]:
        rows[:, : chunk.length] = flat.view(chunk.r1 - chunk.r0, chunk.length, -1)
        rows[:, chunk.length :] = 0
    if chunk.holes is not None:
        rows[:, : chunk.length].masked_fill_(~chunk.holes[None, :, None], 0.0)


def _zero_uncovered(target: Tensor, chunks: list[_Chunk]) -> None:
    """Rows of samples without any real key belong to no chunk: their result is zero."""
    covered = torch.zeros(target.shape[0], dtype=torch.bool)
    for c in chunks:
        covered[c.r0 : c.r1] = True
    if not bool(covered.all()):
        target[(~covered).to(target.device)] = 0


class _Saved:
    """Packed per-chunk storage of q/k/v ``(3D, cells)`` and the weights ``(2ω+1, K, cells)``:
    one flat buffer, each chunk's block contiguous (a GEMM can write it directly)."""

    def __init__(self, buffer: Tensor, dim: int, heads: int, window: int):
        self.buffer = buffer
        self.qkv_rows = 3 * dim
        self.prob_shape = (2 * window + 1, heads)
        self.per_cell = 3 * dim + (2 * window + 1) * heads

    @classmethod
    def allocate(cls, x: Tensor, cells: int, heads: int, window: int) -> _Saved:
        dim = x.shape[-1]
        per_cell = 3 * dim + (2 * window + 1) * heads
        buffer = x.new_empty(per_cell * cells, dtype=_work_dtype(x.dtype))
        return cls(buffer, dim, heads, window)

    def views(self, chunk: _Chunk) -> tuple[Tensor, Tensor]:
        start, cells = self.per_cell * chunk.offset, chunk.cells
        block = self.buffer[start : start + self.per_cell * cells]
        qkv = block[: self.qkv_rows * cells].view(self.qkv_rows, cells)
        probs = block[self.qkv_rows * cells :].view(*self.prob_shape, cells)
        return qkv, probs


class _BandedAttentionFunction(torch.autograd.Function):
    """in_proj -> banded softmax attention -> out_proj, chunked over rows.

    Saved for backward: the input rows (alive anyway) and, if ``save_projections``, q/k/v and
    the attention weights (3 + (2ω+1)·K/D grids). Everything else - and q/k/v/weights when not
    saved - is recomputed chunk by chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,  # (N, L, D) rows; rows of one sample are consecutive
        key_mask: Tensor,  # (B, L) bool
        in_weight: Tensor,
        in_bias: Tensor | None,
        out_weight: Tensor,
        out_bias: Tensor | None,
        num_heads: int,
        window: int,
        chunk_elements: int,
        save_projections: bool,
    ) -> Tensor:
        num_rows, _, dim = x.shape
        head_dim = dim // num_heads
        work = _work_dtype(x.dtype)
        chunks, total = _plan_chunks(key_mask, num_rows // key_mask.shape[0], dim, chunk_elements)
        largest = max((c.cells for c in chunks), default=0)
        out = torch.empty_like(x)
        _zero_uncovered(out, chunks)
        saved = None
        if save_projections:
            saved = _Saved.allocate(x, total, num_heads, window)
            qkv_scratch = None
        else:
            qkv_scratch = x.new_empty(3 * dim * largest, dtype=work)
        products = x.new_empty(num_heads, head_dim, largest, dtype=work)
        for c in chunks:
            x_flat = _rows_in(x, c)
            if saved is not None:
                qkv, saved_probs = saved.views(c)
            else:
                qkv = qkv_scratch[: 3 * dim * c.cells].view(3 * dim, c.cells)
            _project(x_flat, in_weight, in_bias, qkv)
            q, k, v = qkv.view(3, num_heads, head_dim, c.cells).unbind(0)
            valid, query_pad = _chunk_masks(c, window, x.device)
            probs = _softmax_weights(q, k, valid, query_pad, window, products)
            if saved is not None:
                saved_probs.copy_(probs)
            flat = _weighted_sum(probs, v, window).view(dim, c.cells).t().to(x.dtype)
            y = _write_rows(out, c)
            if out_bias is None:
                torch.mm(flat, out_weight.t(), out=y)
            else:
                torch.addmm(out_bias, flat, out_weight.t(), out=y)
            _store_rows(out, c, y)
        tensors = (x, in_weight, in_bias, out_weight, out_bias)
        ctx.save_for_backward(*tensors, *([] if saved is None else [saved.buffer]))
        ctx.num_heads = num_heads
        ctx.window = window
        ctx.chunks = chunks
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, in_weight, in_bias, out_weight, out_bias, *buffer = ctx.saved_tensors
        num_heads: int = ctx.num_heads
        window: int = ctx.window
        dim = x.shape[-1]
        head_dim = dim // num_heads
        scale = 1.0 / math.sqrt(head_dim)
        work = _work_dtype(x.dtype)
        need_x, _, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:6]
        chunks: list[_Chunk] = ctx.chunks
        largest = max((c.cells for c in chunks), default=0)
        saved = _Saved(buffer[0], dim, num_heads, window) if buffer else None

        grad_x = torch.empty_like(x) if need_x else None
        if grad_x is not None:
            _zero_uncovered(grad_x, chunks)
        grad_w_in = torch.zeros_like(in_weight) if need_w_in else None
        grad_b_in = torch.zeros_like(in_bias) if (need_b_in and in_bias is not None) else None
        grad_w_out = torch.zeros_like(out_weight) if need_w_out else None
        grad_b_out = torch.zeros_like(out_bias) if (need_b_out and out_bias is not None) else None
        need_inner = grad_x is not None or grad_w_in is not None or grad_b_in is not None
        qkv_scratch = None if saved else x.new_empty(3 * dim * largest, dtype=work)
        products = x.new_empty(num_heads, head_dim, largest, dtype=work)
        grad_qkv = x.new_empty(3 * dim * largest, dtype=work) if need_inner else None

        for c in chunks:
            cells = c.cells
            x_flat = _rows_in(x, c)
            valid, query_pad = _chunk_masks(c, window, x.device)
            if saved is not None:
                qkv, probs = saved.views(c)
                q, k, v = qkv.view(3, num_heads, head_dim, cells).unbind(0)
            else:
                qkv = qkv_scratch[: 3 * dim * cells].view(3 * dim, cells)
                _project(x_flat, in_weight, in_bias, qkv)
                q, k, v = qkv.view(3, num_heads, head_dim, cells).unbind(0)
                probs = _softmax_weights(q, k, valid, query_pad, window, products)
            dy = _rows_in(grad_out, c)
            if c.holes is not None:  # padding positions were overwritten: no gradient
                dy = dy.masked_fill(query_pad[:, None], 0.0)

            if grad_w_out is not None:
                attended = _weighted_sum(probs, v, window)
                grad_w_out.addmm_(dy.t(), attended.view(dim, cells).t().to(x.dtype))
            if grad_b_out is not None:
                grad_b_out.add_(dy.sum(0))
            if not need_inner:
                continue

            # d_attended, channel-major like q/k/v: (D, cells) = W_outᵀ · dyᵀ.
            d_att = torch.mm(out_weight.t(), dy.t()).to(work).view(num_heads, head_dim, cells)
            grads = grad_qkv[: 3 * dim * cells].view(3, num_heads, head_dim, cells)
            dq, dk, dv = grads.unbind(0)
            d_probs = torch.empty_like(probs)
            bands = _bands(window, cells)
            for first, b in enumerate(bands):
                queries, keys = b.slices()
                # Entries outside the band's range are out-of-row pairs: probability 0, and
                # their d_probs must be finite (0) so that 0 · d_probs stays 0 below.
                d_probs[b.index, :, : b.lo] = 0
                d_probs[b.index, :, b.hi :] = 0
                tmp = products[..., queries]
                torch.mul(d_att[..., queries], v[..., keys], out=tmp)
                torch.sum(tmp, dim=1, out=d_probs[b.index, :, queries])
                p = probs[b.index, :, None, queries]
                if first == 0:
                    torch.mul(p, d_att[..., queries], out=dv[..., keys])
                else:
                    dv[..., keys].addcmul_(p, d_att[..., queries])
            # Softmax backward, scaled; masked neighbours have probability 0: no gradient.
            weighted = (probs * d_probs).sum(0, keepdim=True)
            d_scores = d_probs.sub_(weighted).mul_(probs).mul_(scale)
            for first, b in enumerate(bands):
                queries, keys = b.slices()
                ds = d_scores[b.index, :, None, queries]
                if first == 0:
                    torch.mul(ds, k[..., keys], out=dq[..., queries])
                    torch.mul(ds, q[..., queries], out=dk[..., keys])
                else:
                    dq[..., queries].addcmul_(ds, k[..., keys])
                    dk[..., keys].addcmul_(ds, q[..., queries])

            flat = grads.view(3 * dim, cells).to(x.dtype)
            if grad_w_in is not None:
                grad_w_in.addmm_(flat, x_flat)
            if grad_b_in is not None:
                grad_b_in.add_(flat.sum(1))
            if grad_x is not None:
                target = _write_rows(grad_x, c)
                torch.mm(flat.t(), in_weight, out=target)
                _store_rows(grad_x, c, target)

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
    save_projections: bool = True,
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

    # Nothing to keep for a backward that will not run (evaluation, torch.no_grad()).
    inputs = (grid, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in inputs
    )

    with torch.autocast(device_type=grid.device.type, enabled=False):
        out = _BandedAttentionFunction.apply(
            grid.reshape(batch * rows, length, dim).contiguous(),
            key_mask,
            cast(in_proj_weight),
            cast(in_proj_bias),
            cast(out_proj_weight),
            cast(out_proj_bias),
            num_heads,
            window,
            chunk_elements,
            save_projections and needs_grad,
        )
    return out.view(batch, rows, length, dim)


class LocalGridAttention(nn.Module):
    """Multi-head attention restricted to a window of ``±window`` cells along each grid row.

    Args:
        embed_dim: channel size D̃ of the grid; must be divisible by ``num_heads``.
        num_heads: number of heads K (paper: 10).
        window: ω, how many neighbours on each side a cell sees (paper: 3).
        chunk_elements: scratch budget (grid elements per chunk); None picks a per-device default.
        save_projections: keep q/k/v and the attention weights (3 + (2ω+1)·K/D grids) for
            backward instead of recomputing them: no second in_proj GEMM and no second
            softmax (~15-20% faster on CPU), higher peak memory. Default True; False gives
            the smallest footprint (about four grids plus one chunk of scratch).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 10,
        window: int = 3,
        *,
        chunk_elements: int | None = None,
        save_projections: bool = True,
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


def _dense_reference_masks(window: int, key_mask: Tensor, rows: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Additive band mask ``(L, L)`` and key padding mask ``(B·rows, L)`` for the dense references.

    Masked entries use a large finite negative instead of -inf so that fully masked (padding)
    positions stay finite.
    """
    batch, length = key_mask.shape
    neg = -1e9
    positions = torch.arange(length, device=key_mask.device)
    band = (positions[:, None] - positions[None, :]).abs() <= window
    attn_mask = torch.zeros(length, length, dtype=dtype, device=key_mask.device)
    attn_mask.masked_fill_(~band, neg)
    row_key_mask = key_mask[:, None, :].expand(batch, rows, length).reshape(batch * rows, length)
    padding_mask = torch.zeros(batch * rows, length, dtype=dtype, device=key_mask.device)
    padding_mask.masked_fill_(~row_key_mask, neg)
    return attn_mask, padding_mask


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
    attn_mask, padding_mask = _dense_reference_masks(module.window, key_mask, rows, grid.dtype)

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


def nn_multihead_attention_reference(
    module: LocalGridAttention, grid: Tensor, lengths: Tensor | None = None
) -> Tensor:
    """The same computation the way the published KnowFREE code runs it.

    An ``nn.MultiheadAttention(D, K, batch_first=True)`` that *shares* ``module``'s parameters
    (so gradients land in ``module``) is called the ordinary way over the ``B·L`` grid rows,
    ``attn(x, x, x, attn_mask=band, key_padding_mask=padding)``, with ``need_weights`` left at
    its default (True: it also materialises and head-averages the attention weights, so no
    fused kernel runs). O(L³) time and memory: for tests and benchmarks only. The masks are
    additive floats with a large finite negative (not -inf) so that fully masked padding
    positions stay finite; those positions are then zeroed like in the banded form.
    """
    batch, rows, length, dim = grid.shape
    key_mask = _as_key_mask(lengths, batch, length, grid.device)
    attention = nn.MultiheadAttention(
        dim, module.num_heads, batch_first=True, device=grid.device, dtype=grid.dtype
    )
    attention.in_proj_weight = module.in_proj_weight
    attention.in_proj_bias = module.in_proj_bias
    attention.out_proj.weight = module.out_proj.weight
    attention.out_proj.bias = module.out_proj.bias
    attn_mask, padding_mask = _dense_reference_masks(module.window, key_mask, rows, grid.dtype)

    x = grid.reshape(batch * rows, length, dim)
    out, _weights = attention(x, x, x, attn_mask=attn_mask, key_padding_mask=padding_mask)
    out = out.reshape(batch, rows, length, dim)
    return out.masked_fill(~key_mask[:, None, :, None], 0.0)
