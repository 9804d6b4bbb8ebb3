"""knowfree_core.prediction: batched, scored span prediction, in input order, with long
sentences labelled through overlapping windows whose spans are merged."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from knowfree_core.decoding import SpanCandidate
from knowfree_core.errors import ConfigError
from knowfree_core.prediction import (
    PredictSettings, merge_window_candidates, predict_sentences, sentence_windows, window_limit,
)
from knowfree_core.records import Sentence

from model_fixtures import save_trained_tiny_model, tiny_corpus


@pytest.fixture(scope="module")
def model():
    import tempfile
    from pathlib import Path

    from knowfree_core.model.knowfree import KnowFreeModel

    with tempfile.TemporaryDirectory() as root:
        return KnowFreeModel.from_pretrained(save_trained_tiny_model(Path(root)))


class RunModel:
    """A stand-in for KnowFreeModel that labels every maximal run of ``A`` units in what it
    is shown as a ``RUN`` span, as a real model would: a run cut by the window's edge is
    labelled as far as the window reaches. The score rises toward the window's edges: the worst
    case for a merge that went by scores alone."""

    def __init__(self, window: int):
        self.vocab = SimpleNamespace(targets=["RUN"])
        self.config = SimpleNamespace(threshold=0.5, max_span_length=None, decode="flat")
        self.encoder = SimpleNamespace(unit_tokenizer=SimpleNamespace(window=window))
        self.shown: list[int] = []  # the lengths of the windows it was given

    def iter_target_logits(self, units, batch_size, progress=False):
        for index, piece in enumerate(units):
            self.shown.append(len(piece))
            n = len(piece)
            logits = torch.full((n, n, 1), -10.0)
            for start, end in runs(piece):
                logits[start, end - 1, 0] = 2.0 + abs((start + end) / 2 - n / 2) / n
            yield index, logits


def runs(units) -> list[tuple[int, int]]:
    text = "".join(units)
    found, start = [], None
    for i, unit in enumerate(text + "x"):
        if unit == "A" and start is None:
            start = i
        elif unit != "A" and start is not None:
            found.append((start, i))
            start = None
    return found


def test_a_sentence_three_windows_long_gets_every_span_once_and_whole():
    rng = random.Random(3)
    # runs of 1..4 units everywhere, so that window edges cut some of them
    text = "".join(rng.choice(["x", "xx", "xxx"]) + "A" * rng.randint(1, 4) for _ in range(12))
    model = RunModel(window=10)
    assert len(text) >= 3 * window_limit(model)
    [prediction] = predict_sentences(model, [Sentence("long", list(text))])
    windows = sentence_windows(len(text), 10)
    assert prediction.windows == len(windows) >= 5 and set(model.shown) == {10}
    cut = [(s, e) for s, e in runs(text) for ws, we in windows if s < ws < e or s < we < e]
    assert cut, "no run crosses a window edge: the test would not test the merge"
    assert [(s.start, s.end) for s in prediction.spans] == runs(text)
    assert {s.text for s in prediction.spans} <= {"A" * k for k in range(1, 5)}


def test_equal_spans_from_overlapping_windows_appear_once_with_the_higher_score():
    windows = [(0, 10), (5, 15)]
    same = [SpanCandidate(6, 8, 0, 0.7)], [SpanCandidate(6, 8, 0, 0.9)]
    for nested in (False, True):
        assert merge_window_candidates(windows, same, 15, nested) == [SpanCandidate(6, 8, 0, 0.9)]
    # windows that disagree on the label: the more confident one's, as a grid cell keeps its best
    both = [SpanCandidate(6, 8, 0, 0.7)], [SpanCandidate(6, 8, 1, 0.8)]
    for nested in (False, True):
        assert merge_window_candidates(windows, both, 15, nested) == [SpanCandidate(6, 8, 1, 0.8)]


def test_a_span_at_a_cut_edge_is_taken_from_the_window_that_sees_it_whole():
    windows = [(0, 10), (5, 15)]
    # window 2 starts inside 3..7 and sees 5..7, confidently; window 1 sees all of it
    cut = [SpanCandidate(3, 7, 0, 0.6)], [SpanCandidate(5, 7, 0, 0.99)]
    assert merge_window_candidates(windows, cut, 15) == [SpanCandidate(3, 7, 0, 0.6)]
    # a span no window sees away from its edges (longer than the overlap) is still kept
    long = [SpanCandidate(2, 10, 0, 0.8)], []
    assert merge_window_candidates(windows, long, 15) == [SpanCandidate(2, 10, 0, 0.8)]
    # the sentence's own ends are no cut
    ends = [SpanCandidate(0, 2, 0, 0.8)], [SpanCandidate(13, 15, 0, 0.8)]
    assert merge_window_candidates(windows, ends, 15) == [SpanCandidate(0, 2, 0, 0.8), SpanCandidate(13, 15, 0, 0.8)]


def test_short_sentences_are_the_models_own_decoding_with_scores_in_input_order(model):
    # lengths 0..30 shuffled: the length buckets reorder them inside the call
    sentences = tiny_corpus(12, seed=5, prefix="q", with_extensions=False)
    sentences += [Sentence("empty", []), Sentence("pair", sentences[0].units + sentences[1].units)]
    random.Random(1).shuffle(sentences)
    predictions = predict_sentences(model, sentences, batch_size=3)
    expected = model.predict(sentences)
    assert sum(map(len, expected)) > 0
    assert [[(s.start, s.end, s.label) for s in p.spans] for p in predictions] == [
        [(s.start, s.end, s.label) for s in spans] for spans in expected]
    assert [p.windows for p in predictions] == [0 if s.id == "empty" else 1 for s in sentences]
    for sentence, prediction in zip(sentences, predictions):
        logits = model.target_logits([sentence])[0]
        for span in prediction.spans:
            assert span.text == sentence.text[span.start : span.end]
            assert span.score == pytest.approx(torch.sigmoid(logits[span.start, span.end - 1]).max().item())
    # one by one, unpadded: the same, up to float rounding
    alone = [predict_sentences(model, [s], batch_size=1)[0] for s in sentences]
    assert [p.windows for p in alone] == [p.windows for p in predictions]
    for one, batched in zip(alone, predictions):
        assert [(s.start, s.end, s.label) for s in one.spans] == [(s.start, s.end, s.label) for s in batched.spans]
        assert [s.score for s in one.spans] == pytest.approx([s.score for s in batched.spans], abs=1e-5)


def test_min_score_leaves_out_the_less_confident_spans(model):
    sentences = tiny_corpus(12, seed=5, prefix="q", with_extensions=False)
    every = predict_sentences(model, sentences, PredictSettings(threshold=0.05))
    scores = sorted(s.score for p in every for s in p.spans)
    cut = scores[len(scores) // 2]
    kept = predict_sentences(model, sentences, PredictSettings(threshold=0.05, min_score=cut))
    assert [[s for s in p.spans if s.score >= cut] for p in every] == [p.spans for p in kept]
    assert 0 < sum(len(p.spans) for p in kept) < len(scores)


def test_a_long_sentence_through_the_encoders_own_limit_is_labelled_to_its_end(model):
    limit = window_limit(model)
    assert limit == 62  # the tiny encoder's 64 positions less <s> and </s>
    parts = tiny_corpus(40, seed=11, prefix="p", with_extensions=False)
    units = [u for part in parts for u in part.units][: 3 * limit + 7]
    [prediction] = predict_sentences(model, [Sentence("long", units)], batch_size=2)
    assert prediction.windows == len(sentence_windows(len(units), limit)) == 6
    thirds = {span.start * 3 // len(units) for span in prediction.spans}
    assert thirds == {0, 1, 2}, "every part of the sentence gets spans"
    # names and cities, as in short sentences: spans are not smeared across the windows
    assert sum(span.end - span.start == 2 for span in prediction.spans) >= 0.8 * len(prediction.spans)


def test_bad_settings_are_one_line_errors(model):
    with pytest.raises(ConfigError, match="min_score must be in"):
        PredictSettings(min_score=1.5)
    with pytest.raises(ConfigError, match="stride 9 is longer than a window"):
        predict_sentences(model, [Sentence("a", list("abc"))], PredictSettings(max_units=8, stride=9))
    with pytest.raises(ConfigError, match="batch_size"):
        predict_sentences(model, [], batch_size=0)
