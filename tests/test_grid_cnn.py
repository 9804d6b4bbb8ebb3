"""The masked grid CNN of the "w/o local attn w cnn" ablation (paper Table 3; CNN Nested NER's
grid module): its block structure, masking, depth, receptive field and a saved model's round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from knowfree_core.config import EncoderConfig, ModelConfig, TrainConfig
from knowfree_core.labels import LabelVocab
from knowfree_core.model.grid_cnn import MaskedGridCNN
from knowfree_core.model.head import KnowFreeHead, span_grid_mask
from knowfree_core.model.knowfree import KnowFreeModel
from knowfree_core.training import fit, seed_everything

from model_fixtures import make_random_encoder, tiny_corpus

CHANNELS = 6
SMALL_HEAD = dict(ffn_size=16, grid_size=16, biaffine_heads=2, window=2, attn_heads=4, dropout=0.0)


def _random_module(depth: int, kernel_size: int = 3, seed: int = 0) -> MaskedGridCNN:
    torch.manual_seed(seed)
    module = MaskedGridCNN(CHANNELS, depth=depth, kernel_size=kernel_size).double().eval()
    # Non-trivial norm affine parameters, so the test would notice a norm applied in the wrong place.
    with torch.no_grad():
        for norm in module.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return module


def _grid(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, length, CHANNELS, generator=generator, dtype=torch.float64)


def _reference(module: MaskedGridCNN, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The published block order, written out: per block conv(masked) -> + residual -> LayerNorm
    (this is the new residual) -> GELU (the next conv's input); the result is the last residual."""
    cells = (mask[:, :, None] & mask[:, None, :])[:, None]  # (B, 1, L, L)
    x = grid.permute(0, 3, 1, 2).masked_fill(~cells, 0.0)
    residual = x
    for conv, norm in zip(module.convs, module.norms):
        x = F.conv2d(x.masked_fill(~cells, 0.0), conv.weight, padding=module.kernel_size // 2)
        x = x + residual
        x = F.layer_norm(x.permute(0, 2, 3, 1), (CHANNELS,), norm.weight, norm.bias, eps=1e-6).permute(0, 3, 1, 2)
        residual = x
        x = F.gelu(x)
    return residual.permute(0, 2, 3, 1)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_blocks_follow_the_published_order(depth):
    module = _random_module(depth)
    grid = _grid(2, 7, seed=1)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out = module(grid, mask)
    assert out.shape == grid.shape
    cells = mask[:, :, None] & mask[:, None, :]
    assert torch.allclose(out[cells], _reference(module, grid, mask)[cells], atol=1e-10)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_depth_is_the_number_of_convolutions(depth):
    module = MaskedGridCNN(CHANNELS, depth=depth)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth and module.depth == depth
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert len([m for m in module.modules() if isinstance(m, nn.LayerNorm)]) == depth
    # The head and the model config pass the depth through.
    head = KnowFreeHead(12, 3, grid_mixer="cnn", cnn_depth=depth, **SMALL_HEAD)
    assert head.grid_cnn is not None and head.grid_cnn.depth == depth and head.local_attention is None
    built = KnowFreeModel._build_head(12, 3, ModelConfig(grid_mixer="cnn", cnn_depth=depth, **SMALL_HEAD))
    assert len([m for m in built.modules() if isinstance(m, nn.Conv2d)]) == depth


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="depth"):
        MaskedGridCNN(CHANNELS, depth=0)
    with pytest.raises(ValueError, match="odd"):
        MaskedGridCNN(CHANNELS, kernel_size=4)
    with pytest.raises(ValueError, match="depth"):
        KnowFreeHead(12, 3, grid_mixer="cnn", cnn_depth=0, **SMALL_HEAD)
    with pytest.raises(ValueError, match="expected grid"):
        MaskedGridCNN(CHANNELS)(torch.zeros(1, 3, 4, CHANNELS), torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("depth", [1, 3])
def test_padding_cells_do_not_change_real_cells(depth):
    # The same 5-unit sentence alone and padded to 9 units with garbage in every padding cell.
    module = _random_module(depth)
    alone = _grid(1, 5, seed=2)
    padded = _grid(1, 9, seed=3) * 100.0
    padded[:, :5, :5] = alone
    mask = torch.tensor([[True] * 5 + [False] * 4])
    expected = module(alone, torch.ones(1, 5, dtype=torch.bool))
    assert torch.allclose(module(padded, mask)[:, :5, :5], expected, atol=1e-10)


def test_head_padding_does_not_change_real_cells():
    torch.manual_seed(0)
    head = KnowFreeHead(12, 3, grid_mixer="cnn", cnn_depth=3, **SMALL_HEAD).eval()
    generator = torch.Generator().manual_seed(4)
    states = torch.randn(2, 8, 12, generator=generator)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        padded = head(states, mask)[1, :5, :5]
        alone = head(states[1:, :5], mask[1:, :5])[0]
    assert torch.allclose(padded, alone, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_receptive_field_is_depth_units(depth):
    # A change at one cell reaches every cell within `depth` steps (Chebyshev distance, 3x3
    # kernels) and nothing farther: LayerNorm and GELU act per cell.
    module = _random_module(depth, seed=depth)
    length, centre = 11, 5
    grid = _grid(1, length, seed=5)
    mask = torch.ones(1, length, dtype=torch.bool)
    changed = grid.clone()
    changed[0, centre, centre] += 3.0
    with torch.no_grad():
        diff = (module(changed, mask) - module(grid, mask)).abs().amax(dim=-1)[0]  # (L, L)
    index = torch.arange(length)
    distance = torch.maximum((index[:, None] - centre).abs(), (index[None, :] - centre).abs())
    assert module.receptive_radius == depth
    assert torch.all(diff[distance <= depth] > 1e-8), "a cell within reach did not change"
    assert torch.all(diff[distance > depth] == 0), "a cell out of reach changed"


def test_gradient_flows_to_every_parameter_and_not_from_padding():
    torch.manual_seed(0)
    head = KnowFreeHead(12, 3, grid_mixer="cnn", cnn_depth=2, **SMALL_HEAD)
    generator = torch.Generator().manual_seed(6)
    states = torch.randn(2, 6, 12, generator=generator, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    cells = span_grid_mask(mask)
    loss = head(states, mask)[cells].sum()
    loss.backward()
    assert torch.isfinite(states.grad).all() and states.grad[mask].abs().sum() > 0
    assert torch.all(states.grad[~mask] == 0), "padding units received a gradient"
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient for {name}"
    # On the module alone: padding cells of its input get no gradient (zeroed before reading).
    module = _random_module(2)
    grid = _grid(1, 6, seed=7).requires_grad_(True)
    module_mask = torch.tensor([[True] * 4 + [False] * 2])
    module(grid, module_mask)[:, :4, :4].sum().backward()
    real = (module_mask[:, :, None] & module_mask[:, None, :])
    assert torch.all(grid.grad[~real] == 0) and grid.grad[real].abs().sum() > 0


# ---------------------------------------------------------------- the whole model


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return make_random_encoder(tmp_path_factory.mktemp("encoder"))


def _cnn_model(encoder_dir, train, cnn_depth: int) -> KnowFreeModel:
    seed_everything(11)
    return KnowFreeModel.build(
        EncoderConfig(name=str(encoder_dir), unit_mode="char"),
        ModelConfig(ffn_size=40, grid_size=40, biaffine_heads=2, attn_heads=4, dropout=0.0,
                    grid_mixer="cnn", cnn_depth=cnn_depth),
        LabelVocab.from_sentences(train),
    )


def test_saved_cnn_model_predicts_the_same(encoder_dir, tmp_path):
    train = tiny_corpus(16, seed=1)
    dev = tiny_corpus(8, seed=2, prefix="d", with_extensions=False)
    model = _cnn_model(encoder_dir, train, cnn_depth=2)
    config = TrainConfig(epochs=6, batch_size=8, encoder_lr=1e-3, head_lr=3e-3, warmup_ratio=0.0,
                         weight_decay=0.0, seed=11)
    fit(model, train, None, config, progress=False)  # weights away from their initialisation
    before_logits = model.target_logits(dev)
    before = model.predict(dev)
    assert any(before), "nothing predicted: the comparison below would be empty"

    saved = model.save_pretrained(tmp_path / "model")
    assert json.loads((saved / "knowfree.json").read_text(encoding="utf-8"))["model"]["cnn_depth"] == 2
    loaded = KnowFreeModel.from_pretrained(saved)
    assert loaded.config.grid_mixer == "cnn" and loaded.head.grid_cnn.depth == 2
    assert loaded.predict(dev) == before
    for got, expected in zip(loaded.target_logits(dev), before_logits):
        assert torch.allclose(got, expected, atol=1e-5)


def test_manifest_without_cnn_depth_loads_with_the_default(encoder_dir, tmp_path):
    # A model saved before model.cnn_depth existed: its knowfree.json has no such key.
    train = tiny_corpus(8, seed=3)
    saved = _cnn_model(encoder_dir, train, cnn_depth=3).save_pretrained(tmp_path / "model")
    manifest_path = saved / "knowfree.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    del manifest["model"]["cnn_depth"]
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    assert KnowFreeModel.from_pretrained(saved).head.grid_cnn.depth == ModelConfig().cnn_depth == 3
