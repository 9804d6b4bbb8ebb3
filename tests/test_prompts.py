"""Prompt templates: the bundled files, rendering, and user overrides."""

from __future__ import annotations

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
    assert listed["zh", "seg"].version == "seg-zh-v1"
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
    ],
)
def test_a_broken_template_file_fails_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    _write(tmp_path / "zh" / "ent.yaml", content)
    with pytest.raises(KnowFreeError, match=message):
        load_prompt("ent", "zh", prompts_dir=tmp_path)
