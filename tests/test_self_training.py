"""The self-training rule (variant FU): which predicted sentences become pseudo samples."""

from __future__ import annotations

import pytest

from knowfree_core.errors import ConfigError
from knowfree_core.self_training import PseudoLabelRule, select_pseudo_labeled


def row(i: int, text: str, *scores: float) -> dict:
    return {"id": f"u:{i}", "text": text,
            "spans": [{"start": k, "end": k + 1, "label": "PER", "score": s} for k, s in enumerate(scores)]}


ROWS = [
    row(0, "张三来了", 0.95, 0.99),   # confident
    row(1, "李四走了", 0.95, 0.6),    # one doubtful span: dropped whole
    row(2, "天气很好"),               # empty
    row(3, "王五在家", 0.92),         # confident
    row(4, "下雨了"),                 # empty
    row(5, "今天周一"),               # empty
    row(6, "赵六笑了", 0.3),          # uncertain
]


def test_keeps_sentences_whose_every_span_is_confident_and_some_empty_ones():
    selection = select_pseudo_labeled(ROWS, PseudoLabelRule(min_score=0.9, empty_ratio=0.5, seed=1))
    ids = [s.id.removesuffix("#pseudo") for s in selection.samples]
    assert "u:0" in ids and "u:3" in ids
    assert "u:1" not in ids and "u:6" not in ids  # a doubtful span drops the whole sentence
    empties = [s for s in selection.samples if not s.spans]
    assert len(empties) == 1  # 0.5 per confident sentence, 2 confident
    assert all(s.pseudo_labeled for s in selection.samples)
    assert ids == sorted(ids, key=lambda i: int(i.split(":")[1]))  # the pool's order
    assert selection.counts["dropped_uncertain"] == 2
    assert selection.counts["empty_dropped"] == 2
    assert selection.labels == {"PER": 3}
    confident = next(s for s in selection.samples if s.id == "u:0#pseudo")
    assert [(s.start, s.end, s.label) for s in confident.spans] == [(0, 1, "PER"), (1, 2, "PER")]


def test_same_seed_same_selection_and_gold_sentences_excluded():
    rule = PseudoLabelRule(min_score=0.9, empty_ratio=1.0, seed=7)
    first = [s.id for s in select_pseudo_labeled(ROWS, rule).samples]
    assert all(i.endswith("#pseudo") for i in first)
    assert first == [s.id for s in select_pseudo_labeled(ROWS, rule).samples]
    selection = select_pseudo_labeled(ROWS, rule, exclude_texts=["张三来了"])
    assert "u:0#pseudo" not in [s.id for s in selection.samples]
    assert selection.counts["excluded_gold"] == 1


def test_max_sentences_caps_the_total_with_empty_ones_in_proportion():
    rows = [row(i, f"句子{i}", 0.99) for i in range(20)] + [row(100 + i, f"空{i}") for i in range(20)]
    selection = select_pseudo_labeled(rows, PseudoLabelRule(empty_ratio=0.25, max_sentences=10))
    with_spans = [s for s in selection.samples if s.spans]
    assert len(selection.samples) == 10
    assert len(with_spans) == 8 and len(selection.samples) - len(with_spans) == 2


def test_rule_ranges_are_checked():
    with pytest.raises(ConfigError, match="min_score"):
        PseudoLabelRule(min_score=1.5)
    with pytest.raises(ConfigError, match="empty_ratio"):
        PseudoLabelRule(empty_ratio=-1)


def test_a_span_outside_its_sentence_is_refused():
    with pytest.raises(ValueError, match="outside"):
        select_pseudo_labeled([row(0, "短", 0.99, 0.99)], PseudoLabelRule())


def test_partial_rule_keeps_doubtful_sentences_with_their_doubtful_spans_left_out():
    """With doubt_score, a doubtful span no longer drops its sentence: spans >= tau are the
    labels, spans in [doubt_score, tau) become uncertain_spans (left out of the loss), spans
    under doubt_score are taught as "no entity", and a sentence without a span >= tau is empty."""
    rows = [*ROWS, row(7, "钱七到了", 0.02)]  # under the doubt score: an ordinary empty sentence
    rule = PseudoLabelRule(min_score=0.9, empty_ratio=5.0, doubt_score=0.1, seed=1)
    selection = select_pseudo_labeled(rows, rule)
    by_id = {s.id.removesuffix("#pseudo"): s for s in selection.samples}
    assert "dropped_uncertain" not in selection.counts
    assert selection.counts["confident"] == 3  # u:0, u:1 (one sure span), u:3
    kept_doubtful = by_id["u:1"]
    assert [(s.start, s.label) for s in kept_doubtful.spans] == [(0, "PER")]
    assert [(s.start, s.end) for s in kept_doubtful.uncertain_spans] == [(1, 2)]
    only_doubtful = by_id["u:6"]  # counted as empty, its doubtful span left out
    assert not only_doubtful.spans and [(s.start, s.end) for s in only_doubtful.uncertain_spans] == [(0, 1)]
    assert not by_id["u:7"].spans and not by_id["u:7"].uncertain_spans
    assert selection.counts["uncertain_spans"] == 2
    # the uncertain spans survive the file round trip the pipeline makes
    from knowfree_core.records import Sentence
    again = Sentence.from_dict(kept_doubtful.to_dict())
    assert again.uncertain_spans == kept_doubtful.uncertain_spans and again.pseudo_labeled
    assert "uncertain_spans" not in by_id["u:0"].to_dict()  # written only when there are some


def test_doubt_score_must_lie_below_tau():
    with pytest.raises(ConfigError, match="doubt_score"):
        PseudoLabelRule(min_score=0.8, doubt_score=0.8)
    with pytest.raises(ConfigError, match="doubt_score"):
        PseudoLabelRule(doubt_score=-0.1)
