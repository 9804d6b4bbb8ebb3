"""bench/llm_throughput.py on 30 sentences against its endpoint at ~5 ms a request: the table
has the 1×1 and 1×4 jobs.annotate rows, the loop and the ray.data.llm row, each with every
prompt answered once, no rejection and no lost row, and the targets are printed; nothing is
appended without --append. The endpoint's answers parse without a rejection."""

from __future__ import annotations

import pytest

from bench_scripts import load_bench_script, markdown_table_rows
from model_fixtures import tiny_corpus

SENTENCES = 30


def _text_file(tmp_path, count: int, seed: int):
    """``count`` distinct sentences: a repeated one is asked once per batch (the answer cache)."""
    texts = list(dict.fromkeys(s.text for s in tiny_corpus(4 * count, seed=seed, with_extensions=False)))[:count]
    assert len(texts) == count
    path = tmp_path / "sentences.txt"
    path.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    return path


def test_endpoint_answers_every_step_without_rejections():
    endpoint = load_bench_script("llm_endpoint", "bench_llm_endpoint")
    from knowfree_core.llm.parsing import parse_entities, parse_pos, parse_words
    from knowfree_core.prompts import load_prompt

    sentence = "北京是中国的首都。"
    step, seg = endpoint.answer_for(load_prompt("seg", "zh").render(sentence=sentence))
    assert step == "seg" and "".join(parse_words(seg).items) == sentence
    words = parse_words(seg).items
    step, pos = endpoint.answer_for(load_prompt("pos", "zh").render(sentence=sentence, words=words))
    assert step == "pos" and [w for w, _ in parse_pos(pos).items] == words
    step, ent = endpoint.answer_for(load_prompt("ent", "zh").render(sentence=sentence))
    assert step == "ent" and parse_entities(ent).items == [("北京", "地点")]
    assert endpoint.answer_for([{"role": "user", "content": "ping"}]) == ("other", "ok")
    model = endpoint.LatencyModel(base_ms=150, ms_per_token=4, answer_tokens=50)
    assert model.seconds() == pytest.approx(0.35) and model.capacity(64) == pytest.approx(64 / 0.35)
    assert model.seconds(max_tokens=10) == pytest.approx(0.19)


def test_grid_loop_and_ray_data_llm_rows_and_nothing_appended(tmp_path, capsys, ray_cluster):
    bench = load_bench_script("llm_throughput", "bench_llm_throughput")
    data = _text_file(tmp_path, SENTENCES, seed=5)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n", encoding="utf-8")
    default_results = bench.RESULTS.read_bytes()
    argv = ["--data", str(data), "--format", "text", "--sentences", str(SENTENCES), "--grid", "1x1", "1x4",
            "--base-ms", "4", "--ms-per-token", "0.02", "--batch-size", "8", "--ray-data-llm", "1x2",
            "--results", str(results)]
    assert bench.main(argv) == 0
    output = capsys.readouterr().out

    rows = markdown_table_rows(output.split("Setup:")[-1])
    assert list(rows) == ["jobs.annotate 1×1", "jobs.annotate 1×4", "single-process loop, max_concurrency 4",
                          "ray.data.llm HTTP processor 1×2 per step"]
    for row in rows.values():
        assert row["requests"] == str(3 * SENTENCES)  # ent, seg, pos once per sentence: a fresh cache each
        assert float(row["seconds"]) > 0 and float(row["requests/s"]) > 0 and row["% of capacity"].endswith(" %")
        assert row["lost rows"] == "0" and row["rejections"] == "0" and row["429s (absorbed)"] == "0"
    assert rows["jobs.annotate 1×1"]["peak in flight"] == "1"
    assert 1 < int(rows["jobs.annotate 1×4"]["peak in flight"]) <= 4
    assert rows["single-process loop, max_concurrency 4"]["× loop"] == "—"
    assert "ms a request" in output and "capacity" in output
    assert "- best setting (jobs.annotate 1×" in output and ("pass" in output or "FAIL" in output)
    assert "- zero lost rows: 0 lost pass" in output

    assert results.read_text(encoding="utf-8") == "# Results\n"  # no --append: nothing written
    assert bench.RESULTS.read_bytes() == default_results


def test_429s_are_absorbed_and_append_writes_one_section(tmp_path, capsys, ray_cluster):
    """Over the cap (1×4 against a cap of 2) the endpoint sends 429s; the engine's retries
    absorb them (no rejection, no lost row); --append writes one section with the command."""
    bench = load_bench_script("llm_throughput", "bench_llm_throughput")
    data = _text_file(tmp_path, 12, seed=6)
    results = tmp_path / "out" / "RESULTS.md"
    argv = ["--data", str(data), "--format", "text", "--sentences", "12", "--grid", "1x4", "--cap", "2",
            "--retry-after-s", "0.05", "--base-ms", "20", "--ms-per-token", "0", "--batch-size", "8",
            "--no-loop", "--ray-data-llm", "off", "--append", "--results", str(results)]
    assert bench.main(argv) == 0
    capsys.readouterr()
    text = results.read_text(encoding="utf-8")
    assert text.count("\n## ") == 1 and "## LLM annotation throughput against a rate-limited endpoint" in text
    assert "Command: `python bench/llm_throughput.py --data " in text and "--append" in text
    row = markdown_table_rows(text.split("Setup:")[-1])["jobs.annotate 1×4"]
    assert int(row["429s (absorbed)"]) > 0 and row["peak in flight"] == "2"
    assert row["rejections"] == "0" and row["lost rows"] == "0" and row["requests"] == "36"
