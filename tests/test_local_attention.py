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
    nn_multihead_attention_reference,
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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny; on a shared 2-core machine each multi-threaded op can wait
    # milliseconds for the second thread (0.8 s vs 0.05 s per case), so run single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make(
    case,
    dtype: torch.dtype,
    seed: int = 0,
    chunk_elements: int | None = 50,
    save_projections: bool = True,
):
    batch, length, dim, heads, window, lengths = case
    torch.manual_seed(seed)
    # A tiny chunk budget forces several chunks, so chunk boundaries are tested too.
    module = LocalGridAttention(
        dim, heads, window, chunk_elements=chunk_elements, save_projections=save_projections
    ).to(dtype)
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


# save_projections=True is the default (all cases); the recomputing backward gets the padded ones.
@pytest.mark.parametrize(
    "case,save_projections",
    [(case, True) for case in CASES] + [(CASES[1], False), (CASES[3], False)],
)
def test_banded_gradients_match_dense_reference(case, save_projections):
    # float64: weight gradients sum over B·L² cells, so float32 rounding alone can exceed 1e-5.
    module, grid, lens = _make(case, torch.float64, save_projections=save_projections)
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


def _output_and_grads(module, grid, projection, form):
    """Output of ``form`` on a fresh copy of ``grid`` and the gradients of a fixed projection of it."""
    x = grid.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = form(x)
    (out * projection).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_banded_matches_nn_multihead_attention_called_with_default_need_weights(dtype):
    # The published reference form: nn.MultiheadAttention(D, K, batch_first=True) called as
    # attn(x, x, x, attn_mask=band, key_padding_mask=pad), need_weights left at True.
    case = (3, 9, 20, 10, 3, [9, 6, 0])  # paper's K and ω, a padded and an empty sample
    module, grid, lens = _make(case, dtype)
    projection = torch.randn(grid.shape, dtype=dtype)
    results = [_output_and_grads(module, grid, projection, lambda x: module(x, lens)),
               _output_and_grads(module, grid, projection, lambda x: nn_multihead_attention_reference(module, x, lens))]
    (banded_out, *banded_grads), (mha_out, *mha_grads) = results
    assert torch.isfinite(mha_out).all()
    assert torch.allclose(banded_out, mha_out, atol=1e-5, rtol=0)
    if dtype == torch.float64:  # weight gradients sum over B·L² cells: compare in float64
        for got, want in zip(banded_grads, mha_grads):
            assert got is not None and want is not None
            assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_nn_multihead_attention_reference_is_the_stock_module_call(monkeypatch):
    # The helper must go through nn.MultiheadAttention.forward with need_weights at its default.
    calls = []
    original = nn.MultiheadAttention.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.MultiheadAttention, "forward", spy)
    module, grid, lens = _make(CASES[1], torch.float32)
    with torch.no_grad():
        out = nn_multihead_attention_reference(module, grid, lens)
    assert len(calls) == 1 and "need_weights" not in calls[0]
    assert {"attn_mask", "key_padding_mask"} <= set(calls[0])
    assert out.shape == grid.shape


def test_mask_with_holes_matches_dense_reference():
    # A bool key mask with padding *inside* the sentence (not just a length prefix).
    module, grid, _ = _make((3, 8, 12, 3, 2, None), torch.float64)
    mask = torch.tensor(
        [
            [True, False, True, True, False, True, False, False],
            [True] * 8,
            [False, False, True, False, False, False, False, False],
        ]
    )
    projection = torch.randn(grid.shape, dtype=torch.float64)
    results = [_output_and_grads(module, grid, projection, lambda x: module(x, mask)),
               _output_and_grads(module, grid, projection, lambda x: dense_local_attention_reference(module, x, mask))]
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert (results[0][0][~mask[:, None, :].expand(3, 8, 8)] == 0).all()


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


@pytest.mark.parametrize("save_projections", [True, False])
def test_padding_gives_zeros_not_nan(save_projections):
    case = (3, 6, 8, 2, 2, [6, 2, 0])
    module, grid, lens = _make(case, torch.float32, save_projections=save_projections)
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


def test_default_keeps_projections_for_backward():
    assert LocalGridAttention(12, 3, 2).save_projections is True


@pytest.mark.parametrize("save_projections", [True, False])
def test_partial_gradients_match_dense_reference(save_projections):
    # Only the grid, or only the parameters, require gradients: each path of backward alone.
    module, grid, lens = _make(CASES[3], torch.float64, save_projections=save_projections)
    for frozen in (True, False):
        module.requires_grad_(not frozen)
        grads = []
        for form in (module, lambda x, n: dense_local_attention_reference(module, x, n)):
            module.zero_grad(set_to_none=True)
            x = grid.clone().requires_grad_(frozen)
            form(x, lens).pow(2).sum().backward()
            grads.append([x.grad] if frozen else [p.grad for p in module.parameters()])
        for got, want in zip(*grads):
            assert torch.allclose(got, want, atol=1e-5, rtol=0)
    module.requires_grad_(True)


def test_bfloat16_grid_runs_in_float32_arithmetic():
    module, grid, lens = _make(CASES[5], torch.float32)
    with torch.no_grad():
        want = module(grid, lens)
        got = module.to(torch.bfloat16)(grid.to(torch.bfloat16), lens)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, atol=0.1, rtol=0.05)


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


@pytest.mark.parametrize("save_projections", [True, False])
def test_autograd_keeps_no_per_offset_copies(save_projections):
    # Sum the sizes of every tensor autograd saves during the forward: the banded form may keep
    # the input grid (already alive), small things and - with save_projections - q/k/v plus
    # the (2ω+1)·K weights per cell; never (2ω+1) copies of k/v.
    case = (2, 16, 20, 4, 3, [16, 12])
    module, grid, lens = _make(
        case, torch.float32, chunk_elements=None, save_projections=save_projections
    )
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    x = grid.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x, lens)
    params = sum(p.numel() for p in module.parameters())
    cells = grid.numel() // 20
    projections = cells * (3 * 20 + (2 * 3 + 1) * 4) if save_projections else 0
    assert sum(saved) <= grid.numel() + params + 2 * 16 + projections


@pytest.mark.parametrize("dim,heads", [(10, 3), (7, 2)])
def test_indivisible_heads_raise(dim, heads):
    with pytest.raises(ValueError, match="divisible"):
        LocalGridAttention(dim, heads, 3)


def test_negative_window_raises():
    with pytest.raises(ValueError, match="window"):
        LocalGridAttention(8, 2, -1)
