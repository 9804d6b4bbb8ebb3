"""Seeded train → save → load → predict round trips of the whole model (flair-style base class)."""

from __future__ import annotations

import math

import pytest
import torch

from knowfree_core.config import EncoderConfig, ModelConfig, TrainConfig
from knowfree_core.labels import LabelVocab
from knowfree_core.model.knowfree import KnowFreeModel
from knowfree_core.records import Sentence
from knowfree_core.training import evaluate, fit, seed_everything, tune_threshold

from model_fixtures import make_random_encoder, tiny_corpus


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return make_random_encoder(tmp_path_factory.mktemp("encoder"))


class ModelRoundTripBase:
    """Subclasses choose the model variant; the round-trip contract is the same for all."""

    model_overrides: dict = {}
    use_extensions = True

    def build(self, encoder_dir, train: list[Sentence]) -> KnowFreeModel:
        seed_everything(13)
        vocab = LabelVocab.from_sentences(train, include_extensions=self.use_extensions)
        encoder_config = EncoderConfig(name=str(encoder_dir), unit_mode="char")
        model_config = ModelConfig(ffn_size=40, grid_size=40, biaffine_heads=2, attn_heads=4,
                                   dropout=0.0, **self.model_overrides)
        return KnowFreeModel.build(encoder_config, model_config, vocab)

    def train_config(self, epochs: int = 25) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=8, encoder_lr=1e-3, head_lr=3e-3, warmup_ratio=0.0,
                           weight_decay=0.0, seed=13)

    def test_learns_saves_loads_and_predicts_identically(self, encoder_dir, tmp_path):
        train = tiny_corpus(48, seed=1, with_extensions=self.use_extensions)
        dev = tiny_corpus(16, seed=2, prefix="d", with_extensions=False)
        model = self.build(encoder_dir, train)
        result = fit(model, train, dev, self.train_config(), progress=False)

        scores = evaluate(model, dev)
        assert scores.f1 > 0.8, f"the model did not learn the templated corpus: {scores.f1:.3f}"
        # The model handed back is the best-dev epoch's, not the last one's.
        assert math.isclose(scores.f1, result.best_dev_f1, abs_tol=1e-9)

        # A threshold chosen on dev is never worse on dev than the default 0.5, and sticks.
        chosen, by_threshold = tune_threshold(model, dev, [0.3, 0.5, 0.7])
        assert by_threshold[chosen] >= by_threshold[0.5] and model.config.threshold == chosen

        before = model.predict(dev)
        saved = model.save_pretrained(tmp_path / "model")
        loaded = KnowFreeModel.from_pretrained(saved)
        assert loaded.predict(dev) == before
        assert loaded.vocab.targets == model.vocab.targets
        assert loaded.config.threshold == chosen
        # Extension columns are never predicted: no external knowledge at inference.
        predicted_labels = {span.label for spans in before for span in spans}
        assert predicted_labels <= set(model.vocab.targets)

    def test_training_is_reproducible_with_a_seed(self, encoder_dir):
        train = tiny_corpus(16, seed=3, with_extensions=self.use_extensions)
        losses = []
        for _ in range(2):
            model = self.build(encoder_dir, train)
            result = fit(model, train, None, self.train_config(epochs=2), progress=False)
            losses.append([r.train_loss for r in result.history])
        assert losses[0] == losses[1]


class TestKnowFreeWithExtensions(ModelRoundTripBase):
    pass


class TestKnowFreeWithoutExtensions(ModelRoundTripBase):
    use_extensions = False


class TestBiaffineBaseline(ModelRoundTripBase):
    use_extensions = False
    model_overrides = {"use_local_attention": False}


class TestNestedDecoding(ModelRoundTripBase):
    model_overrides = {"decode": "nested"}


def test_extension_columns_get_alpha_and_synthetic_samples_get_beta(encoder_dir):
    train = tiny_corpus(8, seed=4)
    vocab = LabelVocab.from_sentences(train, include_extensions=True)
    model = KnowFreeModel.build(
        EncoderConfig(name=str(encoder_dir), unit_mode="char"),
        ModelConfig(ffn_size=40, grid_size=40, biaffine_heads=2, attn_heads=4, dropout=0.0, beta=0.0),
        vocab,
    )
    # alpha_i = 0.5 * mean target count / C_i
    mean_target = sum(vocab.target_counts.values()) / len(vocab.target_counts)
    for label in vocab.extensions:
        expected = 0.5 * mean_target / vocab.extension_counts[label]
        assert model.label_weights[vocab.id(label)].item() == pytest.approx(expected)
    assert torch.all(model.label_weights[: vocab.num_targets] == 1)
    # model.alpha_max caps every alpha_i and leaves the target columns at 1.
    uncapped_ext = model.label_weights[vocab.num_targets:]
    cap = float(uncapped_ext.min()) * 0.5
    capped = KnowFreeModel.build(
        EncoderConfig(name=str(encoder_dir), unit_mode="char"),
        ModelConfig(ffn_size=40, grid_size=40, biaffine_heads=2, attn_heads=4, alpha_max=cap),
        vocab,
    )
    assert (uncapped_ext > cap).any()  # the cap has something to do
    assert torch.allclose(capped.label_weights[vocab.num_targets:], uncapped_ext.clamp(max=cap))
    assert torch.all(capped.label_weights[: vocab.num_targets] == 1)
    # model.alpha_scheme=view with the pos view switched off: every SEG/POS column by its view.
    by_view = KnowFreeModel.build(
        EncoderConfig(name=str(encoder_dir), unit_mode="char"),
        ModelConfig(ffn_size=40, grid_size=40, biaffine_heads=2, attn_heads=4, alpha_scheme="view",
                    alpha_scale=1.0, view_weights={"ent": 1.0, "seg": 1.0, "pos": 0.0}),
        vocab,
    )
    total_target = sum(vocab.target_counts.values())
    assert by_view.label_weights[vocab.id("POS-n")].item() == 0.0
    assert by_view.label_weights[vocab.id("SEG")].item() == pytest.approx(total_target / vocab.extension_counts["SEG"])

    # beta = 0: a synthetic sample contributes nothing to the loss.
    real = train[:2]
    synthetic = [Sentence(s.id + "-syn", s.units, s.spans, s.extension_spans, synthetic=True) for s in train[2:4]]
    model.eval()
    with torch.no_grad():
        only_real = model.loss(real)
        mixed = model.loss(real + synthetic)
    # The loss is the batch mean of per-sample sums, so beta=0 samples add nothing but the count.
    assert mixed.item() == pytest.approx(only_real.item() * len(real) / len(real + synthetic), rel=1e-5)
    model.config.beta = 1.0
    with torch.no_grad():
        as_real = model.loss(real + [Sentence(s.id, s.units, s.spans, s.extension_spans) for s in synthetic])
        weighted = model.loss(real + synthetic)
    assert weighted.item() == pytest.approx(as_real.item(), rel=1e-5)

    # Pseudo-labelled samples (self-training) have their own weight, beta_unlabeled: 0 removes
    # them as beta = 0 removes synthetic ones, whatever beta is.
    pseudo = [Sentence(s.id + "-pseudo", s.units, s.spans, s.extension_spans, pseudo_labeled=True)
              for s in train[2:4]]
    model.config.beta_unlabeled = 0.0
    with torch.no_grad():
        mixed = model.loss(real + pseudo)
    assert mixed.item() == pytest.approx(only_real.item() * len(real) / len(real + pseudo), rel=1e-5)
    model.config.beta_unlabeled = 2.0
    with torch.no_grad():
        doubled = model.loss(real + pseudo)
        as_gold = model.loss(real + [Sentence(s.id, s.units, s.spans, s.extension_spans) for s in pseudo])
    assert doubled.item() > as_gold.item()
    assert Sentence.from_dict(pseudo[0].to_dict()).pseudo_labeled
    assert "pseudo_labeled" not in real[0].to_dict()  # gold files are written as before


def test_linear_alpha_schedule_fades_extension_weights_as_training_advances(encoder_dir):
    from knowfree_core.config import TrainConfig
    from knowfree_core.training import fit

    train = tiny_corpus(8, seed=4)
    vocab = LabelVocab.from_sentences(train, include_extensions=True)
    model = KnowFreeModel.build(
        EncoderConfig(name=str(encoder_dir), unit_mode="char"),
        ModelConfig(ffn_size=40, grid_size=40, biaffine_heads=2, attn_heads=4, alpha_schedule="linear"),
        vocab,
    )
    full = model.label_weights.clone()
    targets = vocab.num_targets
    assert torch.equal(model.current_label_weights(), full)  # progress 0: the full alphas
    model.training_progress = 0.75
    halfway = model.current_label_weights()
    assert torch.equal(halfway[:targets], full[:targets])  # targets always weigh 1
    assert torch.allclose(halfway[targets:], 0.25 * full[targets:])
    # fit sets the progress from its step count before every step: 2 epochs x 2 batches.
    seen = []
    original = model.loss
    model.loss = lambda batch: (seen.append(model.training_progress), original(batch))[1]
    fit(model, train, None, TrainConfig(epochs=2, batch_size=4, seed=1, device="cpu"), progress=False)
    assert seen == [0.0, 0.25, 0.5, 0.75]
