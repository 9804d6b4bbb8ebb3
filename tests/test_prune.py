"""Vocabulary pruning keeps the encoder's outputs for the corpus it was pruned to."""

from __future__ import annotations

import json

import torch

from knowfree_core.encoders.prune import prune_encoder
from knowfree_core.encoders.unit_encoder import UnitEncoder

from model_fixtures import make_random_encoder

CORPUS = [list("张三在北京工作。"), list("李四去了上海")]


def test_pruned_encoder_gives_the_same_unit_vectors(tmp_path):
    source = make_random_encoder(tmp_path / "full")
    pruned = prune_encoder(source, CORPUS, tmp_path / "pruned", dtype=torch.float32)
    report = json.loads((pruned / "pruning.json").read_text())
    assert report["pieces_after"] < report["pieces_before"]

    full, small = UnitEncoder(str(source)), UnitEncoder(str(pruned))
    full.eval(), small.eval()
    with torch.no_grad():
        expected, got = full(CORPUS), small(CORPUS)
    assert torch.equal(expected.mask, got.mask)
    assert torch.allclose(expected.hidden, got.hidden, atol=1e-6)
    embeddings = small.transformer.get_input_embeddings().weight
    assert embeddings.shape[0] == report["pieces_after"]


def test_fp16_pruned_copy_loads_as_float32(tmp_path):
    source = make_random_encoder(tmp_path / "full")
    pruned = prune_encoder(source, CORPUS, tmp_path / "pruned")  # fp16 on disk
    encoder = UnitEncoder(str(pruned))
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
