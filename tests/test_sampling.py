"""Seeded many-shot subsets and greedy k-shot selection."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from knowfree_core.formats import read_dataset
from knowfree_core.records import Sentence, Span
from knowfree_core.sampling import greedy_k_shot, many_shot_subsets, select_k_shot, write_subsets

WEIBO_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "weibo" / "dev.conll"


def _pool(n: int = 120) -> list[Sentence]:
    # Deterministic synthetic pool: labels of different frequency, some sentences without spans.
    labels = ["PER", "PER", "LOC", "ORG", None, "PER", "GPE", None]
    pool = []
    for i in range(n):
        label = labels[i % len(labels)]
        spans = [Span(0, 2, label)] if label else []
        if i % 11 == 0 and label:
            spans.append(Span(3, 4, "LOC"))
        pool.append(Sentence(f"s{i}", list("张三在北京"), spans))
    return pool


def test_many_shot_subsets_nest_and_are_seeded():
    pool = _pool()
    subsets = many_shot_subsets(pool, sizes=(10, 50, 100), seed=3)
    assert sorted(subsets) == [10, 50, 100]
    assert [len(subsets[n]) for n in (10, 50, 100)] == [10, 50, 100]
    assert subsets[50][:10] == subsets[10] and subsets[100][:50] == subsets[50]
    assert len({s.id for s in subsets[100]}) == 100
    again = many_shot_subsets(pool, sizes=(10, 50, 100), seed=3)
    assert [s.id for s in again[100]] == [s.id for s in subsets[100]]
    other = many_shot_subsets(pool, sizes=(100,), seed=4)
    assert [s.id for s in other[100]] != [s.id for s in subsets[100]]
    # A single size gives the same prefix as asking for several.
    assert many_shot_subsets(pool, sizes=(50,), seed=3)[50] == subsets[50]


def test_many_shot_size_too_large():
    with pytest.raises(ValueError, match="exceeds the 120 sentences"):
        many_shot_subsets(_pool(), sizes=(100, 500), seed=0)


def test_k_shot_reaches_k_and_is_deterministic():
    pool = _pool()
    selection = select_k_shot(pool, 5, seed=1)
    counts = Counter(s.label for x in selection.sentences for s in x.spans)
    assert set(counts) == {"PER", "LOC", "ORG", "GPE"}
    assert all(n >= 5 for n in counts.values()) and selection.unreachable == {}
    assert all(x.spans for x in selection.sentences)
    assert [s.id for s in greedy_k_shot(pool, 5, seed=1)] == [s.id for s in selection.sentences]
    assert [s.id for s in greedy_k_shot(pool, 5, seed=2)] != [s.id for s in selection.sentences]


def test_k_shot_every_selected_sentence_was_needed():
    pool = _pool()
    chosen = greedy_k_shot(pool, 3, seed=7)
    counts: Counter[str] = Counter()
    for sentence in chosen:
        labels = {s.label for s in sentence.spans}
        assert any(counts[label] < 3 for label in labels)
        counts.update(s.label for s in sentence.spans)


def test_k_shot_reports_unreachable_labels():
    pool = _pool()
    pool.append(Sentence("rare", list("北京"), [Span(0, 2, "RARE")]))
    selection = select_k_shot(pool, 5, seed=0)
    assert selection.unreachable == {"RARE": 1}
    assert any(s.id == "rare" for s in selection.sentences)


def test_k_shot_label_restriction():
    chosen = greedy_k_shot(_pool(), 2, seed=0, labels=["GPE"])
    assert all(any(s.label == "GPE" for s in x.spans) for x in chosen) and len(chosen) == 2


def test_k_shot_on_weibo_dev():
    if not WEIBO_DEV.exists():
        pytest.skip("shared Weibo data not present")
    selection = select_k_shot(read_dataset(WEIBO_DEV), 5, seed=0)
    assert selection.unreachable == {"GPE.NOM": 1}  # one mention in the whole dev file
    assert len(selection.label_counts) == 8
    assert all(n >= 5 for label, n in selection.label_counts.items() if label != "GPE.NOM")


def test_write_subsets(tmp_path):
    pool = _pool()
    subsets = many_shot_subsets(pool, sizes=(10, 20), seed=5)
    manifest_path = write_subsets(subsets, tmp_path / "subsets", seed=5, extra={"source": "pool"})
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    assert manifest["seed"] == 5 and manifest["source"] == "pool"
    assert manifest["sizes"] == {"10": 10, "20": 20}
    assert manifest["subsets"]["10"]["sentence_ids"] == [s.id for s in subsets[10]]
    assert sum(manifest["subsets"]["20"]["label_counts"].values()) == sum(len(s.spans) for s in subsets[20])
    assert read_dataset(tmp_path / "subsets" / manifest["subsets"]["10"]["file"]) == subsets[10]
