"""Banded local grid attention against the dense nn.MultiheadAttention reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from knowfree_core.model.local_attention import (
    LocalGridAttention,
    banded_local_attention,
    dense_local_attention_reference,
    lengths_to_mask,
)

# (batch, L, D, heads, window, lengths or None). Covers padding, an all-padding sample,
# L < 2ω+1, ω = 0 and a window wider than the sentence.
CASES = [
    (2, 7, 12, 3, 3, None),
    (3, 9, 12, 4, 2, [9, 5, 1]),
    (2, 4, 8, 2, 3, [4, 2]),  # L < 2ω+1
    (2, 3, 6, 3, 5, [3, 0]),  # window > L and a fully padded sample
    (1, 6, 10, 5, 0, [4]),  # ω = 0: each cell attends only to itself
    (2, 11, 20, 10, 3, [11, 8]),  # paper's K = 10, ω = 3 at toy scale
]


def _make(case, dtype: torch.dtype, seed: int = 0, chunk_elements: int | None = 50):
    batch, length, dim, heads, window, lengths = case
    torch.manual_seed(seed)
    # A tiny chunk budget forces several chunks, so chunk boundaries are tested too.
    module = LocalGridAttention(dim, heads, window, chunk_elements=chunk_elements).to(dtype)
    # Non-zero biases so that their gradients and the padding zeroing are actually tested.
    with torch.no_grad():
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    grid = torch.randn(batch, length, length, dim, dtype=dtype)
    lens = torch.tensor(lengths if lengths is not None else [length] * batch)
    return module, grid, lens


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_banded_output_matches_dense_reference(case, dtype):
    module, grid, lens = _make(case, dtype)
    with torch.no_grad():
        banded = module(grid, lens)
        dense = dense_local_attention_reference(module, grid, lens)
    assert banded.shape == grid.shape
    assert torch.allclose(banded, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_banded_gradients_match_dense_reference(case):
    # float64: weight gradients sum over B·L² cells, so float32 rounding alone can exceed 1e-5.
    module, grid, lens = _make(case, torch.float64)
    projection = torch.randn(grid.shape, dtype=torch.float64)  # a generic upstream gradient

    def grads(fn):
        x = grid.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        (fn(x) * projection).sum().backward()
        return [x.grad] + [p.grad for p in module.parameters()]

    banded = grads(lambda x: module(x, lens))
    dense = grads(lambda x: dense_local_attention_reference(module, x, lens))
    for got, want in zip(banded, dense):
        assert got is not None and want is not None
        assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_float32_input_gradient_matches_dense_reference():
    module, grid, lens = _make(CASES[1], torch.float32)
    outs = []
    forms = (lambda x: module(x, lens), lambda x: dense_local_attention_reference(module, x, lens))
    for fn in forms:
        x = grid.clone().requires_grad_(True)
        fn(x).pow(2).sum().backward()
        outs.append(x.grad)
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=0)


def test_gradcheck_tiny():
    # Finite differences through every input of the custom autograd function.
    module, grid, lens = _make((2, 3, 4, 2, 1, [3, 2]), torch.float64, chunk_elements=None)
    mask = lengths_to_mask(lens, 3)
    inputs = [grid, module.in_proj_weight, module.in_proj_bias, module.out_proj.weight,
              module.out_proj.bias]
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]

    def fn(g, w_in, b_in, w_out, b_out):
        return banded_local_attention(g, mask, w_in, b_in, w_out, b_out, 2, 1, 12)

    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)


def test_padding_gives_zeros_not_nan():
    module, grid, lens = _make((3, 6, 8, 2, 2, [6, 2, 0]), torch.float32)
    x = grid.requires_grad_(True)
    out = module(x, lens)
    assert torch.isfinite(out).all()
    mask = lengths_to_mask(lens, 6)
    # Every padding column of every row is exactly zero; the empty sample is all zero.
    assert (out[~mask[:, None, :].expand(3, 6, 6)] == 0).all()
    assert (out[2] == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    assert (x.grad[2] == 0).all()  # nothing of the empty sample influences the output


def test_bool_mask_and_lengths_agree():
    module, grid, lens = _make(CASES[1], torch.float32)
    with torch.no_grad():
        a = module(grid, lens)
        b = module(grid, lengths_to_mask(lens, grid.shape[1]))
    assert torch.equal(a, b)


def test_chunking_does_not_change_the_result():
    case = CASES[5]
    module, grid, lens = _make(case, torch.float64, chunk_elements=1)
    with torch.no_grad():
        one_row = module(grid, lens)
        module.chunk_elements = 1 << 30
        one_chunk = module(grid, lens)
    assert torch.allclose(one_row, one_chunk, atol=1e-12, rtol=0)


def test_saved_projections_give_the_same_gradients():
    module, grid, lens = _make(CASES[1], torch.float64)
    results = []
    for save in (False, True):
        module.save_projections = save
        module.zero_grad(set_to_none=True)
        x = grid.clone().requires_grad_(True)
        out = module(x, lens)
        out.pow(2).sum().backward()
        results.append([out, x.grad, *(p.grad for p in module.parameters())])
    for recomputed, saved in zip(*results):
        assert torch.allclose(recomputed, saved, atol=1e-12, rtol=0)


def test_outside_window_has_no_influence():
    # Perturbing a cell farther than ω away in the same row must not change a cell's output.
    module, grid, _ = _make((1, 10, 8, 2, 2, None), torch.float64)
    with torch.no_grad():
        base = module(grid)
        moved = grid.clone()
        moved[0, 3, 9] += 5.0  # row 3, column 9: only columns 7..9 of row 3 can see it
        out = module(moved)
    changed = (out - base).abs().sum(-1) > 0
    expected = torch.zeros(1, 10, 10, dtype=torch.bool)
    expected[0, 3, 7:10] = True
    assert torch.equal(changed, expected)


def test_parameters_load_into_nn_multihead_attention():
    module = LocalGridAttention(12, 3, 2)
    reference = nn.MultiheadAttention(12, 3)
    reference.load_state_dict(module.state_dict())  # strict: same names and shapes


def test_autograd_keeps_no_per_offset_copies():
    # Sum the sizes of every tensor autograd saves during the forward: the banded form may keep
    # the input grid (already alive) and small things, never (2ω+1) copies of k/v.
    module, grid, lens = _make((2, 16, 20, 4, 3, [16, 12]), torch.float32, chunk_elements=None)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    x = grid.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x, lens)
    params = sum(p.numel() for p in module.parameters())
    assert sum(saved) <= grid.numel() + params + 2 * 16 * 16


@pytest.mark.parametrize("dim,heads", [(10, 3), (7, 2)])
def test_indivisible_heads_raise(dim, heads):
    with pytest.raises(ValueError, match="divisible"):
        LocalGridAttention(dim, heads, 3)


def test_negative_window_raises():
    with pytest.raises(ValueError, match="window"):
        LocalGridAttention(8, 2, -1)
