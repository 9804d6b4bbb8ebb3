"""KnowFREE head, biaffine grid, span targets and the weighted span loss."""

from __future__ import annotations

import math

import pytest
import torch

from knowfree_core.model.biaffine import BiaffineSpanEncoder, MultiHeadBiaffine
from knowfree_core.model.head import KnowFreeHead, prior_logit, span_grid_mask
from knowfree_core.model.loss import (
    extension_label_weights,
    label_weight_vector,
    span_bce_loss,
    synthetic_sample_weights,
)
from knowfree_core.model.targets import build_span_targets
from knowfree_core.records import ExtensionSpan, Sentence, Span

SMALL = dict(ffn_size=16, grid_size=16, biaffine_heads=2, window=2, attn_heads=4, dropout=0.0)


def _inputs(batch: int = 2, length: int = 6, hidden: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, hidden, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, length - 2 :] = False
    return states, mask


# ---------------------------------------------------------------- biaffine and head


def test_biaffine_grid_shape_and_scale():
    torch.manual_seed(0)
    encoder = BiaffineSpanEncoder(64)  # paper sizes D' = D̃ = 200
    with torch.no_grad():
        grid = encoder(torch.randn(2, 10, 64))
    assert grid.shape == (2, 10, 10, 200)
    assert 0.3 < float(grid.std()) < 3.0  # O(1) at initialisation


def test_biaffine_cell_is_bilinear_in_start_and_end():
    torch.manual_seed(0)
    layer = MultiHeadBiaffine(4, 6, num_heads=2).double()
    start, end = torch.randn(1, 3, 4).double(), torch.randn(1, 3, 4).double()
    grid = layer(start, end)
    # Cell (i, j), head t, channel o = [s_i,t; 1]^T U_t[:, :, o] [e_j,t; 1].
    s = torch.cat([start[0, 1, 2:], torch.ones(1).double()])
    e = torch.cat([end[0, 2, 2:], torch.ones(1).double()])
    expected = torch.einsum("x,xyo,y->o", s, layer.weight[1], e)
    assert torch.allclose(grid[0, 1, 2, 3:], expected)


def test_biaffine_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadBiaffine(10, 12, num_heads=4)


def test_head_output_shape_and_bias_init():
    torch.manual_seed(0)
    head = KnowFreeHead(12, num_labels=5, output_prior=0.02, **SMALL)
    states, mask = _inputs()
    logits = head(states, mask)
    assert logits.shape == (2, 6, 6, 5)
    assert torch.allclose(head.classifier.bias, torch.full((5,), math.log(0.02 / 0.98)))
    assert prior_logit(0.01) == pytest.approx(-math.log(99.0))


def test_head_without_local_attention_is_plain_biaffine():
    states, mask = _inputs()
    torch.manual_seed(0)
    full = KnowFreeHead(12, 3, **SMALL)
    torch.manual_seed(0)
    plain = KnowFreeHead(12, 3, use_local_attention=False, **SMALL)
    plain.load_state_dict(full.state_dict(), strict=False)  # same biaffine and classifier
    assert plain.local_attention is None and full.local_attention is not None
    with torch.no_grad():
        grid = full.biaffine(states)
        assert torch.allclose(plain(states, mask), plain.classifier(grid))
        assert not torch.allclose(full(states, mask), plain(states, mask))
        fused = grid + full.norm(grid + full.local_attention(grid, mask))
        assert torch.allclose(full(states, mask), full.classifier(fused), atol=1e-6)


def test_span_grid_mask():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    cells = span_grid_mask(mask)
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    for i in range(3):
        for j in range(i, 3):
            expected[0, i, j] = True
    assert torch.equal(cells, expected)
    short = span_grid_mask(mask, max_span_length=2)
    assert short[0, 0, 1] and not short[0, 0, 2] and short[0, 2, 2]


# ---------------------------------------------------------------- targets


def _sentence(units: int, spans=(), extension_spans=()) -> Sentence:
    return Sentence("s", ["x"] * units, list(spans), list(extension_spans))


def test_build_span_targets_columns_and_counts():
    vocab = {"PER": 0, "LOC": 1, "n": 2, "llm:PER": 3}  # targets first, then extension labels
    samples = [
        _sentence(
            4,
            [Span(0, 2, "PER"), Span(1, 3, "ORG"), Span(3, 9, "LOC"), Span(0, 2, "PER")],
            [ExtensionSpan(0, 2, "llm:PER", "llm"), ExtensionSpan(2, 3, "LOC", "llm")],
        ),
        _sentence(4, [Span(0, 1, "LOC")], [ExtensionSpan(1, 2, "v")]),
    ]
    built = build_span_targets(samples, 4, vocab, num_target_labels=2, num_labels=4)
    t = built.targets
    assert t.shape == (2, 4, 4, 4)
    assert t[0, 0, 1, 0] == 1 and t[0, 0, 1, 3] == 1  # target PER and extension llm:PER
    assert t[1, 0, 0, 1] == 1
    assert t.sum() == 3
    assert built.unknown_labels == {"ORG": 1, "v": 1}
    assert built.misplaced_labels == {"LOC": 1}  # an extension span never becomes a target
    assert built.dropped_out_of_range == 1  # LOC 3..9 does not fit L = 4
    assert built.duplicates == 1
    no_ext = build_span_targets(samples, 4, vocab.get, 2, 4, include_extensions=False)
    assert no_ext.targets[..., 2:].sum() == 0 and no_ext.targets.sum() == 2


def test_build_span_targets_accepts_raising_lookup():
    def lookup(label: str) -> int:
        return {"A": 0}[label]  # KeyError for anything else

    built = build_span_targets([_sentence(3, [Span(0, 1, "A"), Span(1, 2, "B")])], 3, lookup, 1, 1)
    assert built.targets.sum() == 1 and built.unknown_labels == {"B": 1}


def test_build_span_targets_drops_long_and_respects_lengths():
    samples = [_sentence(5, [Span(0, 3, "A"), Span(2, 3, "A")]), _sentence(5, [Span(0, 3, "A")])]
    built = build_span_targets(samples, 5, {"A": 0}, 1, 1, lengths=[2, 5], max_span_length=2)
    assert built.targets.sum() == 0
    assert built.dropped_out_of_range == 2  # sample 0 was truncated to 2 units
    assert built.dropped_too_long == 1


def test_build_span_targets_rejects_bad_mapping():
    with pytest.raises(ValueError, match="outside"):
        build_span_targets([_sentence(3, [Span(0, 1, "A")])], 3, {"A": 1}, 1, 1)


# ---------------------------------------------------------------- loss


def test_extension_weights_formula_and_fixed():
    alphas = extension_label_weights([10, 30], [5, 40, 0])  # Ĉ = 20
    assert torch.allclose(alphas, torch.tensor([0.5 * 20 / 5, 0.5 * 20 / 40, 0.0]))
    alphas = extension_label_weights({"PER": 4}, {"n": 8, "v": 2}, scale=1.0)
    assert torch.allclose(alphas, torch.tensor([0.5, 2.0]))
    uniform = extension_label_weights([10, 30], [5, 40, 0], scale=0.3, scheme="uniform")
    assert torch.allclose(uniform, torch.tensor([0.3, 0.3, 0.0]))  # a label without spans learns nothing
    capped = extension_label_weights([10, 30], [5, 40, 0], max_weight=1.0)  # uncapped: 2.0, 0.25, 0
    assert torch.allclose(capped, torch.tensor([1.0, 0.25, 0.0]))
    with pytest.raises(ValueError, match="max extension weight"):
        extension_label_weights([10, 30], [5], max_weight=0.0)
    assert torch.equal(label_weight_vector(2, [0.5, 0.25]), torch.tensor([1.0, 1.0, 0.5, 0.25]))


def test_view_scheme_gives_every_view_the_same_share_of_the_target_mass():
    targets = [100, 50]  # T = 150 target spans
    ext = [30, 10, 600, 200, 200]  # ent: 40 spans, seg: 600, pos: 400
    views = ["ent", "ent", "seg", "pos", "pos"]
    alphas = extension_label_weights(targets, ext, scale=0.5, scheme="view", views=views)
    # Within a view every label weighs the same, rare or not (eq. 15 would give ENT-10 3x ENT-30).
    assert alphas[0] == alphas[1] and alphas[3] == alphas[4]
    for view in ("ent", "seg", "pos"):
        mass = sum(float(a) * c for a, c, v in zip(alphas, ext, views) if v == view)
        assert mass == pytest.approx(0.5 * 150)  # each view: scale x the target positives


def test_view_weights_switch_views_off_and_the_cap_applies_last():
    views = ["ent", "seg", "pos"]
    alphas = extension_label_weights([40], [10, 100, 20], scale=1.0, scheme="eq15", views=views,
                                     view_weights={"pos": 0.0, "seg": 2.0})
    assert torch.allclose(alphas, torch.tensor([4.0, 0.8, 0.0]))
    capped = extension_label_weights([40], [10, 100, 20], scale=1.0, scheme="eq15", views=views,
                                     view_weights={"seg": 2.0}, max_weight=1.0)
    assert torch.allclose(capped, torch.tensor([1.0, 0.8, 1.0]))
    with pytest.raises(ValueError, match="views"):
        extension_label_weights([40], [10, 100], scheme="view")  # no views given
    with pytest.raises(ValueError, match="scheme"):
        extension_label_weights([40], [10], scheme="inverse", views=["ent"])


def _loss_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 5, 4, generator=generator)
    targets = (torch.rand(3, 5, 5, 4, generator=generator) < 0.2).float()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    return logits, targets, span_grid_mask(mask)


def test_loss_ignores_invalid_cells():
    logits, targets, cells = _loss_batch()
    base = span_bce_loss(logits, targets, cells)
    noisy = logits.clone()
    noisy[~cells] = torch.tensor([1e4, -1e4, float("nan"), float("inf")])
    noisy_targets = targets.clone()
    noisy_targets[~cells] = 1.0
    x = noisy.requires_grad_(True)
    loss = span_bce_loss(x, noisy_targets, cells)
    assert torch.allclose(loss, base)
    loss.backward()
    assert (x.grad[~cells] == 0).all() and torch.isfinite(x.grad).all()


def test_loss_matches_manual_bce_and_label_weights():
    logits, targets, cells = _loss_batch()
    weights = torch.tensor([1.0, 1.0, 0.5, 2.0])
    p = torch.sigmoid(logits)
    manual = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)) * weights
    manual = (manual * cells[..., None]).sum() / 3
    assert torch.allclose(span_bce_loss(logits, targets, cells, weights), manual, atol=1e-5)
    per_cell = span_bce_loss(logits, targets, cells, weights, normalize="cell")
    assert torch.allclose(per_cell, manual * 3 / cells.sum(), atol=1e-6)


def test_beta_scales_only_synthetic_samples():
    logits, targets, cells = _loss_batch()
    per_sample = [
        span_bce_loss(logits[i : i + 1], targets[i : i + 1], cells[i : i + 1]) for i in range(3)
    ]
    flags = [False, True, False]
    got = span_bce_loss(logits, targets, cells, synthetic=flags, beta=0.4)
    assert torch.allclose(got, (per_sample[0] + 0.4 * per_sample[1] + per_sample[2]) / 3)
    weights = synthetic_sample_weights(flags, 0.4)
    assert torch.equal(weights, torch.tensor([1.0, 0.4, 1.0]))
    assert torch.allclose(span_bce_loss(logits, targets, cells, None, weights), got)
    with pytest.raises(ValueError, match="not both"):
        span_bce_loss(logits, targets, cells, None, weights, synthetic=flags)
    unflagged = span_bce_loss(logits, targets, cells, synthetic=[False] * 3, beta=0.4)
    assert torch.allclose(unflagged, span_bce_loss(logits, targets, cells))


def test_unknown_cells_leave_only_their_target_columns_out_of_the_loss():
    """Partial annotation: a pseudo sample's doubtful cell teaches neither "entity" nor "no
    entity" for the targets (zero loss and gradient there), while its extension columns and
    every other cell count as before."""
    logits, targets, cells = _loss_batch()
    unknown = torch.zeros_like(cells)
    unknown[0, 0, 1] = True
    assert cells[0, 0, 1]
    x = logits.clone().requires_grad_(True)
    loss = span_bce_loss(x, targets, cells, unknown_cells=unknown, num_target_labels=2)
    loss.backward()
    assert (x.grad[0, 0, 1, :2] == 0).all() and (x.grad[0, 0, 1, 2:] != 0).all()
    kept = cells[..., None].expand_as(logits).clone()
    kept[0, 0, 1, :2] = False
    p = torch.sigmoid(logits)
    manual = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
    assert torch.allclose(loss, (manual * kept).sum() / 3, atol=1e-5)
    assert torch.allclose(span_bce_loss(logits, targets, cells, unknown_cells=torch.zeros_like(cells),
                                        num_target_labels=2), span_bce_loss(logits, targets, cells))
    with pytest.raises(ValueError, match="num_target_labels"):
        span_bce_loss(logits, targets, cells, unknown_cells=unknown)


def test_uncertain_spans_become_unknown_cells_of_their_sample_only():
    from knowfree_core.model.targets import uncertain_cells

    plain = Sentence("a", list("张三来了"), [Span(0, 2, "PER")])
    doubtful = Sentence("b", list("李四走了"), uncertain_spans=[Span(0, 2, "PER"), Span(3, 9, "PER")])
    assert uncertain_cells([plain, plain], 4) is None  # ordinary batches pay nothing
    cells = uncertain_cells([plain, doubtful], 4)
    assert cells.shape == (2, 4, 4) and cells.sum() == 1 and cells[1, 0, 1]  # the span past the grid is skipped


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("use_local_attention,grid_mixer", [(True, "attention"), (False, "attention"), (True, "cnn")])
def test_head_overfits_tiny_batch(use_local_attention, grid_mixer):
    torch.manual_seed(0)
    head = KnowFreeHead(12, 3, use_local_attention=use_local_attention, grid_mixer=grid_mixer, **SMALL)
    states, mask = _inputs(seed=1)
    cells = span_grid_mask(mask)
    generator = torch.Generator().manual_seed(2)
    targets = ((torch.rand(2, 6, 6, 3, generator=generator) < 0.1) & cells[..., None]).float()
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        optimiser.zero_grad()
        loss = span_bce_loss(head(states, mask), targets, cells)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]


@pytest.mark.parametrize("use_attention", [True, False])
def test_band_form_equals_the_full_grid_on_spans_up_to_the_limit(use_attention):
    # max_span_length computes only the cells short spans need; on those spans the logits must
    # be the full grid's, for padded samples and rows near both ends of the sentence.
    from knowfree_core.model.head import KnowFreeHead, span_grid_mask

    torch.manual_seed(0)
    common = dict(hidden_size=12, num_labels=5, ffn_size=8, grid_size=8, biaffine_heads=2, window=2,
                  attn_heads=2, use_local_attention=use_attention, dropout=0.0)
    full = KnowFreeHead(**common)
    band = KnowFreeHead(**common, max_span_length=3)
    band.load_state_dict(full.state_dict())
    hidden = torch.randn(2, 11, 12, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    cells = span_grid_mask(mask, 3)
    expected = full(hidden, mask)[cells]
    got_all = band(hidden, mask)
    assert torch.allclose(got_all[cells], expected, atol=1e-5)
    outside = span_grid_mask(torch.ones_like(mask)) & ~span_grid_mask(torch.ones_like(mask), 3)
    assert torch.all(got_all[outside] < -1e3)
    # Gradients flow to the same parameters with the same values.
    full_grad = torch.autograd.grad(expected.sum(), hidden)[0]
    band_grad = torch.autograd.grad(got_all[cells].sum(), hidden)[0]
    assert torch.allclose(full_grad, band_grad, atol=1e-4)


def test_cnn_grid_mixer_ignores_padding_and_learns():
    """Table 3's "w/o local attn w cnn": a convolution replaces the local attention; padded
    units change nothing in the real cells (test_head_overfits_tiny_batch shows it learns)."""
    torch.manual_seed(0)
    head = KnowFreeHead(12, 3, grid_mixer="cnn", max_span_length=2, **SMALL).eval()
    assert head.local_attention is None and head.grid_cnn is not None
    states, mask = _inputs(length=6)
    with torch.no_grad():
        padded = head(states, mask)[1, :4, :4]
        alone = head(states[1:, :4], mask[1:, :4])[0]
    assert torch.allclose(padded, alone, atol=1e-5)
    with pytest.raises(ValueError, match="grid_mixer"):
        KnowFreeHead(12, 3, grid_mixer="lstm", **SMALL)
