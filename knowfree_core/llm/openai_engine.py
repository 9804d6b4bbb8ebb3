"""An engine for any OpenAI-compatible endpoint: OpenAI itself, a vLLM or llama.cpp server, etc.

Retries with back-off on 429, 5xx, timeouts and dropped connections are the ``openai``
client's own (``max_retries``, honouring ``Retry-After``); this module only spreads a batch
over ``max_concurrency`` threads and turns a prompt that still fails into
``Completion(error=...)``.

The API key is read from the environment variable *named* by ``EngineConfig.api_key_env``.
It is never shown by ``repr`` or written into an error message or an answer: a server that
echoes the bearer key back gets it replaced by ``[redacted]`` before anything is cached or stored.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from knowfree_core.errors import ConfigError
from knowfree_core.llm.engine import (
    ChatPrompt, Completion, EngineConfig, GenerationParams, LLMEngine, ResponseSchema, render_plain,
)

log = logging.getLogger(__name__)

#: Sent when a local server needs no key (vLLM accepts any); the client refuses an empty one.
LOCAL_PLACEHOLDER_KEY = "EMPTY"
#: The OpenAI API accepts at most four stop sequences.
_MAX_STOPS = 4
#: Error texts are cut here: a server may answer an error with a whole HTML page.
_MAX_ERROR_CHARS = 500
#: What the key's text becomes in answers and error messages.
REDACTED = "[redacted]"


def is_local_url(url: str | None) -> bool:
    """True for loopback servers (``localhost``, ``127.0.0.0/8``, ``::1``). ``None`` means the
    client's default, the remote OpenAI API."""
    if not url:
        return False
    host = urlparse(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(config: EngineConfig) -> str:
    """The key from the file ``config.api_key_file`` (a mounted secret) when set, else from
    ``os.environ[config.api_key_env]``; a placeholder for loopback servers."""
    if config.api_key_file:
        path = Path(config.api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as error:
            # The path is not secret; the content is, and is never part of a message.
            raise RuntimeError(f"cannot read the API key file {path}: {error.strerror}") from None
        if not key:
            raise RuntimeError(f"the API key file {path} is empty")
        return key
    key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
    if key:
        return key
    if is_local_url(config.base_url):
        return LOCAL_PLACEHOLDER_KEY
    where = config.base_url or "the OpenAI API"
    raise RuntimeError(
        f"no API key for {where}: set the environment variable {config.api_key_env or '<api_key_env>'} "
        "(EngineConfig.api_key_env names it; the key itself never goes into a config file)"
    )


def response_format_of(schema: ResponseSchema) -> dict:
    """The ``response_format`` of a chat request constrained to ``schema`` (the client's
    ``ResponseFormatJSONSchema``): strict, so the server enforces the schema rather than
    taking it as a hint."""
    return {"type": "json_schema",
            "json_schema": {"name": schema.name, "schema": dict(schema.schema), "strict": True}}


class OpenAIEngine(LLMEngine):
    """Chat (or, with ``chat_template: plain``, text) completions from an OpenAI-compatible server."""

    kind = "openai"
    remote = True
    supports_structured_outputs = True

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        from openai import OpenAI  # only when this engine is chosen

        if not config.model:
            raise ValueError("EngineConfig.model must name the served model for the openai engine")
        key = resolve_api_key(config)
        # Kept only to scrub it from answers and error texts (a server may echo headers
        # back); a name-mangled attribute and a custom __repr__ keep it out of casual printing.
        self.__secret = key if key != LOCAL_PLACEHOLDER_KEY else ""
        self._client = OpenAI(
            base_url=config.base_url,
            api_key=key,
            max_retries=config.max_retries,
            timeout=config.timeout_s,
        )
        log.info(
            "openai engine: model=%s base_url=%s key from %s%s",
            config.model,
            config.base_url or "(default)",
            config.api_key_file or f"${config.api_key_env}",
            " (placeholder for a local server)" if not self.__secret else "",
        )

    def __repr__(self) -> str:
        return (
            f"OpenAIEngine(model={self.config.model!r}, base_url={self.config.base_url!r}, "
            f"api_key_env={self.config.api_key_env!r})"
        )

    __str__ = __repr__

    def generate(self, prompts: list[ChatPrompt], params: GenerationParams,
                 schema: ResponseSchema | None = None) -> list[Completion]:
        if not prompts:
            return []
        workers = max(1, min(self.config.max_concurrency, len(prompts)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-engine") as pool:
            # map keeps input order whatever order the answers arrive in.
            completions = list(pool.map(lambda prompt: self._one(prompt, params, schema), prompts))
        failed = sum(not completion.ok for completion in completions)
        if failed:
            log.warning("openai engine: %d of %d prompts failed after retries", failed, len(prompts))
        return completions

    def _one(self, prompt: ChatPrompt, params: GenerationParams, schema: ResponseSchema | None) -> Completion:
        # Only options that are set are sent: some servers reject ``seed: null`` or ``stop: []``.
        options: dict = {"model": self.config.model, "max_tokens": params.max_tokens,
                         "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            options["seed"] = params.seed
        stops = self.stops(params, limit=_MAX_STOPS)
        if stops:
            options["stop"] = stops
        if schema is not None:
            response_format = response_format_of(schema)
            if self._plain:
                # The client's completions.create has no response_format argument; servers that
                # constrain text completions (vLLM) read it from the body all the same.
                options["extra_body"] = {"response_format": response_format}
            else:
                options["response_format"] = response_format
        try:
            if self._plain:
                response = self._client.completions.create(prompt=render_plain(prompt), **options)
                choice = response.choices[0]
                text = choice.text
            else:
                response = self._client.chat.completions.create(messages=prompt, **options)
                choice = response.choices[0]
                text = choice.message.content
            usage = getattr(response, "usage", None)  # optional in the API: some servers omit it
            # Scrubbed here, before generate_cached stores it: answers go to the cache and rows.
            return Completion(text=self._scrub(text or ""), finish_reason=choice.finish_reason,
                              prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                              completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))
        except Exception as exc:  # one prompt's failure must not cost the batch
            return Completion(error=self._describe(exc))

    def check_access(self) -> None:
        """One 1-token request; raises ConfigError for an endpoint that cannot be reached (after
        the client's retries), a wrong key, no permission or an unknown model. A job calls this
        once before dispatching its prompts: those failures would otherwise turn every prompt
        of a 50k-sentence job into a rejection."""
        from openai import APIConnectionError, AuthenticationError, NotFoundError, PermissionDeniedError

        where = self.config.base_url or "the OpenAI API"
        try:
            if self._plain:
                self._client.completions.create(model=self.config.model, prompt="ping", max_tokens=1)
            else:
                self._client.chat.completions.create(
                    model=self.config.model, messages=[{"role": "user", "content": "ping"}], max_tokens=1
                )
        except APIConnectionError as exc:  # timeouts too: nothing answered at all
            attempts = self.config.max_retries + 1
            raise ConfigError(
                f"the openai engine cannot reach {where} ({attempts} attempt{'s' * (attempts > 1)}): "
                f"{self._describe(exc)}; is the server up and base_url right?"
            ) from None
        except (AuthenticationError, PermissionDeniedError, NotFoundError) as exc:
            raise ConfigError(
                f"the openai engine cannot use model {self.config.model!r} at "
                f"{where} (key from ${self.config.api_key_env}): "
                f"{self._describe(exc)}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a busy server (429, 5xx) is the retries' business
            log.warning("openai engine: access check inconclusive: %s", self._describe(exc))

    def _scrub(self, text: str) -> str:
        """``text`` without the API key: every answer and error text passes here."""
        return text.replace(self.__secret, REDACTED) if self.__secret else text

    def _describe(self, exc: BaseException) -> str:
        message = self._scrub(" ".join(str(exc).split()))
        if len(message) > _MAX_ERROR_CHARS:
            message = message[:_MAX_ERROR_CHARS] + "..."
        return f"{type(exc).__name__}: {message}"

    def close(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            client.close()
