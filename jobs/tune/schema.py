"""The tune job's config (``TuneJobConfig``, loaded from YAML plus ``--set``): what is searched,
how trials are scheduled and sampled, and what each trial holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from omegaconf import MISSING

from ..common import RayConfig
from knowfree_core.config import load_structured
from knowfree_core.errors import ConfigError

Sampler = Literal["choice", "grid", "uniform", "loguniform", "randint"]


@dataclass
class ParamSpec:
    """One searched key: ``choice``/``grid`` take ``values``; ``uniform``/``loguniform`` and
    ``randint`` (integers, both ends included) take ``low`` and ``high``."""

    type: Sampler = MISSING
    values: Optional[List[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None


@dataclass
class SchedulerConfig:
    name: Literal["asha", "fifo"] = "asha"
    metric: str = "dev_f1"  # reported after every epoch
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0
    max_t: Optional[int] = None  # None: train.epochs of the base config


@dataclass
class TrialResources:
    """What a ``function`` trial holds (torch threads = cpu unless train.num_threads is set)."""

    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class TuneJobConfig:
    train_config: str = MISSING
    train_overrides: List[str] = field(default_factory=list)
    output_dir: str = MISSING
    search_space: Dict[str, ParamSpec] = field(default_factory=dict)
    num_samples: int = 4  # with grid samplers: samples per grid point
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search_alg: Optional[Literal["optuna"]] = None  # None: random or grid search
    seed: Optional[int] = 0  # of the sampler (random search or Optuna)
    max_concurrent_trials: Optional[int] = None  # None: as many as the resources allow
    resources_per_trial: TrialResources = field(default_factory=TrialResources)
    trial_runner: Literal["function", "ray_train"] = "function"
    driver_cpu: float = 0.2  # ray_train: CPU of each trial's driver function (0 is refused by Tune)
    checkpoints_to_keep: int = 1  # per trial; the last one holds the best-dev weights too
    ray: RayConfig = field(default_factory=RayConfig)


def load_tune_config(path: str | Path | None, overrides: list[str] | None = None) -> TuneJobConfig:
    config: TuneJobConfig = load_structured(TuneJobConfig, path, overrides)
    if config.num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1, got {config.num_samples}")
    if not config.search_space:
        raise ConfigError("search_space is empty: name at least one config key to search")
    return config
