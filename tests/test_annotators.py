"""Tests of the offline annotators (LAC, jieba), their alignment and the shared interface."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from knowfree_core.annotators.alignment import (
    REASON_NOT_FOUND,
    REASON_NOT_ON_UNIT_BOUNDARY,
    REASON_TOOL_ERROR,
    align_words,
)
from knowfree_core.annotators.base import (
    AnnotationResult,
    WordTaggerAnnotator,
    apply_annotations,
    get_annotator,
)
from knowfree_core.formats import read_dataset
from knowfree_core.records import ExtensionSpan, Sentence

WEIBO_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "weibo" / "dev.conll"
STEPS = ("ent", "seg", "pos")

SENTENCES = [
    Sentence("plain", list("张三在北京大学读书。")),
    Sentence("time", list("2023年5月1日，李四和王五去了清华大学和中国科学院。")),
    # Spaces, an emoji, Latin and full-width characters must not shift later offsets.
    Sentence("mixed", list("我 在 上海😀工作, hello  world！ＡＢＣ１２３ 张三")),
    Sentence("edges", list(" \t张三来了 ")),
    Sentence("empty", []),
]


@pytest.fixture(scope="module")
def lac():
    return get_annotator("lac")


@pytest.fixture(scope="module")
def jieba_annotator():
    return get_annotator("jieba")


@pytest.fixture(scope="module", params=["lac", "jieba"])
def annotator(request, lac, jieba_annotator):
    return {"lac": lac, "jieba": jieba_annotator}[request.param]


def by_source(result: AnnotationResult, source: str) -> list[ExtensionSpan]:
    return [s for s in result.spans if s.source == source]


def texts(sentence: Sentence, spans: list[ExtensionSpan]) -> dict[str, str]:
    return {sentence.span_text(s): s.label for s in spans}


# --- LAC -----------------------------------------------------------------------------


def test_lac_entities_on_hand_picked_sentences(lac):
    plain, time = lac.annotate(SENTENCES[:2], ("ent",))
    entities = texts(SENTENCES[0], plain.spans)
    assert entities["张三"] == "ENT-PER"
    assert entities["北京大学"] in {"ENT-ORG", "ENT-LOC"}
    assert ExtensionSpan(0, 2, "ENT-PER", "lac:ent") in plain.spans

    entities = texts(SENTENCES[1], time.spans)
    assert entities["李四"] == entities["王五"] == "ENT-PER"
    assert entities["清华大学"] == "ENT-ORG"
    assert entities["2023年5月1日"] == "ENT-TIME"
    # Only the requested step was run.
    assert {s.source for r in (plain, time) for s in r.spans} == {"lac:ent"}
    assert plain.sources == ("lac:ent",)


def test_lac_entity_words_get_their_pos_back(lac):
    (result,) = lac.annotate(SENTENCES[:1], ("pos",))
    pos = texts(SENTENCES[0], result.spans)
    # LAC replaces nr/nt by PER/ORG; the POS step publishes the POS tag they replaced.
    assert pos["张三"] == "POS-nr"
    assert pos["在"] == "POS-p"
    assert pos["。"] == "POS-w"
    assert all(label.startswith("POS-") and label[4:].islower() for label in pos.values())


# --- both annotators -----------------------------------------------------------------


def test_segmentation_tiles_non_space_units(annotator):
    results = annotator.annotate(SENTENCES, STEPS)
    assert [r.sentence_id for r in results] == [s.id for s in SENTENCES]
    for sentence, result in zip(SENTENCES, results):
        assert result.rejections == [], (sentence.id, result.rejections)
        seg = sorted(by_source(result, f"{annotator.name}:seg"))
        assert all(s.label == "SEG" for s in seg)
        # Spans are disjoint and every non-space unit is covered exactly once.
        assert all(a.end <= b.start for a, b in zip(seg, seg[1:])), seg
        covered = {i for s in seg for i in range(s.start, s.end)}
        non_space = {i for i, u in enumerate(sentence.units) if not u.isspace()}
        assert non_space <= covered
        # A span neither starts nor ends on a space unit.
        assert all(not sentence.units[s.start].isspace() and not sentence.units[s.end - 1].isspace() for s in seg)


def test_pos_spans_coincide_with_seg_spans(annotator):
    for result in annotator.annotate(SENTENCES, ("seg", "pos")):
        seg = sorted((s.start, s.end) for s in by_source(result, f"{annotator.name}:seg"))
        pos = by_source(result, f"{annotator.name}:pos")
        assert sorted((s.start, s.end) for s in pos) == seg
        assert all(s.label.startswith("POS-") and len(s.label) > 4 for s in pos)


def test_every_span_lies_inside_the_text(annotator):
    for sentence, result in zip(SENTENCES, annotator.annotate(SENTENCES, STEPS)):
        for span in result.spans:
            assert 0 <= span.start < span.end <= len(sentence), (sentence.id, span)
            assert span.source.startswith(annotator.name + ":")


def test_mixed_sentence_offsets(annotator):
    sentence = SENTENCES[2]
    (result,) = annotator.annotate([sentence], ("seg", "ent"))
    words = [sentence.span_text(s) for s in sorted(by_source(result, f"{annotator.name}:seg"))]
    for word in ("上海", "😀", "hello", "world", "张三"):
        assert word in words, words
    entities = texts(sentence, by_source(result, f"{annotator.name}:ent"))
    assert entities.get("上海") == "ENT-LOC"
    assert entities.get("张三") == "ENT-PER"


def test_jieba_entities_from_proper_noun_tags(jieba_annotator):
    plain, time = jieba_annotator.annotate(SENTENCES[:2], STEPS)
    assert texts(SENTENCES[0], by_source(plain, "jieba:ent")) == {"张三": "ENT-PER", "北京大学": "ENT-ORG"}
    assert texts(SENTENCES[0], by_source(plain, "jieba:pos"))["张三"] == "POS-nr"
    entities = texts(SENTENCES[1], by_source(time, "jieba:ent"))
    assert entities["清华大学"] == "ENT-ORG"
    assert all(label in {"ENT-PER", "ENT-LOC", "ENT-ORG", "ENT-OTHER"} for label in entities.values())


def test_english_token_units(annotator):
    sentence = Sentence("en", "I  love Beijing , really".split(), joiner=" ")
    (result,) = annotator.annotate([sentence], ("seg",))
    assert result.rejections == []
    assert sorted((s.start, s.end) for s in result.spans) == [(i, i + 1) for i in range(len(sentence))]


def test_steps_are_validated(lac):
    with pytest.raises(ValueError, match="supported"):
        lac.annotate(SENTENCES[:1], ("ner",))
    # A bare string is one step, not three one-letter steps.
    (result,) = lac.annotate(SENTENCES[:1], "seg")
    assert result.sources == ("lac:seg",)
    assert lac.annotate([], STEPS) == []


def test_jieba_leaves_its_logger_as_it_was():
    logger = logging.getLogger("jieba")
    before = logger.level
    annotator = get_annotator("jieba")
    annotator.annotate(SENTENCES[:1], ("seg",))
    assert logger.level == before


# --- alignment -----------------------------------------------------------------------


def test_alignment_rejects_absent_word_and_keeps_going():
    result = align_words(list("我爱北京天安门"), ["我", "猫", "爱", "北京", "天安门"])
    assert [(w.start, w.end, w.index) for w in result.words] == [(0, 1, 0), (1, 2, 2), (2, 4, 3), (4, 7, 4)]
    assert len(result.rejections) == 1
    rejection = result.rejections[0]
    assert rejection.reason == REASON_NOT_FOUND and "猫" in rejection.detail


def test_alignment_whole_units_only_for_tokens():
    units = ["hello", "world", "!"]
    result = align_words(units, ["hel", "lo", "world", "!"], joiner=" ")
    assert [(w.start, w.end) for w in result.words] == [(1, 2), (2, 3)]
    assert [r.reason for r in result.rejections] == [REASON_NOT_ON_UNIT_BOUNDARY] * 2


def test_alignment_tolerates_whitespace_and_normalisation():
    units = list(" 上海  北京\tＡＢＣ１２３ 😀x")
    # Whitespace-only words are skipped, whitespace inside or around a word is ignored,
    # full-width characters match their ASCII form.
    words = [" ", "上海北京", "\t", "abc", " 123 ", "😀", "x"]
    result = align_words(units, words)
    assert result.rejections == []
    spans = [(w.start, w.end) for w in result.words]
    assert spans == [(1, 7), (8, 11), (11, 14), (15, 16), (16, 17)]
    assert "".join(units[1:7]).replace(" ", "") == "上海北京"


def test_alignment_multi_character_units():
    units = ["\ufffd\ufffd", "好", "的"]
    assert [(w.start, w.end) for w in align_words(units, ["\ufffd\ufffd好", "的"]).words] == [(0, 2), (2, 3)]
    split = align_words(units, ["\ufffd", "\ufffd好", "的"])
    assert [r.reason for r in split.rejections] == [REASON_NOT_ON_UNIT_BOUNDARY] * 2
    assert [(w.start, w.end) for w in split.words] == [(2, 3)]


def test_alignment_never_leaves_the_text():
    rng = random.Random(0)
    alphabet = list("我爱北京天安门 ab😀ＡＢ\t") + [""]
    for _ in range(300):
        units = [rng.choice(alphabet[:-1]) for _ in range(rng.randint(0, 12))]
        text = "".join(units)
        words = []
        for _ in range(rng.randint(0, 8)):
            i = rng.randint(0, len(text))
            words.append(text[i : i + rng.randint(0, 4)] if rng.random() < 0.7 else rng.choice(alphabet) * 2)
        result = align_words(units, words)
        for w in result.words:
            assert 0 <= w.start < w.end <= len(units)
        assert all(a.end <= b.start for a, b in zip(result.words, result.words[1:]))


class _FlakyTool(WordTaggerAnnotator):
    """A tool that fails on sentences containing 坏 and invents a word on others."""

    name = "flaky"

    def _tag_texts(self, texts):
        if any("坏" in t for t in texts):
            raise RuntimeError("model exploded")
        return [[(c, "n") for c in t] + [("幻", "n")] for t in texts]

    def _pos_tag(self, tag):
        return tag

    def _entity_type(self, tag):
        return None


def test_tool_failure_costs_only_its_sentence():
    good, bad = Sentence("g", list("好人")), Sentence("b", list("坏人"))
    results = _FlakyTool().annotate([good, bad], ("seg",))
    assert [s.label for s in results[0].spans] == ["SEG", "SEG"]
    assert [r.reason for r in results[0].rejections] == [REASON_NOT_FOUND]
    assert results[1].spans == [] and results[1].rejections[0].reason == REASON_TOOL_ERROR
    assert "model exploded" in results[1].rejections[0].detail


# --- apply_annotations and the registry ---------------------------------------------


def test_apply_annotations_dedups_and_replaces(lac):
    other = ExtensionSpan(0, 2, "SEG", "jieba:seg")
    stale = ExtensionSpan(0, 1, "SEG", "lac:seg")
    original = Sentence("plain", list("张三在北京大学读书。"), extension_spans=[other, stale])
    results = lac.annotate([original], ("seg",))
    fresh = results[0].spans

    (replaced,) = apply_annotations([original], results)
    assert original.extension_spans == [other, stale]  # input untouched
    assert stale not in replaced.extension_spans  # old lac:seg output replaced
    assert other in replaced.extension_spans  # same offsets/label, other source: kept
    assert len(replaced.extension_spans) == 1 + len(fresh)

    (twice,) = apply_annotations(apply_annotations([original], results), results)
    assert twice.extension_spans == replaced.extension_spans

    assert stale not in fresh
    (accumulated,) = apply_annotations([original], results, replace_sources=False)
    assert accumulated.extension_spans == [other, stale, *fresh]
    (again,) = apply_annotations([accumulated], results, replace_sources=False)
    assert again.extension_spans == accumulated.extension_spans

    duplicate = AnnotationResult("plain", spans=fresh + fresh, sources=("lac:seg",))
    (deduped,) = apply_annotations([original], [duplicate])
    assert len(deduped.extension_spans) == 1 + len(fresh)


def test_apply_annotations_rejects_mismatched_results():
    sentence = Sentence("a", list("你好"))
    with pytest.raises(ValueError, match="unknown sentence ids"):
        apply_annotations([sentence], [AnnotationResult("zzz")])
    with pytest.raises(ValueError, match="two annotation results"):
        apply_annotations([sentence], [AnnotationResult("a"), AnnotationResult("a")])
    with pytest.raises(ValueError):
        apply_annotations([sentence], [AnnotationResult("a", spans=[ExtensionSpan(1, 5, "SEG", "x:seg")])])


def test_unknown_annotator_name_lists_known_ones():
    with pytest.raises(ValueError) as info:
        get_annotator("hanlp")
    assert "hanlp" in str(info.value) and "lac" in str(info.value) and "jieba" in str(info.value)
    # a trained KnowFREE model is registered too (tests/test_knowfree_model_annotator.py)
    assert "knowfree" in str(info.value)


def test_a_plugin_must_be_an_annotator_subclass_before_it_is_called(tmp_path):
    # "module:Name" used to call any importable callable with the config's options.
    from knowfree_core.errors import ConfigError

    marker = tmp_path / "ran"
    with pytest.raises(ConfigError) as info:
        get_annotator("os:system", command=f"touch {marker}")
    assert not marker.exists()
    message = str(info.value)
    assert message.startswith("annotator: 'os:system' is not a subclass of knowfree_core.annotators.base.Annotator")
    assert "\n" not in message
    for bad, why in [("builtins:len", "not a subclass"), ("os:NoSuchName", "has no 'NoSuchName'"), ("no_such_module_x:Thing", "cannot import"),
                     ("os:path:join", "not 'package.module:ClassName'"), ("builtins:dict", "not a subclass")]:
        with pytest.raises(ConfigError, match=why):
            get_annotator(bad)


def test_an_engine_plugin_must_be_an_llm_engine():
    from knowfree_core.errors import ConfigError
    from knowfree_core.llm.engine import EngineConfig, LLMEngine, build_engine
    from knowfree_core.registry import LazyRegistry

    with pytest.raises(ConfigError, match="^engine.kind: unknown LLM engine 'os:system'"):
        build_engine(EngineConfig(kind="os:system"))
    engines = LazyRegistry({}, "LLM engine", "engines", open=True, base=LLMEngine, key="engine.kind")
    with pytest.raises(ConfigError, match="is not a subclass of knowfree_core.llm.engine.LLMEngine"):
        engines.resolve("knowfree_core.annotators.jieba_annotator:JiebaAnnotator")


# --- real data -----------------------------------------------------------------------


@pytest.mark.skipif(not WEIBO_DEV.exists(), reason="Weibo dev file absent")
def test_weibo_dev_first_50(annotator):
    sentences = read_dataset(WEIBO_DEV)[:50]
    assert len(sentences) == 50
    results = annotator.annotate(sentences, STEPS)
    words = rejections = 0
    for sentence, result in zip(sentences, results):
        for span in result.spans:
            assert 0 <= span.start < span.end <= len(sentence), (sentence.id, span)
        words += len(by_source(result, f"{annotator.name}:seg"))
        # Some Weibo "characters" are two U+FFFD (emoji broken in the corpus); jieba splits
        # them in two, which cannot map to whole units. Those rejections are expected.
        rejections += sum(1 for r in result.rejections if "\ufffd" not in r.detail)
        assert all(r.reason == REASON_NOT_ON_UNIT_BOUNDARY for r in result.rejections if "\ufffd" in r.detail)
    annotated = apply_annotations(sentences, results)
    for sentence in annotated:
        if any(len(u) == 1 and not u.isspace() for u in sentence.units):
            assert sentence.extension_spans, sentence.id
    assert words > 500
    assert rejections <= max(3, words // 200), rejections
