"""A loopback OpenAI-compatible endpoint with a latency model and a concurrency cap, for
bench/llm_throughput.py: what a hosted LLM looks like from a job, without a model.

    python bench/llm_endpoint.py [--cap 64] [--base-ms 150] [--ms-per-token 4] [--answer-tokens 50]

Every ``POST /v1/chat/completions`` is answered after ``base_ms + ms_per_token × tokens``
(``tokens``: ``answer_tokens``, or the request's ``max_tokens`` when smaller), with an answer
the knowfree parsers read without a rejection for the step its prompt asks (the zh prompts of
prompts/zh: P_ent, P_seg, P_pos). More than ``cap`` requests in flight get HTTP 429 with
``Retry-After``, as a rate-limited API does. ``GET /stats`` counts the answers by step, the
429s, the peak in flight and the first and last second of traffic; ``POST /stats/reset``
zeroes them.

tests/llm_stub_server.py is not reused: it is a test helper that records every request body,
answers on a thread per connection without keep-alive and cannot count what is in flight. This
server runs in a process of its own (:class:`Endpoint`), so its work never competes for the
GIL with the single-process loop it is measured against; aiohttp serves hundreds of sleeping
requests on one thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional

#: The steps whose answers this endpoint writes; anything else (the jobs' one-token preflight
#: request) is answered "ok" and counted as "other".
STEPS = ("ent", "seg", "pos")


@dataclass(frozen=True)
class LatencyModel:
    """Seconds per request and the endpoint's capacity (requests/s) at a concurrency cap."""

    base_ms: float = 150.0
    ms_per_token: float = 4.0
    #: Tokens charged for every answer (what a real model's answers to these prompts average).
    answer_tokens: int = 50

    def seconds(self, max_tokens: Optional[int] = None) -> float:
        tokens = self.answer_tokens if not max_tokens else min(self.answer_tokens, max_tokens)
        return (self.base_ms + self.ms_per_token * tokens) / 1000.0

    def capacity(self, cap: int) -> float:
        """Requests/s with ``cap`` requests always in flight, each taking :meth:`seconds`."""
        return cap / self.seconds()


# ----------------------------------------------------------------------------- the answers
def _field(text: str, label: str) -> Optional[str]:
    """The rest of the prompt line that starts with ``label`` (the zh prompts end with
    ``输入：<sentence>`` and P_pos with ``分词：<words as JSON>``)."""
    for line in text.splitlines():
        if line.startswith(label):
            return line[len(label):]
    return None


def _words(sentence: str) -> list[str]:
    """Two-character words: they join back to the sentence, as P_seg asks."""
    return [sentence[i:i + 2] for i in range(0, len(sentence), 2)]


def answer_for(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(step, answer text) for a chat prompt of the zh templates: every answer aligns with its
    sentence (the entity and the words are cut from it), so a run has no rejections."""
    text = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    sentence = _field(text, "输入：")
    if sentence is None:
        return "other", "ok"
    words = _field(text, "分词：")
    if words is not None:  # P_pos: a tag for each word it was given
        return "pos", json.dumps([{"word": w, "pos": "n"} for w in json.loads(words)], ensure_ascii=False)
    if "entity" in text:  # P_ent asks for {entity, type} objects
        entities = [{"entity": sentence[:2], "type": "地点"}] if sentence.strip() else []
        return "ent", json.dumps(entities, ensure_ascii=False)
    return "seg", json.dumps(_words(sentence), ensure_ascii=False)


# ----------------------------------------------------------------------------- the server
class _Counters:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.answered = {step: 0 for step in (*STEPS, "other")}
        self.rejected_429 = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.first = self.last = None  # time.time() of the first prompt and of the last answer to one

    def to_dict(self) -> dict[str, Any]:
        return {"answered": self.answered, "rejected_429": self.rejected_429, "peak_in_flight": self.peak_in_flight,
                "in_flight": self.in_flight, "first": self.first, "last": self.last}


def make_app(model: LatencyModel, cap: int, retry_after_s: float):
    from aiohttp import web

    counters = _Counters()

    async def chat(request: "web.Request") -> "web.Response":
        # One event loop thread: the counters need no lock.
        body = await request.json()
        step, text = answer_for(body.get("messages", []))
        if step != "other":  # traffic starts with the first prompt, not with the jobs' preflight
            counters.first = counters.first or time.time()
        if counters.in_flight >= cap:
            counters.rejected_429 += 1
            # Whole seconds by default, as HTTP defines it; the openai client also reads fractions
            # (what the tests use to stay fast).
            return web.json_response(
                {"error": {"message": "rate limited: too many requests in flight", "type": "rate_limit_error",
                           "code": 429}},
                status=429, headers={"Retry-After": f"{retry_after_s:g}"})
        counters.in_flight += 1
        counters.peak_in_flight = max(counters.peak_in_flight, counters.in_flight)
        try:
            await asyncio.sleep(model.seconds(body.get("max_tokens")))
        finally:
            counters.in_flight -= 1
        counters.answered[step] += 1
        if step != "other":
            counters.last = time.time()
        return web.json_response({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "bench"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": 0, "completion_tokens": model.answer_tokens,
                      "total_tokens": model.answer_tokens},
        })

    async def stats(request: "web.Request") -> "web.Response":
        return web.json_response(counters.to_dict())

    async def reset(request: "web.Request") -> "web.Response":
        counters.reset()
        return web.json_response(counters.to_dict())

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", reset)
    return app


async def _serve(model: LatencyModel, cap: int, retry_after_s: float, port: int) -> None:
    from aiohttp import web

    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    # A backlog above any client count: refused connections would be errors no 429 explains.
    sock.listen(4096)
    runner = web.AppRunner(make_app(model, cap, retry_after_s), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=4096).start()
    print(f"listening on {sock.getsockname()[1]}", flush=True)  # what Endpoint waits for
    await asyncio.Event().wait()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="default: any free port (printed)")
    parser.add_argument("--cap", type=int, default=64, help="requests in flight before 429s (default 64)")
    parser.add_argument("--base-ms", type=float, default=150.0)
    parser.add_argument("--ms-per-token", type=float, default=4.0)
    parser.add_argument("--answer-tokens", type=int, default=50)
    parser.add_argument("--retry-after-s", type=float, default=1.0, help="the 429s' Retry-After (default 1 s)")
    args = parser.parse_args(argv)
    model = LatencyModel(args.base_ms, args.ms_per_token, args.answer_tokens)
    try:
        asyncio.run(_serve(model, args.cap, args.retry_after_s, args.port))
    except KeyboardInterrupt:
        pass
    return 0


# ----------------------------------------------------------------------------- the client side
class Endpoint:
    """The server in a subprocess: ``base_url`` for the engine, ``stats()`` and ``reset()``."""

    def __init__(self, model: LatencyModel, cap: int, retry_after_s: float = 1.0):
        self.model, self.cap = model, cap
        command = [sys.executable, __file__, "--cap", str(cap), "--base-ms", str(model.base_ms),
                   "--ms-per-token", str(model.ms_per_token), "--answer-tokens", str(model.answer_tokens),
                   "--retry-after-s", str(retry_after_s)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self._process.stdout.readline()
        if not line.startswith("listening on "):
            self.close()
            raise RuntimeError(f"the bench endpoint did not start: {line!r}")
        self.port = int(line.split()[-1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _call(self, path: str, method: str = "GET") -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                         data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return self._call("/stats")

    def reset(self) -> dict[str, Any]:
        return self._call("/stats/reset", "POST")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
