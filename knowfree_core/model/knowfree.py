"""The full KnowFREE model: unit encoder → span head, plus loss, prediction and save/load.

A saved model is a directory that loads without the training code's config files:

    model_dir/
      knowfree.json        model + encoder options, format version
      labels.json          the label vocabulary (targets first, then extension labels)
      head.safetensors     span-head weights
      encoder/             the encoder as a transformers model + tokenizer (+ unit-encoder extras)
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import EncoderConfig, ModelConfig
from ..decoding import decode_spans
from ..encoders.unit_encoder import UnitEncoder
from ..errors import KnowFreeError
from ..labels import LabelVocab
from ..records import Sentence, Span
from ..state_files import load_safetensors, read_json_object, refuse_unknown_keys
from .head import KnowFreeHead, span_grid_mask
from .loss import extension_label_weights, extension_weight_factor, label_weight_vector, span_bce_loss
from .targets import build_span_targets, uncertain_cells

FORMAT_VERSION = 1


def _encoder_options(config: EncoderConfig) -> dict:
    if config.unit_mode == "auto":
        raise ValueError("encoder.unit_mode must be resolved to 'char' or 'word' before building the model")
    return {
        "unit_mode": config.unit_mode,
        "pooling": config.pooling,
        "layers": config.layers,
        "num_layers": config.num_layers,
        "freeze_word_embeddings": config.freeze_word_embeddings,
        "max_length": config.max_length,
        "stride": config.stride,
    }


def _current_model_options(saved: dict) -> dict:
    """A saved manifest's model options in today's names: models saved before
    ``model.alpha_scheme`` existed wrote ``alpha_fixed`` (one α for every extension label),
    which is the ``uniform`` scheme. The weights only matter for training, but loading must work."""
    options = dict(saved)
    fixed = options.pop("alpha_fixed", None)
    if fixed is not None:
        options.update(alpha_scheme="uniform", alpha_scale=fixed)
    return options


_MANIFEST_KEYS = ("format_version", "model", "encoder")


def _manifest_section(path: Path, section: str, schema: type, values: Any, upgrade=dict) -> Any:
    """``schema(**upgrade(values))``; an unknown key or a value the schema refuses is an error
    naming the file (``upgrade`` renames keys older versions wrote)."""
    if isinstance(values, dict):
        values = upgrade(values)
    values = refuse_unknown_keys(path, values, [f.name for f in fields(schema)], section)
    try:
        return schema(**values)
    except (TypeError, ValueError) as error:
        raise KnowFreeError(f"{path}: {section}: {error}") from None


class KnowFreeModel(nn.Module):
    def __init__(self, encoder: UnitEncoder, head: KnowFreeHead, vocab: LabelVocab, config: ModelConfig,
                 encoder_config: EncoderConfig):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.vocab = vocab
        self.config = config
        self.encoder_config = encoder_config
        alphas = extension_label_weights(
            [vocab.target_counts.get(label, 0) for label in vocab.targets],
            [vocab.extension_counts.get(label, 0) for label in vocab.extensions],
            scale=config.alpha_scale,
            scheme=config.alpha_scheme,
            views=vocab.extension_views,
            view_weights=config.view_weights,
            max_weight=config.alpha_max,
        ) if vocab.num_extensions else torch.zeros(0)
        # A buffer so it follows .to(device); not saved, since labels.json holds the counts it
        # is computed from.
        self.register_buffer(
            "label_weights", label_weight_vector(vocab.num_targets, alphas), persistent=False
        )
        #: Fraction of training done (0..1), for ``model.alpha_schedule``; the training loop
        #: sets it from its step count, so a resumed run continues the same schedule.
        self.training_progress = 0.0

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, encoder_config: EncoderConfig, model_config: ModelConfig, vocab: LabelVocab) -> "KnowFreeModel":
        encoder = UnitEncoder(encoder_config.name, **_encoder_options(encoder_config))
        head = cls._build_head(encoder.hidden_size, len(vocab), model_config)
        return cls(encoder, head, vocab, model_config, encoder_config)

    @staticmethod
    def _build_head(hidden_size: int, num_labels: int, config: ModelConfig) -> KnowFreeHead:
        return KnowFreeHead(
            hidden_size=hidden_size,
            num_labels=num_labels,
            ffn_size=config.ffn_size,
            grid_size=config.grid_size,
            biaffine_heads=config.biaffine_heads,
            window=config.window,
            attn_heads=config.attn_heads,
            use_local_attention=config.use_local_attention,
            grid_mixer=config.grid_mixer,
            cnn_depth=config.cnn_depth,
            dropout=config.dropout,
            output_prior=config.output_prior,
            input_norm=config.input_norm,
            max_span_length=config.max_span_length,
        )

    # ------------------------------------------------------------------ forward / loss
    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def forward(self, units_batch: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.encoder.collate(units_batch)
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        encoded = self.encoder(inputs)
        return self.head(encoded.hidden, encoded.mask), encoded.mask

    def loss(self, batch: Sequence[Sentence]) -> torch.Tensor:
        logits, mask = self([s.units for s in batch])
        targets = build_span_targets(
            batch,
            logits.shape[1],
            self.vocab.id,
            self.vocab.num_targets,
            len(self.vocab),
            include_extensions=self.vocab.num_extensions > 0,
            max_span_length=self.config.max_span_length,
            device=logits.device,
        ).targets
        weight_of = {"gold": 1.0, "synthetic": self.config.beta, "pseudo": self.config.beta_unlabeled}
        sample_weights = torch.tensor([weight_of[s.sample_kind] for s in batch], device=logits.device)
        cell_mask = span_grid_mask(mask, self.config.max_span_length)
        return span_bce_loss(logits, targets, cell_mask, self.current_label_weights(), sample_weights,
                             unknown_cells=uncertain_cells(batch, logits.shape[1], device=logits.device),
                             num_target_labels=self.vocab.num_targets)

    def current_label_weights(self) -> torch.Tensor:
        """The loss's column weights now: targets 1, extension labels α_i times the schedule's
        factor at ``training_progress`` (set by the training loop before every step)."""
        factor = extension_weight_factor(self.config.alpha_schedule, self.training_progress)
        if factor == 1.0:
            return self.label_weights
        scale = torch.ones_like(self.label_weights)
        scale[self.vocab.num_targets:] = factor
        return self.label_weights * scale

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def iter_target_logits(
        self, units: Sequence[Sequence[str]], batch_size: int = 32, progress: bool = False
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(index, logits)`` for every non-empty unit list, one batch at a time, shortest
        first: ``logits`` is its ``(n, n, N_tgt)`` target-label grid on the CPU.

        Sorting by length keeps a batch's padding (an L x L grid per sentence) small; a caller
        that reduces each grid to spans at once holds one batch of grids, not all of them.
        Extension columns are cut off here: no external knowledge reaches inference.
        """
        was_training = self.training
        self.eval()
        order = [i for i in sorted(range(len(units)), key=lambda i: len(units[i])) if units[i]]
        try:
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="predict", disable=not progress, leave=False):
                index = order[start : start + batch_size]
                logits, _ = self([units[i] for i in index])
                logits = logits[..., : self.vocab.num_targets].float().cpu()
                for row, i in enumerate(index):
                    n = len(units[i])
                    yield i, logits[row, :n, :n]
        finally:
            self.train(was_training)

    def target_logits(
        self, sentences: Sequence[Sentence] | Sequence[Sequence[str]], batch_size: int = 32, progress: bool = False
    ) -> list[torch.Tensor]:
        """Per sentence, in input order, the ``(n, n, N_tgt)`` logits of its target labels (on
        the CPU); see :meth:`iter_target_logits`."""
        units = [s.units if isinstance(s, Sentence) else list(s) for s in sentences]
        results: list[torch.Tensor] = [torch.zeros(0, 0, self.vocab.num_targets) for _ in units]
        for i, logits in self.iter_target_logits(units, batch_size, progress):
            results[i] = logits
        return results

    def decode(self, logits: Sequence[torch.Tensor], threshold: float | None = None) -> list[list[Span]]:
        threshold = self.config.threshold if threshold is None else threshold
        return [
            decode_spans(sentence_logits, self.vocab.targets, threshold=threshold, nested=self.config.decode == "nested",
                         max_span_length=self.config.max_span_length) if sentence_logits.numel() else []
            for sentence_logits in logits
        ]

    def predict(
        self, sentences: Sequence[Sentence] | Sequence[Sequence[str]], batch_size: int = 32, progress: bool = False
    ) -> list[list[Span]]:
        """Target spans for each sentence."""
        return self.decode(self.target_logits(sentences, batch_size, progress))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory / "encoder")
        save_file({k: v.contiguous().cpu() for k, v in self.head.state_dict().items()}, directory / "head.safetensors")
        self.vocab.save(directory / "labels.json")
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": asdict(self.config),
            "encoder": asdict(self.encoder_config),
        }
        (directory / "knowfree.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "KnowFreeModel":
        directory = Path(directory)
        manifest_path = directory / "knowfree.json"
        if not manifest_path.is_file():
            raise KnowFreeError(f"{directory} is not a KnowFREE model directory (no knowfree.json)")
        manifest = read_json_object(manifest_path, _MANIFEST_KEYS)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise KnowFreeError(
                f"{manifest_path}: format_version {manifest.get('format_version')} is not supported "
                f"(this version reads {FORMAT_VERSION})"
            )
        model_config = _manifest_section(manifest_path, "model", ModelConfig, manifest.get("model", {}),
                                         _current_model_options)
        encoder_config = _manifest_section(manifest_path, "encoder", EncoderConfig, manifest.get("encoder", {}))
        # The saved encoder directory carries its own options (depth already truncated, layers,
        # pooling, unit mode) and weights, including the learned layer mix.
        encoder = UnitEncoder.from_pretrained(directory / "encoder")
        vocab = LabelVocab.load(directory / "labels.json")
        head = cls._build_head(encoder.hidden_size, len(vocab), model_config)
        head.load_state_dict(load_safetensors(directory / "head.safetensors"))
        model = cls(encoder, head, vocab, model_config, encoder_config)
        return model.to(device).eval()
