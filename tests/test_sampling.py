"""Seeded many-shot subsets and greedy k-shot selection."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from knowfree_core.formats import read_dataset
from knowfree_core.records import Sentence, Span
from knowfree_core.sampling import greedy_k_shot, many_shot_subsets, select_k_shot, write_subsets

WEIBO_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "weibo" / "dev.conll"
WEIBO_TRAIN = WEIBO_DEV.with_name("train.conll")


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


def _skewed_pool(n: int = 300, seed: int = 0) -> list[Sentence]:
    """Sentences with 0-4 mentions of skewed labels (one label mentioned many times in a
    sentence, a rare label reachable for k=5 but not k=10): the cases where a greedy sampler
    with a cap or a per-k draw would stop nesting."""
    rng = random.Random(seed)
    labels, weights = ["A", "B", "C", "D", "RARE"], [50, 20, 8, 4, 0]
    pool = []
    for i in range(n):
        count = rng.choice([0, 1, 1, 2, 4])
        spans = [Span(j, j + 1, rng.choices(labels, weights)[0]) for j in range(count)]
        pool.append(Sentence(f"p{i}", ["x"] * 4, spans))
    for i in range(7):  # 7 mentions in all: k=5 reachable, k=10 not
        pool[rng.randrange(n)].spans.append(Span(3, 4, "RARE"))
    return pool


def _assert_nested(smaller: list[Sentence], larger: list[Sentence], where: str) -> None:
    small_ids, large_ids = [s.id for s in smaller], [s.id for s in larger]
    missing = set(small_ids) - set(large_ids)
    assert not missing, f"{where}: {len(missing)} sentence(s) of the smaller k are not in the larger: {sorted(missing)[:5]}"
    # Both walk the same seeded order, so the smaller set is a subsequence in that order too.
    position = {sid: i for i, sid in enumerate(large_ids)}
    assert [position[sid] for sid in small_ids] == sorted(position[sid] for sid in small_ids), where


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 42])
def test_k_shot_sets_nest_across_k_on_a_synthetic_pool(seed):
    # The paper: "each larger subset included all samples from the smaller ones".
    pool = _skewed_pool()
    ks = [1, 2, 5, 10, 20]
    selections = {k: select_k_shot(pool, k, seed=seed) for k in ks}
    for small, large in zip(ks, ks[1:]):
        _assert_nested(selections[small].sentences, selections[large].sentences, f"seed {seed}, k={small} in k={large}")
    # Nesting does not cost the k-shot guarantee: every label reaches min(k, available).
    available = Counter(s.label for x in pool for s in x.spans)
    for k, selection in selections.items():
        assert all(selection.label_counts.get(label, 0) >= min(k, n) for label, n in available.items()), k
    assert "RARE" not in selections[5].unreachable and selections[10].unreachable == {"RARE": 7}
    # A label restriction nests as well.
    restricted = [greedy_k_shot(pool, k, seed, labels=["C", "D"]) for k in (3, 6)]
    _assert_nested(restricted[0], restricted[1], f"seed {seed}, labels C/D")


@pytest.mark.parametrize("seed", [0, 1, 7, 42])
def test_k_shot_sets_nest_on_weibo_train(seed):
    if not WEIBO_TRAIN.exists():
        pytest.skip("shared Weibo data not present")
    pool = read_dataset(WEIBO_TRAIN)
    assert len({s.id for s in pool}) == len(pool)  # ids identify sentences
    five, ten = select_k_shot(pool, 5, seed=seed), select_k_shot(pool, 10, seed=seed)
    _assert_nested(five.sentences, ten.sentences, f"Weibo train, seed {seed}")
    assert len(ten.sentences) > len(five.sentences)
    # GPE.NOM has 8 mentions in the file: reachable for k=5, all of them for k=10.
    assert five.unreachable == {} and ten.unreachable == {"GPE.NOM": 8}
    assert all(n >= 5 for n in five.label_counts.values())
    assert all(n >= min(10, 8 if label == "GPE.NOM" else 10) for label, n in ten.label_counts.items())


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
