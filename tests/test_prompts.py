"""Prompt templates: the bundled files, rendering, and user overrides."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from knowfree_core.errors import ConfigError, KnowFreeError
from knowfree_core.prompts import (
    STEPS,
    PromptTemplate,
    available_prompts,
    bundled_prompts_dir,
    load_prompt,
)

SENTENCE = "现任中国科技大学商学院院长。"
VARIABLES = {
    "ent": {"sentence": SENTENCE},
    "seg": {"sentence": SENTENCE},
    "pos": {"sentence": SENTENCE, "words": ["现任", "中国科技大学", "商学院", "院长", "。"]},
    "merge": {"labels": ["地点", "位置", "人物"]},
    "exp": {"sentence": SENTENCE, "entities": [("中国科技大学商学院", "组织机构"), ("院长", "头衔职称")]},
    "ext": {"sentence": SENTENCE},
}
JSON_STEPS = {"ent", "seg", "pos", "merge"}


@pytest.mark.parametrize("language", ["zh", "en"])
@pytest.mark.parametrize("step", STEPS)
def test_every_bundled_template_loads_and_renders(step: str, language: str) -> None:
    template = load_prompt(step, language)
    assert (template.name, template.language) == (step, language)
    # The version goes into every output record, so it must say which step and language.
    assert re.fullmatch(rf"{step}-{language}-v\d+", template.version)
    assert template.response == ("json" if step in JSON_STEPS else "text")
    messages = template.render(**VARIABLES[step])
    assert messages[-1]["role"] == "user"
    assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages)
    if "sentence" in VARIABLES[step]:
        assert SENTENCE in messages[-1]["content"]
    assert "{{" not in messages[-1]["content"] and "{%" not in messages[-1]["content"]


def test_the_papers_literal_braces_survive_rendering() -> None:
    ent_zh = load_prompt("ent", "zh").render(sentence="我爱北京")[0]["content"]
    assert '输出格式为[{entity: "", type: ""}]' in ent_zh
    assert ent_zh.rstrip().endswith("我爱北京")
    pos_en = load_prompt("pos", "en").render(sentence="I run", words=["I", "run"])[0]["content"]
    assert '[{word: "", pos: ""}]' in pos_en
    merge_zh = load_prompt("merge", "zh").render(labels=["地点"])[0]["content"]
    assert '{"标准标签": ["同义标签", "同义标签"]}' in merge_zh


def test_lists_render_as_json_with_chinese_kept_and_entities_in_the_papers_form() -> None:
    pos = load_prompt("pos", "zh").render(**VARIABLES["pos"])[0]["content"]
    assert '["现任", "中国科技大学", "商学院", "院长", "。"]' in pos
    merge = load_prompt("merge", "zh").render(**VARIABLES["merge"])[0]["content"]
    assert '["地点", "位置", "人物"]' in merge
    exp = load_prompt("exp", "zh").render(**VARIABLES["exp"])[0]["content"]
    assert "['中国科技大学商学院(组织机构)', '院长(头衔职称)']" in exp
    # Callers holding pre-formatted text can pass it through unchanged.
    exp_text = load_prompt("exp", "zh").render(sentence="x", entities="['院长(头衔职称)']")[0]["content"]
    assert "实体：['院长(头衔职称)']" in exp_text


def test_a_missing_variable_names_it_and_the_template_file() -> None:
    template = load_prompt("pos", "zh")
    with pytest.raises(ConfigError) as error:
        template.render(sentence=SENTENCE)
    assert "words" in str(error.value)
    assert template.path in str(error.value)


def test_a_system_message_comes_first() -> None:
    template = PromptTemplate(name="ent", language="zh", version="v", user="句子：{{ sentence }}", system="你是{{ role }}")
    assert template.render(sentence="我", role="专家") == [
        {"role": "system", "content": "你是专家"},
        {"role": "user", "content": "句子：我"},
    ]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _template(step: str, language: str, user: str = "自定义：{{ sentence }}", version: str = "custom-v1") -> str:
    return f"name: {step}\nlanguage: {language}\nversion: {version}\nresponse: json\nuser: '{user}'\n"


def test_a_user_prompts_dir_overrides_one_step_and_falls_back_for_the_rest(tmp_path: Path) -> None:
    override = _write(tmp_path / "zh" / "ent.yaml", _template("ent", "zh"))
    ent = load_prompt("ent", "zh", prompts_dir=tmp_path)
    assert ent.version == "custom-v1" and ent.path == str(override)
    assert ent.render(sentence="我爱北京")[0]["content"] == "自定义：我爱北京"
    seg = load_prompt("seg", "zh", prompts_dir=tmp_path)
    assert Path(seg.path).parent.parent == bundled_prompts_dir()

    listed = {(info.language, info.step): info for info in available_prompts(tmp_path)}
    assert listed["zh", "ent"].path == str(override) and listed["zh", "ent"].version == "custom-v1"
    assert listed["zh", "seg"].version == "seg-zh-v2"
    assert {(lang, step) for lang in ("zh", "en") for step in STEPS} <= set(listed)


def test_a_user_can_add_a_language_without_code_changes(tmp_path: Path) -> None:
    _write(tmp_path / "ja" / "ent.yaml", _template("ent", "ja", user="文：{{ sentence }}"))
    assert load_prompt("ent", "ja", prompts_dir=tmp_path).render(sentence="東京")[0]["content"] == "文：東京"


def test_an_unknown_step_or_language_lists_what_exists() -> None:
    with pytest.raises(ConfigError, match=r"no prompt template for step 'ner'.*zh/ent"):
        load_prompt("ner", "zh")
    with pytest.raises(ConfigError, match="language 'fr'"):
        load_prompt("ent", "fr")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name: ent\nlanguage: zh\nuser: [unclosed\n", r"ent\.yaml:\d+: malformed YAML"),
        ("name: ent\nlanguage: zh\nversion: v1\nresponse: json\n", r"ent\.yaml: prompt template is missing user"),
        ("- just\n- a list\n", r"ent\.yaml: a prompt template must be a YAML mapping"),
        (_template("ent", "zh") + "sytem: hi\n", r"ent\.yaml: unknown key\(s\) sytem"),
        (_template("seg", "zh"), r"ent\.yaml: name is 'seg' but the file is for step 'ent'"),
        (_template("ent", "zh").replace("response: json", "response: xml"), r"response must be one of json, text"),
        (_template("ent", "zh", user="{{ sentence"), r"ent\.yaml: template syntax error"),
        (_template("ent", "zh") + "schema: [1]\n", r"ent\.yaml: schema must be a mapping with type: object"),
        (_template("ent", "zh") + "schema: {type: object, properties: {a: {type: string}}, required: [a]}\n",
         r"ent\.yaml: schema must set additionalProperties: false"),
        (_template("ent", "zh") + "schema: {type: object, additionalProperties: false, properties: "
                                  "{a: {type: array, items: {type: object, properties: {b: {type: string}}, "
                                  "required: [], additionalProperties: false}}}, required: [a]}\n",
         r"ent\.yaml: schema\.properties\.a\.items must list every property in required"),
        (_template("ent", "zh").replace("response: json", "response: text")
         + "schema: {type: object, properties: {}, required: [], additionalProperties: false}\n",
         r"ent\.yaml: schema is for json answers"),
    ],
)
def test_a_broken_template_file_fails_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    _write(tmp_path / "zh" / "ent.yaml", content)
    with pytest.raises(KnowFreeError, match=message):
        load_prompt("ent", "zh", prompts_dir=tmp_path)


# -- answer schemas (structured outputs) ---------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from knowfree_core.llm.parsing import parse_entities, parse_merge_groups, parse_pos, parse_words  # noqa: E402

PARSERS = {"ent": parse_entities, "seg": parse_words, "pos": parse_pos, "merge": parse_merge_groups}


def _instances(schema: dict):
    """Hypothesis values valid under ``schema``, for the JSON-schema subset the bundled
    schemas use (objects with all properties required, arrays with minItems, strings with a
    pattern); anything else fails the test, so a new keyword gets a generator here first."""
    kind = schema["type"]
    if kind == "object":
        return st.fixed_dictionaries({key: _instances(value) for key, value in schema["properties"].items()})
    if kind == "array":
        return st.lists(_instances(schema["items"]), min_size=schema.get("minItems", 0), max_size=6)
    if kind == "string":
        assert set(schema) <= {"type", "pattern"}, schema
        return st.from_regex(schema["pattern"], fullmatch=True) if "pattern" in schema else st.text()
    raise AssertionError(f"no generator for {schema}")


def _encodings(value) -> list[str]:
    """The ways a server may write a valid answer: compact, spaced, indented, ASCII-escaped."""
    return [json.dumps(value, ensure_ascii=False, separators=(",", ":")), json.dumps(value, ensure_ascii=False),
            json.dumps(value, ensure_ascii=False, indent=2), json.dumps(value)]


@pytest.mark.parametrize("language", ["zh", "en"])
@pytest.mark.parametrize("step", sorted(JSON_STEPS))
def test_every_answer_valid_under_a_steps_schema_parses_without_a_rejection(step: str, language: str) -> None:
    """The contract of structured outputs: a constrained answer never reaches the tolerant
    parser's rejections (the vllm test records the counts without schemas beside it)."""
    jsonschema = pytest.importorskip("jsonschema")
    template = load_prompt(step, language)
    schema = template.response_schema
    assert schema is not None and schema.name == step
    jsonschema.Draft202012Validator.check_schema(dict(schema.schema))
    validator = jsonschema.Draft202012Validator(dict(schema.schema))
    parse = PARSERS[step]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_instances(dict(schema.schema)))
    def check(value) -> None:
        assert validator.is_valid(value), value  # the generator keeps to the schema
        for text in _encodings(value):
            parsed = parse(text)
            assert parsed.error is None and parsed.rejections == [], (text, parsed)
            assert not parsed.repaired and not parsed.truncated

    check()


@pytest.mark.parametrize("language", ["zh", "en"])
def test_text_steps_have_no_schema(language: str) -> None:
    assert load_prompt("exp", language).response_schema is None
    assert load_prompt("ext", language).response_schema is None


def test_schema_answers_parse_to_the_items_they_hold() -> None:
    """The wrapper objects strict mode needs are unwrapped to the same items as the paper's
    top-level forms."""
    assert parse_entities('{"entities": [{"entity": "北京", "type": "地点"}]}').items == [("北京", "地点")]
    assert parse_entities('{"entities": []}').items == []
    assert parse_words('{"words": ["我", "在"]}').items == ["我", "在"]
    assert parse_pos('{"tags": [{"word": "我", "pos": "r"}]}').items == [("我", "r")]
    merged = parse_merge_groups('{"groups": [{"standard": "地点", "synonyms": ["地点", "位置"]}]}')
    assert merged.items == {"地点": ["地点", "位置"]}
