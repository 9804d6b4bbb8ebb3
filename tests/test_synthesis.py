"""Enriched explanation synthesis without a cluster: prompt choice, splitting, what is dropped
and why, continuations, the link to the source, collection, and labelling by a frozen model.
The LLM is the loopback OpenAI-compatible stub."""

from __future__ import annotations

import json

import pytest

from knowfree_core.records import Sentence, Span
from knowfree_core.synthesis import (
    REASON_DUPLICATE,
    REASON_ENGINE_ERROR,
    REASON_PROMPT_ECHO,
    REASON_SOURCE_COPY,
    REASON_TOO_LONG,
    REASON_TOO_SHORT,
    SynthesisSettings,
    Synthesizer,
    SyntheticLabeler,
    collect_synthesis,
    split_into_sentences,
)
from llm_stub_server import StubReply

pytest.importorskip("openai")


def _with_entities(i: int = 0) -> Sentence:
    text = "张三在北京工作。"
    return Sentence(id=f"s{i}", units=list(text), spans=[Span(0, 2, "PER"), Span(3, 5, "LOC")])


def _without_entities() -> Sentence:
    return Sentence(id="plain", units=list("今天的天气非常好。"))


def _synthesizer(llm_stub, tmp_path, cache=True, **settings):
    engine = {"kind": "openai", "model": "stub", "base_url": llm_stub.base_url, "max_retries": 0}
    params = {"max_tokens": 64, "temperature": 0.8, "seed": 7}
    return Synthesizer(engine, SynthesisSettings(**settings), params, str(tmp_path / "a.sqlite") if cache else None)


def test_split_removes_markdown_numbering_and_headers_and_keeps_closing_quotes():
    answer = "**续写：**张三后来去了上海。\n\n1. **张三**：一个人名，他说：“很好。”然后走了；\n- 北京（地名）"
    assert split_into_sentences(answer) == [
        "张三后来去了上海。", "张三：一个人名，他说：“很好。”", "然后走了；", "北京（地名）"]
    assert split_into_sentences("He left. **Paris** is big!\n2) The end", " ") == [
        "He left.", "Paris is big!", "The end"]


def test_p_exp_gets_the_entities_and_p_ext_only_the_sentence(llm_stub, tmp_path):
    llm_stub.answer = lambda request: "张三后来去了上海工作。"
    results = _synthesizer(llm_stub, tmp_path).synthesize([_with_entities(), _without_entities()])
    prompts = {r.prompt_text for r in llm_stub.requests}
    exp = next(p for p in prompts if "张三在北京工作" in p)
    assert "张三(PER)" in exp and "北京(LOC)" in exp and "解释每个实体" in exp
    ext = next(p for p in prompts if "今天的天气" in p)
    assert "关键短语" in ext and "(PER)" not in ext
    assert [r["prompt_version"] for r in results] == ["exp-zh-v1", "ext-zh-v1"]


def test_pieces_are_kept_or_dropped_with_a_counted_reason(llm_stub, tmp_path):
    echo = "你作为拥有丰富知识储备的专家"  # a line of the prompt itself
    llm_stub.answer = lambda request: (
        "张三后来去了上海工作。张三后来去了上海工作。短句。张三在北京工作。" + "长" * 50 + f"。\n{echo}")
    (result,) = _synthesizer(llm_stub, tmp_path, max_units=40).synthesize([_with_entities()])
    assert [s.text for s in result["synthetic"]] == ["张三后来去了上海工作。"]
    synthetic = result["synthetic"][0]
    assert synthetic.synthetic and synthetic.id == "s0#syn0.0" and synthetic.spans == []
    reasons = sorted(r["reason"] for r in result["rejections"])
    assert reasons == sorted([REASON_DUPLICATE, REASON_TOO_SHORT, REASON_SOURCE_COPY, REASON_TOO_LONG,
                              REASON_PROMPT_ECHO])


def test_a_paraphrased_echo_of_the_instructions_is_dropped_but_the_entities_are_not(llm_stub, tmp_path):
    # the instruction with a few characters changed, as small models repeat it; and a sentence
    # that reuses the source's entities, which must stay
    llm_stub.answer = lambda request: ("你作为拥有丰富知识的专家，需要根据我给出的样例续写，给学生解释样例中的实体含义。"
                                       "张三在北京工作了很多年。")
    (result,) = _synthesizer(llm_stub, tmp_path).synthesize([_with_entities()])
    assert [s.text for s in result["synthetic"]] == ["张三在北京工作了很多年。"]
    assert [r["reason"] for r in result["rejections"]] == [REASON_PROMPT_ECHO]


def test_continuations_use_successive_seeds_and_engine_errors_are_counted(llm_stub, tmp_path):
    def answer(request):
        if request.body.get("seed") == 8:
            return StubReply(status=500)
        return f"第{request.body.get('seed')}个续写的句子在这里。"

    llm_stub.answer = answer
    (result,) = _synthesizer(llm_stub, tmp_path, continuations=3).synthesize([_with_entities()])
    assert sorted(r.body.get("seed") for r in llm_stub.requests) == [7, 8, 9]
    assert [s.id for s in result["synthetic"]] == ["s0#syn0.0", "s0#syn2.0"]
    assert [r["reason"] for r in result["rejections"]] == [REASON_ENGINE_ERROR]
    assert result["raw_answers"][1] is None


def test_rows_resume_from_the_cache_and_collection_drops_cross_source_duplicates(llm_stub, tmp_path):
    llm_stub.answer = lambda request: "大家都知道张三后来去了上海。"
    rows = [{"id": s.id, "order": i, "record": json.dumps(s.to_dict(), ensure_ascii=False)}
            for i, s in enumerate([_with_entities(0), _with_entities(1)])]
    # the two sources have the same text: one prompt, asked once
    out = _synthesizer(llm_stub, tmp_path)(rows)
    asked = len(llm_stub.requests)
    assert asked == 1 and [row["n_synthetic"] for row in out] == [1, 1]
    _synthesizer(llm_stub, tmp_path)(rows)
    assert len(llm_stub.requests) == asked  # answered from the cache

    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    (rows_dir / "part.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out + out[:1]),
                                        encoding="utf-8")
    summary, duplicate_rows = collect_synthesis(rows_dir, tmp_path / "synthetic.jsonl")
    lines = (tmp_path / "synthetic.jsonl").read_text(encoding="utf-8").splitlines()
    assert duplicate_rows == 1 and summary.sources == 2 and summary.sources_with_entities == 2
    assert len(lines) == 1 and summary.synthetic_sentences == 1
    assert summary.rejections_by_reason == {REASON_DUPLICATE: 1}


def test_an_answer_past_max_answer_chars_is_counted_and_not_split(llm_stub, tmp_path):
    from knowfree_core.llm.parsing import REASON_ANSWER_TOO_LONG

    llm_stub.answer = lambda request: "张三后来去了上海工作。" * 20
    (result,) = _synthesizer(llm_stub, tmp_path, max_answer_chars=100).synthesize([_with_entities()])
    assert result["synthetic"] == [] and [r["reason"] for r in result["rejections"]] == [REASON_ANSWER_TOO_LONG]
    assert len(result["raw_answers"][0]) == 100
    with pytest.raises(ValueError, match="synthesis.max_answer_chars"):
        SynthesisSettings(max_answer_chars=0)


def test_max_per_source_keeps_the_first_sentences_and_counts_the_rest(llm_stub, tmp_path):
    llm_stub.answer = lambda request: "第一个新的句子在这里。第二个新的句子在这里。第三个新的句子在这里。"
    (result,) = _synthesizer(llm_stub, tmp_path, max_per_source=2).synthesize([_with_entities()])
    assert [s.text for s in result["synthetic"]] == ["第一个新的句子在这里。", "第二个新的句子在这里。"]
    assert [r["reason"] for r in result["rejections"]] == ["over max_per_source"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="continuations"):
        SynthesisSettings(continuations=0)
    with pytest.raises(ValueError, match="max_per_source"):
        SynthesisSettings(max_per_source=0)
    with pytest.raises(ValueError, match="min_units"):
        SynthesisSettings(min_units=50, max_units=10)


def test_frozen_model_labels_synthetic_sentences(tmp_path):
    from model_fixtures import build_tiny_model, make_random_encoder, tiny_corpus

    train = tiny_corpus(12, seed=1)
    model = build_tiny_model(make_random_encoder(tmp_path / "encoder"), train)
    model.config.threshold = 0.0  # an untrained model: every candidate span passes
    model.save_pretrained(tmp_path / "model")
    labeler = SyntheticLabeler(str(tmp_path / "model"), batch_size=4)
    rows = [{"id": f"x#syn0.{i}", "order": i,
             "record": json.dumps(Sentence(id=f"x#syn0.{i}", units=list("王五去了上海。"), synthetic=True).to_dict(),
                                  ensure_ascii=False)} for i in range(3)]
    out = labeler(rows)
    labelled = [Sentence.from_dict(json.loads(row["record"])) for row in out]
    assert [s.id for s in labelled] == [r["id"] for r in rows]
    assert all(s.synthetic for s in labelled)
    assert all(s.spans and {span.label for span in s.spans} <= {"PER", "LOC"} for s in labelled)
    assert [row["n_spans"] for row in out] == [len(s.spans) for s in labelled]
