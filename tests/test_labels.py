"""LabelVocab: target ids first, extension ids after, deterministic and persistent."""

from __future__ import annotations

import pytest

from knowfree_core.errors import UnknownLabelError
from knowfree_core.labels import LabelVocab
from knowfree_core.records import ExtensionSpan, Sentence, Span


def _sentences() -> list[Sentence]:
    return [
        Sentence(
            "a",
            list("张三在北京"),
            [Span(0, 2, "PER"), Span(3, 5, "LOC")],
            [ExtensionSpan(0, 2, "SEG", "jieba:seg"), ExtensionSpan(3, 5, "POS-ns", "lac:pos")],
        ),
        Sentence(
            "b",
            list("李四"),
            [Span(0, 2, "PER")],
            [ExtensionSpan(0, 2, "SEG", "jieba:seg"), ExtensionSpan(0, 2, "SEG", "lac:seg"),
             ExtensionSpan(0, 1, "POS-nr", "lac:pos")],
        ),
    ]


def test_targets_first_then_extensions_sorted():
    vocab = LabelVocab.from_sentences(_sentences())
    assert vocab.targets == ["LOC", "PER"]
    assert vocab.extensions == ["POS-nr", "POS-ns", "SEG"]
    assert vocab.num_targets == 2 and vocab.num_extensions == 3 and len(vocab) == 5
    assert [vocab.id(label) for label in vocab.labels] == list(range(5))
    assert vocab.label(vocab.id("SEG")) == "SEG"
    assert vocab.is_target(vocab.id("PER")) and not vocab.is_target(vocab.id("SEG"))
    assert vocab.target_counts == {"LOC": 1, "PER": 2}
    assert vocab.extension_counts == {"POS-nr": 1, "POS-ns": 1, "SEG": 3}


def test_order_does_not_depend_on_input_order():
    assert LabelVocab.from_sentences(_sentences()) == LabelVocab.from_sentences(_sentences()[::-1])


def test_min_count_and_exclusion_of_extensions():
    vocab = LabelVocab.from_sentences(_sentences(), min_count=2)
    assert vocab.extensions == ["SEG"] and vocab.targets == ["LOC", "PER"]
    assert LabelVocab.from_sentences(_sentences(), include_extensions=False).num_extensions == 0
    only_lac = LabelVocab.from_sentences(_sentences(), extension_sources=["lac:"])
    assert only_lac.extension_counts == {"POS-nr": 1, "POS-ns": 1, "SEG": 1}


def test_extension_spelled_like_a_target_is_not_duplicated():
    sentence = Sentence("a", list("张三"), [Span(0, 2, "PER")], [ExtensionSpan(0, 2, "PER", "llm:ent")])
    vocab = LabelVocab.from_sentences([sentence])
    assert vocab.targets == ["PER"] and vocab.extensions == []


def test_unknown_label_error_lists_known_labels():
    vocab = LabelVocab.from_sentences(_sentences())
    with pytest.raises(UnknownLabelError, match=r"'ORG'.*LOC, PER"):
        vocab.id("ORG")
    with pytest.raises(UnknownLabelError):
        vocab.label(99)
    many = LabelVocab([f"L{i:03d}" for i in range(50)])
    with pytest.raises(UnknownLabelError, match=r"30 more"):
        many.id("nope")


def test_duplicate_labels_rejected():
    with pytest.raises(ValueError, match="twice"):
        LabelVocab(["A", "B"], ["B"])


def test_save_load_round_trip(tmp_path):
    vocab = LabelVocab.from_sentences(_sentences())
    path = tmp_path / "vocab" / "labels.json"
    vocab.save(path)
    loaded = LabelVocab.load(path)
    assert loaded == vocab
    assert loaded.id("SEG") == vocab.id("SEG")
    assert LabelVocab.from_dict(vocab.to_dict()).extension_counts == vocab.extension_counts
