"""The offline e5 encoder really learns Weibo NER (slow: real encoder, real training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowfree_core.config import load_config
from knowfree_core.run import run_training

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "weibo_sample"


@pytest.mark.slow
def test_offline_e5_span_model_learns_weibo_entities(tmp_path):
    # The bundled 150-sentence sample, six encoder layers and the e5 recipe: dev F1 leaves zero
    # within a few epochs (token classification on this encoder stays at 0 for 8 epochs).
    config = load_config(None, [
        f"data.train={SAMPLE / 'train.conll'}",
        f"data.dev={SAMPLE / 'dev.conll'}",
        "encoder.name=offline-e5",
        "encoder.layers=6",
        "model.max_span_length=16",
        "model.use_extension_labels=false",
        "train.epochs=6",
        "train.encoder_lr=1e-4",
        f"output_dir={tmp_path / 'run'}",
    ])
    summary = run_training(config, progress=False)
    assert summary.metrics["dev"]["f1"] > 0.0
    assert summary.metrics["dev"]["predicted"] > 0
