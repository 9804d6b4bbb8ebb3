"""Pipeline-1 batch pieces without Ray: input preparation, one batch, the summary."""

from __future__ import annotations

import json

import pytest

from knowfree_core.annotation import (
    REASON_BATCH_FAILED,
    REASON_TOO_LONG,
    AnnotatorSpec,
    BatchAnnotator,
    check_error_rate,
    collect_output,
    prepare_input,
)
from knowfree_core.errors import ConfigError, DataFormatError, KnowFreeError
from knowfree_core.formats import read_dataset


def _rows(prepared):
    return [json.loads(line) for shard in prepared.shards for line in shard.read_text(encoding="utf-8").splitlines()]


def test_raw_text_folder_gives_stable_ids_in_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "a.txt").write_text("第一句\n\n第二句\n", encoding="utf-8")
    (corpus / "b" / "c.txt").write_text("第三句\n", encoding="utf-8")
    (corpus / "notes.md").write_text("not a corpus file\n", encoding="utf-8")
    prepared = prepare_input([corpus], tmp_path / "prepared", shard_size=2)
    rows = _rows(prepared)
    assert [r["id"] for r in rows] == ["a.txt:1", "a.txt:3", "b/c.txt:1"]
    assert [r["order"] for r in rows] == [0, 1, 2] and len(prepared.shards) == 2
    # the same input prepared again has the same fingerprint (resume relies on it)
    assert prepare_input([corpus], tmp_path / "again").fingerprint == prepared.fingerprint


def test_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好的\n".encode() + b"\xff\xfe broken\n")
    with pytest.raises(DataFormatError, match=r"bad.txt:2: not UTF-8"):
        prepare_input([bad], tmp_path / "p", format="text")
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_input([tmp_path / "missing.conll"], tmp_path / "p")


def test_two_files_with_the_same_ids_get_prefixed(tmp_path):
    sample = "我 O\n在 O\n\n北 B-LOC\n京 I-LOC\n"
    (tmp_path / "x.conll").write_text(sample, encoding="utf-8")
    (tmp_path / "y.conll").write_text(sample, encoding="utf-8")
    rows = _rows(prepare_input([tmp_path / "x.conll", tmp_path / "y.conll"], tmp_path / "p"))
    assert len({r["id"] for r in rows}) == 4


def test_batch_keeps_every_row_and_counts_rejections(tmp_path):
    (tmp_path / "in.txt").write_text("我在北京读书\n" + "很" * 40 + "\n", encoding="utf-8")
    prepared = prepare_input([tmp_path / "in.txt"], tmp_path / "p", format="text")
    out = BatchAnnotator(AnnotatorSpec(name="jieba", steps=("seg",), max_units=20))(_rows(prepared))
    assert [r["id"] for r in out] == ["in.txt:1", "in.txt:2"]
    assert out[0]["n_spans"] > 0 and out[0]["n_rejections"] == 0
    assert json.loads(out[1]["rejections"])[0]["reason"] == REASON_TOO_LONG

    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    (rows_dir / "part.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in out[::-1]))
    summary, duplicates = collect_output(rows_dir, tmp_path / "annotated.jsonl")
    assert duplicates == 0 and summary.sentences == 2
    assert summary.rejections_by_reason == {REASON_TOO_LONG: 1}
    # collected in input order, readable by the training code
    assert [s.id for s in read_dataset(tmp_path / "annotated.jsonl")] == ["in.txt:1", "in.txt:2"]


class _Exploding:
    """An annotator that fails on one sentence and on any batch containing it."""

    def annotate(self, sentences, steps):
        from knowfree_core.annotators.base import AnnotationResult

        if any("炸" in s.text for s in sentences):
            raise RuntimeError("tool crashed")
        return [AnnotationResult(s.id) for s in sentences]


def test_one_bad_sentence_costs_only_itself(tmp_path):
    (tmp_path / "in.txt").write_text("好的\n炸了\n没事\n", encoding="utf-8")
    rows = _rows(prepare_input([tmp_path / "in.txt"], tmp_path / "p", format="text"))
    batch = BatchAnnotator(AnnotatorSpec(name="jieba", steps=("seg",)))
    batch._annotators[0] = _Exploding()  # the first (only) annotator, built by hand
    out = batch(rows)
    reasons = [[r["reason"] for r in json.loads(row["rejections"])] for row in out]
    assert reasons == [[], [REASON_BATCH_FAILED], []]


def _row(i: int, *reasons: str) -> dict:
    rejections = [{"annotator": "llm", "step": "ent", "reason": reason, "detail": f"{reason} #{i % 2}"}
                  for reason in reasons]
    record = json.dumps({"id": f"s{i}", "units": list("好的")}, ensure_ascii=False)
    return {"id": f"s{i}", "order": i, "record": record, "rejections": json.dumps(rejections, ensure_ascii=False),
            "seconds": 0.0}


def _write(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_engine_failed_rows_are_collected_counted_listed_and_checked_against_the_rate(tmp_path):
    rows, failed = tmp_path / "rows", tmp_path / "failed"
    _write(rows, "a.json", [_row(0), _row(2, "not found"), _row(3, "engine error")])
    # s1 set aside twice (a retried batch) and s3 set aside once before it was written
    _write(failed, "x.jsonl", [_row(1, "engine error"), _row(3, "engine error")])
    _write(failed, "y.jsonl", [_row(1, "engine error"), _row(4, "engine error", "not found")])
    listed = tmp_path / "failed.jsonl"
    summary, duplicates = collect_output(rows, tmp_path / "annotated.jsonl", failed, listed)
    assert duplicates == 0 and summary.sentences == 5 and summary.engine_failed_rows == 2
    assert [json.loads(line)["id"] for line in (tmp_path / "annotated.jsonl").read_text().splitlines()] == [
        "s0", "s1", "s2", "s3", "s4"]
    entries = [json.loads(line) for line in listed.read_text().splitlines()]
    assert [e["id"] for e in entries] == ["s1", "s4"]
    assert [[x["reason"] for x in e["errors"]] for e in entries] == [["engine error"], ["engine error"]]
    # content rejections are counted as before; engine errors too
    assert summary.rejections_by_reason == {"ent: not found": 2, "ent: engine error": 3}
    assert "engine failed        2 sentences" in summary.table()

    check_error_rate(listed, 10, 0.2)  # 2 of 10: at the rate, not over it
    with pytest.raises(KnowFreeError) as error:
        check_error_rate(listed, 5, 0.2, "sentences")
    assert str(error.value).startswith("2 of 5 sentences (40.0%) failed through engine errors, more than "
                                       "max_error_rate 0.2; commonest error (1 of them): ent: engine error #1")
    with pytest.raises(KnowFreeError):
        check_error_rate(listed, 1000, 0.0)


def test_more_extension_labels_than_the_limit_is_a_warning_in_the_summary(tmp_path):
    rows = []
    for i in range(4):
        record = {"id": f"s{i}", "units": list("北京"),
                  "extension_spans": [{"start": 0, "end": 2, "label": f"ENT-类型{i % 3}", "source": "llm:ent"},
                                      {"start": 0, "end": 2, "label": "SEG", "source": "llm:seg"}]}
        rows.append({"id": f"s{i}", "order": i, "record": json.dumps(record, ensure_ascii=False), "rejections": "[]"})
    _write(tmp_path / "rows", "a.json", rows)
    summary, _ = collect_output(tmp_path / "rows", tmp_path / "annotated.jsonl")
    assert summary.extension_labels == 4
    summary.check_label_growth(4)
    assert summary.warnings == []
    summary.check_label_growth(3)
    (warning,) = summary.to_dict()["warnings"]
    assert warning.startswith("4 distinct extension labels, more than max_extension_labels 3")
    assert f"warning: {warning}" in summary.table().splitlines()


# -- the token and cost ledger ------------------------------------------------------------


def _tokens(**steps) -> str:
    return json.dumps({step: dict(zip(("prompt_version", "prompt_tokens", "completion_tokens", "requests", "cached"),
                                      values)) for step, values in steps.items()})


def test_rows_tokens_add_up_per_step_with_cached_answers_apart_and_the_cost_arithmetic(tmp_path):
    from knowfree_core.llm.engine import EngineConfig

    rows = [_row(i) for i in range(4)]
    rows[0]["tokens"] = _tokens(ent=("ent-zh-v2", 100, 20, 1, 0), seg=("seg-zh-v2", 80, 10, 1, 0))
    rows[1]["tokens"] = _tokens(ent=("ent-zh-v2", 300, 60, 1, 0), seg=("seg-zh-v2", 0, 0, 0, 1))
    rows[2]["tokens"] = _tokens(ent=("ent-zh-v2", 0, 0, 0, 1), seg=("seg-zh-v2", 0, 0, 0, 1))
    # rows[3]: written before the ledger existed (no tokens column): counts as a sentence only
    _write(tmp_path / "rows", "a.json", rows)
    summary, _ = collect_output(tmp_path / "rows", tmp_path / "annotated.jsonl")
    assert summary.tokens["by_step"] == {
        "ent": {"prompt_version": "ent-zh-v2", "prompt_tokens": 400, "completion_tokens": 80, "requests": 2,
                "cached": 1},
        "seg": {"prompt_version": "seg-zh-v2", "prompt_tokens": 80, "completion_tokens": 10, "requests": 1,
                "cached": 2},
    }
    # every answer asked anew: ent 200/40 per request x 3 answers / 4 sentences, seg 80/10 x 3/4
    assert summary.tokens["per_1000_sentences"] == {"prompt_tokens": 1000 * (150 + 60),
                                                    "completion_tokens": 1000 * (30 + 7.5)}
    assert summary.cost is None and "cost" not in summary.table()
    summary.price(EngineConfig(price_per_million={"input": 2.0, "output": 10.0}, cost_projection_sentences=50_000))
    # this output: 480 prompt and 90 completion tokens
    assert summary.cost["run"] == pytest.approx((480 * 2.0 + 90 * 10.0) / 1e6)
    per_1000 = (210_000 * 2.0 + 37_500 * 10.0) / 1e6
    assert summary.cost["per_1000_sentences"] == pytest.approx(per_1000)
    assert summary.cost["projected"] == {"sentences": 50_000, "cost": round(per_1000 * 50, 2)}
    assert summary.to_dict()["cost"] == summary.cost and summary.to_dict()["tokens"] == summary.tokens
    table = summary.table()
    assert "ent                400 / 80 (2, 1 cached) ent-zh-v2" in table
    assert "for 50,000 sentences" in table


def test_a_step_asked_with_two_prompt_versions_keeps_both(tmp_path):
    rows = [_row(0), _row(1)]
    rows[0]["tokens"] = _tokens(ent=("ent-zh-v1", 10, 1, 1, 0))
    rows[1]["tokens"] = _tokens(ent=("ent-zh-v2", 20, 2, 1, 0))
    _write(tmp_path / "rows", "a.json", rows)
    summary, _ = collect_output(tmp_path / "rows", tmp_path / "annotated.jsonl")
    assert set(summary.tokens["by_step"]) == {"ent@ent-zh-v1", "ent@ent-zh-v2"}


def test_offline_annotators_report_no_tokens(tmp_path):
    from knowfree_core.llm.engine import EngineConfig

    (tmp_path / "in.txt").write_text("我在北京读书\n", encoding="utf-8")
    rows = _rows(prepare_input([tmp_path / "in.txt"], tmp_path / "p", format="text"))
    out = BatchAnnotator(AnnotatorSpec(name="jieba", steps=("seg",)))(rows)
    assert json.loads(out[0]["tokens"]) == {}
    _write(tmp_path / "rows", "a.json", out)
    summary, _ = collect_output(tmp_path / "rows", tmp_path / "annotated.jsonl")
    assert summary.tokens == {"by_step": {}, "per_1000_sentences": None}
    summary.price(EngineConfig(price_per_million={"input": 1.0, "output": 1.0}))
    assert summary.cost["run"] == 0 and summary.cost["per_1000_sentences"] is None


def test_llm_rows_carry_the_servers_usage_and_a_cached_rerun_adds_none(llm_stub, tmp_path):
    from knowfree_core.llm.engine import EngineConfig

    llm_stub.answer = lambda request: '{"entities": [{"entity": "北京", "type": "地点"}]}'
    (tmp_path / "in.txt").write_text("我在北京读书\n北京很大\n我在北京读书\n", encoding="utf-8")
    rows = _rows(prepare_input([tmp_path / "in.txt"], tmp_path / "p", format="text"))
    engine = EngineConfig(kind="openai", model="stub", base_url=llm_stub.base_url, max_retries=0)
    spec = AnnotatorSpec(name="llm", steps=("ent",), options={"engine": engine, "cache": str(tmp_path / "c.sqlite")})
    out = BatchAnnotator(spec)(rows)
    assert llm_stub.count() == 2  # the repeated sentence is asked once
    _write(tmp_path / "rows", "a.json", out)
    summary, _ = collect_output(tmp_path / "rows", tmp_path / "annotated.jsonl")
    ent = summary.tokens["by_step"]["ent"]
    assert (ent["prompt_tokens"], ent["completion_tokens"]) == llm_stub.usage_totals()
    assert (ent["requests"], ent["cached"], ent["prompt_version"]) == (2, 1, "ent-zh-v2")

    again = BatchAnnotator(spec)(rows)
    assert llm_stub.count() == 2
    _write(tmp_path / "rows2", "a.json", again)
    rerun, _ = collect_output(tmp_path / "rows2", tmp_path / "annotated2.jsonl")
    assert rerun.tokens["by_step"]["ent"] | {"cached": 0} == {
        "prompt_version": "ent-zh-v2", "prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cached": 0}
    assert rerun.tokens["by_step"]["ent"]["cached"] == 3 and rerun.tokens["per_1000_sentences"] is None
