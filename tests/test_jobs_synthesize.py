"""jobs.synthesize on a local Ray cluster against a loopback OpenAI-compatible server: an
engine actor killed mid-job (SIGKILL, as an OOM kill) costs no source sentence and duplicates
none, and the summary counts the restart; a rerun does no work; changed settings are refused."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from knowfree_core.errors import ConfigError
from llm_stub_server import StubReply
from knowfree_core.formats import write_dataset

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
from jobs.synthesize import load_job_config, run_synthesis  # noqa: E402
from model_fixtures import tiny_corpus  # noqa: E402


def _process_of_client(port: int) -> int | None:
    """The pid holding the loopback connection whose local port is ``port``."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.pid:
            return connection.pid
    return None


def _config(tmp_path: Path, base_url: str, *overrides: str):
    return load_job_config(None, [
        f"input=[{tmp_path / 'train.jsonl'}]", f"output_dir={tmp_path / 'job'}", "engine.kind=openai",
        "engine.model=stub", f"engine.base_url={base_url}", "engine.max_retries=0", "engine.max_concurrency=1",
        "pool.num_actors=1", "pool.cpus_per_actor=0.5", "pool.batch_size=4", *overrides,
    ])


def test_killed_synthesis_actor_loses_and_duplicates_no_source(ray_cluster, llm_stub, tmp_path):
    sources = tiny_corpus(24, seed=4)
    write_dataset(sources, tmp_path / "train.jsonl")
    killed: list[int] = []
    lock = threading.Lock()

    def answer(request):
        with lock:
            # the 10th prompt: kill the actor that sent it, once (the ping check comes first)
            if not killed and len(llm_stub.requests) >= 10 and request.prompt_text != "ping":
                pid = _process_of_client(request.client_port)
                if pid and pid != os.getpid():
                    killed.append(pid)
                    os.kill(pid, signal.SIGKILL)
        return f"续写：{request.prompt_text[-12:-4]}后来发生了很多事情。大家都很高兴。"

    llm_stub.answer = answer
    summary = run_synthesis(_config(tmp_path, llm_stub.base_url))
    assert killed, "the actor was supposed to be killed once"
    assert summary["sources"] == len(sources) and summary["duplicate_rows_dropped"] == 0
    assert summary["actor_restarts"] >= 1
    rows = [json.loads(line) for path in (tmp_path / "job" / "rows").glob("*.json")
            for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(row["id"] for row in rows) == sorted(s.id for s in sources)  # each source exactly once
    synthetic = [json.loads(line) for line in (tmp_path / "job" / "synthetic.jsonl").read_text(encoding="utf-8").splitlines()]
    assert synthetic and all(record["synthetic"] for record in synthetic)
    assert {record["id"].split("#syn")[0] for record in synthetic} <= {s.id for s in sources}

    # the same command again: nothing is asked (only the access check), the output is kept
    asked = len(llm_stub.requests)
    again = run_synthesis(_config(tmp_path, llm_stub.base_url))
    assert again["synthetic_sentences"] == summary["synthetic_sentences"]
    assert [r.prompt_text for r in llm_stub.requests[asked:]] == ["ping"]
    with pytest.raises(ConfigError, match="generation.temperature"):
        run_synthesis(_config(tmp_path, llm_stub.base_url, "generation.temperature=0.2"))


def test_a_bad_engine_fails_in_the_driver_without_loading_a_model(tmp_path):
    """A missing local model is named without loading anything (the old probe built the
    engine, loading the model in the driver); an endpoint that is down is named too."""
    write_dataset(tiny_corpus(4, seed=4), tmp_path / "train.jsonl")
    with pytest.raises(ConfigError, match=r"^engine\.model: no model folder"):
        run_synthesis(_config(tmp_path, "http://unused", "engine.kind=transformers",
                              f"engine.model={tmp_path / 'no-model'}"))
    with pytest.raises(ConfigError, match=r"cannot reach http://127\.0\.0\.1:9/v1"):
        run_synthesis(_config(tmp_path, "http://127.0.0.1:9/v1"))
    assert not (tmp_path / "job" / "input").exists()


def test_engine_failed_sources_under_max_error_rate_pass_and_are_asked_again(ray_cluster, llm_stub, tmp_path):
    """2 of 8 sources get 500s, under max_error_rate 0.5: the run ends (exit 0) with them
    counted and listed, not done; the same command asks exactly their prompts again."""
    sources = tiny_corpus(8, seed=5)
    write_dataset(sources, tmp_path / "train.jsonl")
    failing = {s.text for s in sources[:2]}
    healthy = [False]

    def answer(request):
        if not healthy[0] and any(text in request.prompt_text for text in failing):
            return StubReply(status=500, text="overloaded")
        return f"续写：{request.prompt_text[-12:-4]}后来发生了很多事情。"

    llm_stub.answer = answer
    config = _config(tmp_path, llm_stub.base_url, "max_error_rate=0.5")
    summary = run_synthesis(config)
    job = tmp_path / "job"
    assert summary["engine_failed_rows"] == 2 and summary["sources"] == 8
    entries = [json.loads(line) for line in (job / "failed.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(entry["id"] for entry in entries) == sorted(s.id for s in sources[:2])
    # each listed row says why: its engine errors with their reason and detail
    assert all(entry["errors"] and all(e["reason"] == "engine error" and "overloaded" in e["detail"]
                                       for e in entry["errors"]) for entry in entries)
    done = [json.loads(line)["id"] for path in (job / "rows").glob("*.json")
            for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(done) == sorted(s.id for s in sources[2:])

    before = len(llm_stub.requests)
    healthy[0] = True
    again = run_synthesis(config)
    rerun = [r.prompt_text for r in llm_stub.requests[before:] if r.prompt_text != "ping"]
    assert len(rerun) == 2 and all(any(text in p for text in failing) for p in rerun)
    assert again["engine_failed_rows"] == 0 and again["written_this_run"] == 2
    done = [json.loads(line)["id"] for path in (job / "rows").glob("*.json")
            for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(done) == sorted(s.id for s in sources)
    assert (job / "failed.jsonl").read_text(encoding="utf-8") == ""
    # the ledger: the server's usage of every answered prompt (the failed ones reported none)
    answered = [r.usage for r in llm_stub.requests if r.usage and r.prompt_text != "ping"]
    steps = again["tokens"]["by_step"]
    assert set(steps) <= {"exp", "ext"} and sum(s["requests"] for s in steps.values()) == len(answered) == 8
    assert sum(s["prompt_tokens"] for s in steps.values()) == sum(u["prompt_tokens"] for u in answered)
    assert sum(s["completion_tokens"] for s in steps.values()) == sum(u["completion_tokens"] for u in answered)
    assert again["cost"] is None  # no price given
