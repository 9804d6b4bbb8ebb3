"""Reading LLM answers (knowfree_core.llm.parsing) and placing them on sentence units
(knowfree_core.llm.span_alignment)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knowfree_core.annotators.alignment import REASON_NOT_FOUND, REASON_NOT_ON_UNIT_BOUNDARY
from knowfree_core.llm.parsing import (
    REASON_BAD_ITEM,
    REASON_EMPTY,
    REASON_EMPTY_ANSWER,
    REASON_MISSING_FIELD,
    REASON_NO_JSON,
    REASON_NOT_A_LIST,
    REASON_TRUNCATED,
    ParsedAnswer,
    parse_entities,
    parse_merge_groups,
    parse_pos,
    parse_words,
)
from knowfree_core.llm.span_alignment import (
    REASON_DUPLICATE,
    REPAIR_POS,
    AlignedEntity,
    align_entities,
    align_pos_with_repair,
)

PARSERS = [parse_entities, parse_words, parse_pos, parse_merge_groups]


def reasons(answer_or_rejections) -> list[str]:
    rejections = getattr(answer_or_rejections, "rejections", answer_or_rejections)
    return [r.reason for r in rejections]


# -- entities -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        '[{"entity": "中国科技大学", "type": "组织机构"}]',
        '```json\n[{"entity": "中国科技大学", "type": "组织机构"}]\n```',
        '好的，以下是抽取结果：\n```json\n[{"entity": "中国科技大学", "type": "组织机构"}]\n```\n希望对你有帮助！',
        '抽取结果：[{"entity": "中国科技大学", "type": "组织机构"}]。以上是全部实体。',
        # The paper's own prompt shows unquoted keys; models copy them.
        '[{entity: "中国科技大学", type: "组织机构"}]',
        "[{'entity': '中国科技大学', 'type': '组织机构'}]",
        '[{"entity": "中国科技大学", "type": "组织机构"},]',
        # Full-width JSON syntax and curly quotes, as typed by a Chinese input method.
        '［｛"entity"："中国科技大学"，"type"："组织机构"｝］',
        "[{“entity”: “中国科技大学”, “type”: “组织机构”}]",
        # Key and shape variants.
        '[{"text": "中国科技大学", "label": "组织机构"}]',
        '[{"name": "中国科技大学", "category": "组织机构"}]',
        '[{"实体": "中国科技大学", "类型": "组织机构"}]',
        '[["中国科技大学", "组织机构"]]',
        '{"entities": [{"entity": "中国科技大学", "type": "组织机构"}]}',
        '{"entity": "中国科技大学", "type": "组织机构"}',
        '{"组织机构": ["中国科技大学"]}',
        '["中国科技大学(组织机构)"]',
    ],
)
def test_entities_are_read_from_every_common_answer_shape(answer: str) -> None:
    parsed = parse_entities(answer)
    assert parsed.items == [("中国科技大学", "组织机构")]
    assert parsed.error is None and parsed.rejections == []


def test_strict_json_is_not_marked_repaired_but_repaired_json_is() -> None:
    assert parse_entities('[{"entity": "北京", "type": "地点"}]').repaired is False
    assert parse_entities('[{entity: "北京", type: "地点"}]').repaired is True


def test_a_truncated_answer_keeps_its_complete_items_only() -> None:
    parsed = parse_entities('[{"entity":"北京","type":"地点"},{"entity":"上')
    assert parsed.items == [("北京", "地点")]
    assert parsed.truncated and parsed.error is None
    assert reasons(parsed) == [REASON_TRUNCATED]
    # A value cut in half is not trusted: "地" is not the type the model was writing.
    cut_type = parse_entities('```json\n[{"entity":"北京","type":"地点"},{"entity":"上海","type":"地')
    assert cut_type.items == [("北京", "地点")]
    assert reasons(cut_type) == [REASON_TRUNCATED]


def test_a_truncated_wrapped_answer_keeps_its_complete_items() -> None:
    parsed = parse_entities('{"entities": [{"entity":"北京","type":"地点"},{"entity":"上海","ty')
    assert parsed.items == [("北京", "地点")]


ENTITIES = [("中国科技大学", "组织机构"), ("上海", "地点"), ("李白", "人物")]
FULL_ANSWER = "```json\n" + json.dumps([{"entity": e, "type": t} for e, t in ENTITIES], ensure_ascii=False) + "\n```"


def test_every_prefix_of_an_answer_gives_a_prefix_of_its_items() -> None:
    # Whatever the point where generation stopped, no invented or half item comes back.
    for end in range(len(FULL_ANSWER) + 1):
        parsed = parse_entities(FULL_ANSWER[:end])
        assert parsed.items == ENTITIES[: len(parsed.items)], FULL_ANSWER[:end]
    assert parse_entities(FULL_ANSWER).items == ENTITIES


def test_unusable_entity_items_are_rejected_with_counted_reasons() -> None:
    parsed = parse_entities(
        '[{"entity": "北京", "type": "地点"}, {"entity": "上海"}, {"entity": " ", "type": "地点"},'
        ' {"entity": ["x"], "type": "地点"}, 42, {"entity": 2008, "type": "时间"}]'
    )
    assert parsed.items == [("北京", "地点"), ("2008", "时间")]
    assert reasons(parsed) == [REASON_MISSING_FIELD, REASON_EMPTY, REASON_BAD_ITEM, REASON_BAD_ITEM]
    assert "has no type" in parsed.rejections[0].detail


def test_prose_brackets_before_the_json_are_not_taken_for_it() -> None:
    assert parse_entities('[注意] 结果如下：[{"entity": "北京", "type": "地点"}]').items == [("北京", "地点")]
    assert parse_entities('The result (don\'t [ignore] it): [{"entity": "Paris", "type": "LOC"}]').items == [
        ("Paris", "LOC")
    ]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ("", REASON_EMPTY_ANSWER),
        ("   \n", REASON_EMPTY_ANSWER),
        ("句子中没有实体。", REASON_NO_JSON),
        ('"北京"', REASON_NO_JSON),
        ('{"note": "nothing here", "count": 0, "ok": true, "x": null}', REASON_NOT_A_LIST),
    ],
)
def test_an_answer_with_nothing_usable_sets_error(answer: str, error: str) -> None:
    parsed = parse_entities(answer)
    assert parsed.error == error and parsed.items == []
    assert error in reasons(parsed)


def test_an_empty_list_is_a_valid_answer_with_no_entities() -> None:
    parsed = parse_entities("```json\n[]\n```")
    assert parsed == ParsedAnswer(items=[], rejections=[], error=None)


# -- words, POS and synonym groups --------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        '["我", "爱", "北京"]',
        '```json\n["我", "爱", "北京"]\n```',
        '[{"word": "我"}, {"word": "爱"}, {"word": "北京"}]',
        '{"words": ["我", "爱", "北京"]}',
        "['我'，'爱'，'北京']",
        "分词结果如下：\n我 爱 北京",
        "我/爱/北京",
        "我、爱、北京",
    ],
)
def test_words_are_read_from_arrays_and_from_a_separated_line(answer: str) -> None:
    parsed = parse_words(answer)
    assert parsed.items == ["我", "爱", "北京"]
    assert parsed.error is None


def test_truncated_words_drop_the_half_word() -> None:
    parsed = parse_words('["我", "爱", "北')
    assert parsed.items == ["我", "爱"] and reasons(parsed) == [REASON_TRUNCATED]


@pytest.mark.parametrize(
    "answer",
    [
        '[{"word": "我", "pos": "r"}, {"word": "爱", "pos": "v"}]',
        '[{word: "我", pos: "r"}, {word: "爱", pos: "v"}]',
        '[{"词": "我", "词性": "r"}, {"词": "爱", "词性": "v"}]',
        '[["我", "r"], ["爱", "v"]]',
        '["我/r", "爱/v"]',
        "我/r 爱/v",
    ],
)
def test_pos_pairs_are_read_from_every_common_shape(answer: str) -> None:
    assert parse_pos(answer).items == [("我", "r"), ("爱", "v")]


def test_pos_items_without_a_tag_are_rejected() -> None:
    parsed = parse_pos('[{"word": "我", "pos": "r"}, {"word": "爱"}, {"word": "北京", "pos": ""}]')
    assert parsed.items == [("我", "r")]
    assert reasons(parsed) == [REASON_MISSING_FIELD, REASON_EMPTY]


@pytest.mark.parametrize(
    "answer",
    [
        '{"地点": ["地点", "位置", "地名"], "人物": ["人物", "人名"]}',
        '```json\n{"地点": ["地点", "位置", "位置", "地名"], "人物": ["人物", "人名"]}\n```',
        '[{"standard": "地点", "synonyms": ["地点", "位置", "地名"]}, {"standard": "人物", "synonyms": ["人物", "人名"]}]',
        '[{"标准标签": "地点", "同义标签": ["地点", "位置"]}, {"标准标签": "地点", "同义标签": ["地名"]},'
        ' {"标准标签": "人物", "同义标签": ["人物", "人名"]}]',
        '{"groups": {"地点": ["地点", "位置", "地名"], "人物": ["人物", "人名"]}}',
    ],
)
def test_merge_groups_are_read_as_standard_label_to_synonyms(answer: str) -> None:
    parsed = parse_merge_groups(answer)
    assert parsed.items == {"地点": ["地点", "位置", "地名"], "人物": ["人物", "人名"]}
    assert parsed.error is None


def test_truncated_merge_groups_keep_complete_groups() -> None:
    parsed = parse_merge_groups('{"地点": ["地点", "位置"], "人物": ["人')
    assert parsed.items == {"地点": ["地点", "位置"]} and parsed.truncated
    assert parse_merge_groups("无法合并").items == {}


# -- never raising ------------------------------------------------------------------------

JSONISH = st.text(alphabet='[]{}"\',:“”‘’，：［］｛｝`\\\n ab北京0-/、jsonentitytype', max_size=80)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=80), JSONISH))
def test_parsers_never_raise_and_always_return_the_declared_shape(text: str) -> None:
    for parse in PARSERS:
        parsed = parse(text)
        assert isinstance(parsed, ParsedAnswer)
        assert isinstance(parsed.items, dict if parse is parse_merge_groups else list)
        assert parsed.error is None or not parsed.items
        # The catch-all safety net is not what keeps parsing alive on ordinary input.
        assert not any(r.detail.startswith("parser failed") for r in parsed.rejections)
        for item in parsed.items:
            if parse in (parse_entities, parse_pos):
                assert len(item) == 2 and all(isinstance(x, str) and x for x in item)
            elif parse is parse_words:
                assert isinstance(item, str) and item


def test_parsers_survive_deep_nesting_and_non_text_input() -> None:
    for parse in PARSERS:
        # Deeper than Python's recursion limit: json_repair may fail, the parser must not.
        deep = parse("[" * 5000 + "]" * 5000)
        assert not any(r.detail.startswith("parser failed") for r in deep.rejections)
        assert parse(None).error == REASON_EMPTY_ANSWER  # type: ignore[arg-type]


# -- placing entities on units ------------------------------------------------------------


def test_an_entity_is_marked_at_every_occurrence() -> None:
    units = list("北京欢迎你，北京。")
    spans, rejections = align_entities(units, "", [("北京", "地点")])
    assert spans == [AlignedEntity(0, 2, "地点", 0), AlignedEntity(6, 8, "地点", 0)]
    assert rejections == []
    first, _ = align_entities(units, "", [("北京", "地点")], mode="first")
    assert first == [AlignedEntity(0, 2, "地点", 0)]


def test_entity_matching_ignores_width_case_and_spaces_like_the_annotators() -> None:
    units = list("我用ＩＢＭ电脑在北 京")
    spans, rejections = align_entities(units, "", [("ibm", "组织"), ("北京", "地点")])
    assert [(s.start, s.end, s.label) for s in spans] == [(2, 5, "组织"), (8, 11, "地点")]
    assert rejections == []


def test_english_entities_must_cover_whole_words() -> None:
    units = "He left Yorkshire for New York .".split()
    spans, rejections = align_entities(units, " ", [("York", "LOC"), ("shire", "LOC"), ("New York", "LOC")])
    # "York" inside "Yorkshire" is not a span, but its whole-word occurrence is.
    assert [(s.start, s.end, s.label, s.index) for s in spans] == [(5, 6, "LOC", 0), (4, 6, "LOC", 2)]
    assert reasons(rejections) == [REASON_NOT_ON_UNIT_BOUNDARY]
    assert "shire" in rejections[0].detail


def test_entities_not_in_text_empty_or_listed_twice_are_rejected() -> None:
    units = list("李白在长安")
    spans, rejections = align_entities(
        units, "", [("李白", "人物"), ("杜甫", "人物"), ("", "地点"), ("长安", " "), ("李白", "人物"), ("李白", "诗人")]
    )
    assert [(s.start, s.end, s.label) for s in spans] == [(0, 2, "人物"), (0, 2, "诗人")]
    assert reasons(rejections) == [REASON_NOT_FOUND, REASON_EMPTY, REASON_EMPTY, REASON_DUPLICATE]


# -- POS with segmentation repair ---------------------------------------------------------


def test_pos_gaps_are_filled_from_the_segmentation() -> None:
    units = list("我爱北京天安门。")
    seg = ["我", "爱", "北京", "天安门", "。"]
    pos = [("我", "r"), ("北京", "ns"), ("。", "w")]  # the LLM skipped 爱 and 天安门
    result = align_pos_with_repair(units, "", seg, pos)
    assert [(s.start, s.end, s.pos, s.repaired) for s in result.spans] == [
        (0, 1, "r", False),
        (1, 2, REPAIR_POS, True),
        (2, 4, "ns", False),
        (4, 7, REPAIR_POS, True),
        (7, 8, "w", False),
    ]
    assert result.repaired == 2 and result.uncovered == 0 and result.rejections == []
    covered = {i for s in result.spans for i in range(s.start, s.end)}
    assert covered == set(range(len(units)))


def test_pos_repair_reports_rejected_words_and_units_left_uncovered() -> None:
    units = list("我爱北京")
    result = align_pos_with_repair(units, "", ["我", "爱北"], [("我", "r"), ("上海", "ns")])
    # "爱北" splits nothing here (characters are units) so it fills 爱 and 北; 京 stays bare.
    assert [(s.start, s.end, s.pos) for s in result.spans] == [(0, 1, "r"), (1, 3, REPAIR_POS)]
    assert result.repaired == 1 and result.uncovered == 1
    assert reasons(result.rejections) == [REASON_NOT_FOUND]
    assert result.rejections[0].detail.startswith("pos: ")
