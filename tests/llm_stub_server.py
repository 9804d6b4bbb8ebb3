"""A real OpenAI-compatible HTTP server on loopback, for engine tests without a model.

Serves ``POST /v1/chat/completions`` and ``POST /v1/completions``. What it answers is chosen
by ``server.answer``, a function of the request returning either the answer text or a
:class:`StubReply` (an HTTP error, a delay, a finish reason). ``StubRequest.attempt`` counts
how often the same prompt came before, so "429 first, then 200" is one line::

    server.answer = lambda r: StubReply(status=429) if r.attempt == 1 else "ok"

Every request is recorded in ``server.requests`` (path, JSON body, the Authorization header,
the ``usage`` answered) so tests can count requests, check that the key was sent and add up
the tokens reported. Usage defaults to one token per character of the prompt text and of the
answer, so different prompts report different counts.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union


@dataclass
class StubRequest:
    path: str
    body: dict[str, Any]
    authorization: str | None
    #: 1 for the first request with this prompt, 2 for its first retry, ...
    attempt: int = 1
    #: The client's TCP port on loopback (tests find the client process from it).
    client_port: int | None = None
    #: The ``usage`` object of the 200 reply (None: an error reply, or no usage sent).
    usage: dict[str, int] | None = None

    @property
    def prompt_text(self) -> str:
        """The last user message (chat) or the prompt text (completions)."""
        if "messages" in self.body:
            users = [m.get("content", "") for m in self.body["messages"] if m.get("role") == "user"]
            return users[-1] if users else ""
        prompt = self.body.get("prompt", "")
        return prompt if isinstance(prompt, str) else json.dumps(prompt)

    @property
    def prompt_key(self) -> str:
        return json.dumps(self.body.get("messages", self.body.get("prompt")), sort_keys=True, ensure_ascii=False)


@dataclass
class StubReply:
    """A scripted reply. ``status != 200`` sends an OpenAI-style error body (``text``, if
    given, is its message); ``delay_s`` sleeps first (to trigger client timeouts)."""

    text: str = ""
    status: int = 200
    delay_s: float = 0.0
    finish_reason: str = "stop"
    #: Error replies default to ``retry-after-ms: 10`` so client retries are fast in tests.
    headers: dict[str, str] = field(default_factory=dict)
    #: Close the connection without any response (a crashed or restarted server).
    drop_connection: bool = False
    #: The reply's usage counts; None: one per character of the prompt text / answer.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Send no ``usage`` at all (servers that do not report it).
    no_usage: bool = False


Answer = Union[str, StubReply]
AnswerFn = Callable[[StubRequest], Answer]


def answers_from_map(mapping: dict[str, Answer], default: Answer = "") -> AnswerFn:
    """An answer function looking up the last user message (or plain prompt) in ``mapping``;
    for plain prompts a key matches when it is contained in the prompt text."""

    def answer(request: StubRequest) -> Answer:
        text = request.prompt_text
        if text in mapping:
            return mapping[text]
        if "prompt" in request.body:
            for key, value in mapping.items():
                if key in text:
                    return value
        return default

    return answer


def echo(request: StubRequest) -> Answer:
    return f"echo: {request.prompt_text}"


class StubLLMServer:
    def __init__(self, answer: AnswerFn | dict[str, Answer] | None = None, model: str = "stub-model"):
        self.model = model
        self.answer = answer  # type: ignore[assignment]  # via the property below
        self.requests: list[StubRequest] = []
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        # Do not wait for handlers still sleeping in a slow reply when the server closes.
        self._httpd.block_on_close = False
        # A short poll interval makes shutdown (each test's teardown) quick.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="llm-stub", daemon=True)
        self._thread.start()

    @property
    def answer(self) -> AnswerFn:
        return self._answer

    @answer.setter
    def answer(self, value: AnswerFn | dict[str, Answer] | None) -> None:
        if value is None:
            value = echo
        elif isinstance(value, dict):
            value = answers_from_map(value)
        self._answer = value

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def authorizations(self) -> list[str | None]:
        with self._lock:
            return [request.authorization for request in self.requests]

    def usage_totals(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens) over every usage answered."""
        with self._lock:
            answered = [request.usage for request in self.requests if request.usage]
        return (sum(u["prompt_tokens"] for u in answered), sum(u["completion_tokens"] for u in answered))

    def count(self, path: str | None = None) -> int:
        with self._lock:
            return sum(path is None or request.path == path for request in self.requests)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._attempts.clear()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "StubLLMServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- called by the handler threads -------------------------------------------------

    def _record(self, path: str, body: dict, authorization: str | None, client_port: int | None = None) -> StubRequest:
        request = StubRequest(path=path, body=body, authorization=authorization, client_port=client_port)
        with self._lock:
            request.attempt = self._attempts.get(request.prompt_key, 0) + 1
            self._attempts[request.prompt_key] = request.attempt
            self.requests.append(request)
        return request

    def _response(self, request: StubRequest, reply: StubReply) -> dict[str, Any]:
        prompt = len(request.prompt_text) if reply.prompt_tokens is None else reply.prompt_tokens
        completion = len(reply.text) if reply.completion_tokens is None else reply.completion_tokens
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        created = int(time.time())
        if request.path.endswith("/chat/completions"):
            response = {
                "id": "chatcmpl-stub", "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason, "logprobs": None}],
            }
        else:
            response = {
                "id": "cmpl-stub", "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None}],
            }
        if not reply.no_usage:
            response["usage"] = usage
            with self._lock:
                request.usage = usage
        return response


def _make_handler(server: StubLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet; never log headers
            pass

        def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout): nothing to answer

        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self._send(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
                return
            path = self.path.split("?")[0]
            if not path.endswith(("/chat/completions", "/completions")):
                self._send(404, {"error": {"message": f"no route {path}", "type": "not_found"}})
                return
            request = server._record(path, body, self.headers.get("Authorization"), self.client_address[1])
            reply = server.answer(request)
            if isinstance(reply, str):
                reply = StubReply(text=reply)
            if reply.delay_s:
                time.sleep(reply.delay_s)
            if reply.drop_connection:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if reply.status != 200:
                headers = {"retry-after-ms": "10", **reply.headers}
                error = {"error": {"message": reply.text or f"stub error {reply.status}", "type": "server_error",
                                   "code": reply.status}}
                self._send(reply.status, error, headers)
                return
            self._send(200, server._response(request, reply), reply.headers)

    return Handler
