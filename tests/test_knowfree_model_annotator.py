"""A saved KnowFREE model as an annotator (``get_annotator("knowfree", model=dir)``): its
predictions become ``ENT-<corpus>.<type>`` extension spans of source ``<corpus>:ent``."""

from __future__ import annotations

import json

import pytest

from knowfree_core.annotation import AnnotatorSpec, BatchAnnotator
from knowfree_core.annotators import apply_annotations, get_annotator
from knowfree_core.annotators.alignment import REASON_TOO_LONG
from knowfree_core.config import TrainConfig
from knowfree_core.errors import ConfigError, KnowFreeError
from knowfree_core.labels import LabelVocab
from knowfree_core.records import Sentence
from knowfree_core.training import fit

from model_fixtures import build_tiny_model, make_random_encoder, tiny_corpus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model of the templated PER/LOC corpus, trained until it predicts entities, saved."""
    root = tmp_path_factory.mktemp("knowfree_annotator")
    train = tiny_corpus(24, seed=1, with_extensions=False)
    model = build_tiny_model(make_random_encoder(root / "encoder"), train)
    fit(model, train, None, TrainConfig(epochs=6, batch_size=8, encoder_lr=1e-3, head_lr=3e-3, warmup_ratio=0.0,
                                        seed=13), progress=False)
    return model.save_pretrained(root / "model")


@pytest.fixture(scope="module")
def saved_model(model_dir):
    from knowfree_core.model.knowfree import KnowFreeModel

    return KnowFreeModel.from_pretrained(model_dir)


def _sentences() -> list[Sentence]:
    return tiny_corpus(10, seed=7, prefix="q", with_extensions=False) + [Sentence("empty", [])]


def test_spans_are_the_models_predictions_with_prefixed_labels(model_dir, saved_model):
    sentences = _sentences()
    annotator = get_annotator("knowfree", model=str(model_dir), corpus="msra", batch_size=3)
    assert annotator._model is None  # loaded on the first annotate call, not when built
    results = annotator.annotate(sentences, ("ent",))

    expected = saved_model.predict(sentences)
    assert sum(map(len, expected)) > 0, "the tiny model should predict some entities"
    assert [r.sentence_id for r in results] == [s.id for s in sentences]
    for result, spans in zip(results, expected):
        assert [(s.start, s.end, s.label) for s in result.spans] == [(s.start, s.end, f"ENT-msra.{s.label}")
                                                                      for s in spans]
        assert {s.source for s in result.spans} <= {"msra:ent"} and result.sources == ("msra:ent",)
        assert result.rejections == []
    # the empty sentence: a result with no spans, not an error
    assert results[-1].spans == [] and results[-1].sentence_id == "empty"

    # the labels are extension labels of the entity view, apart from the target labels
    annotated = apply_annotations(sentences, results)
    vocab = LabelVocab.from_sentences(annotated)
    assert set(vocab.extensions) <= {"ENT-msra.PER", "ENT-msra.LOC"} and vocab.extensions
    assert not set(vocab.extensions) & set(vocab.targets)


def test_threshold_and_label_prefix_options(model_dir, saved_model):
    sentences = _sentences()
    low = get_annotator("knowfree", model=str(model_dir), corpus="tiny", label_prefix="ENT-", threshold=0.05)
    expected = saved_model.decode(saved_model.target_logits(sentences), threshold=0.05)
    results = low.annotate(sentences)  # the default steps: ent, its only one
    assert [[(s.start, s.end, s.label) for s in r.spans] for r in results] == [
        [(s.start, s.end, f"ENT-{s.label}") for s in spans] for spans in expected
    ]
    assert all(span.source == "tiny:ent" for r in results for span in r.spans)
    with pytest.raises(ConfigError, match="label_prefix"):
        get_annotator("knowfree", model=str(model_dir), label_prefix="MSRA-")
    with pytest.raises(ConfigError, match="threshold"):
        get_annotator("knowfree", model=str(model_dir), threshold=1.5)
    with pytest.raises(ConfigError, match="'model'"):
        get_annotator("knowfree")


def test_only_the_ent_step(model_dir):
    annotator = get_annotator("knowfree", model=str(model_dir))
    assert annotator.supported_steps == ("ent",)
    with pytest.raises(ValueError, match="supported: \\['ent'\\]"):
        annotator.annotate(_sentences()[:1], ("ent", "seg"))


def test_over_long_sentences_are_counted_rejections(model_dir):
    annotator = get_annotator("knowfree", model=str(model_dir), corpus="msra", max_units=8)
    short, long = Sentence("short", list("张三去了北京。")), Sentence("long", list("张三在北京工作。" * 3))
    results = annotator.annotate([short, long], ("ent",))
    assert results[0].rejections == []
    assert results[1].spans == [] and [(r.reason, r.step) for r in results[1].rejections] == [(REASON_TOO_LONG, "ent")]


def test_missing_model_folder_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    annotator = get_annotator("knowfree", model=str(missing))  # cheap: nothing is loaded yet
    with pytest.raises(KnowFreeError, match=str(missing)):
        annotator.check_access()
    with pytest.raises(KnowFreeError, match=str(missing)):
        annotator.annotate([Sentence("a", list("张三"))], ("ent",))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(KnowFreeError, match="no knowfree.json"):
        get_annotator("knowfree", model=str(tmp_path / "not-a-model")).check_access()


def test_in_a_batch_annotator_next_to_an_offline_tool(model_dir, tmp_path):
    """What a jobs.annotate actor runs for ``annotators: [jieba, knowfree]``: both in turn on
    one batch, each with its own steps and sources."""
    sentences = _sentences()[:4]
    rows = [{"id": s.id, "order": i, "record": json.dumps(s.to_dict(), ensure_ascii=False)}
            for i, s in enumerate(sentences)]
    batch = BatchAnnotator([
        AnnotatorSpec(name="jieba", steps=("seg",)),
        AnnotatorSpec(name="knowfree", steps=("ent",), options={"model": str(model_dir), "corpus": "msra"}),
    ])
    out = batch(rows)
    assert [row["annotator"] for row in out] == ["jieba+knowfree"] * 4
    sources = {span["source"] for row in out for span in json.loads(row["record"])["extension_spans"]}
    assert sources == {"jieba:seg", "msra:ent"}
