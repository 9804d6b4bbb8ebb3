"""The search-space language: ``search_space`` entries checked against the train config before
any trial starts (keys, types, K dividing the grid size), turned into Ray Tune samplers, and a
trial's sampled values applied to the base config."""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import ParamSpec
from knowfree_core.config import KnowFreeConfig, validate_config
from knowfree_core.errors import ConfigError

logger = logging.getLogger("jobs.tune")

# Keys whose change would need other prepared data (the driver prepares it once for all trials).
DATA_KEYS = ("data.", "model.use_extension_labels")


def plain(value: Any) -> Any:
    """numpy scalars (what samplers return) as Python numbers."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def apply_params(base: KnowFreeConfig, params: Mapping[str, Any]) -> KnowFreeConfig:
    """``base`` with the dotted keys of ``params`` set; a wrong key or type is a ConfigError."""
    merged = OmegaConf.structured(base)
    for key, value in params.items():
        try:
            OmegaConf.update(merged, key, plain(value), merge=False)
        except OmegaConfBaseException as error:
            raise ConfigError(f"search_space key {key!r} with value {value!r}: {error}") from error
    try:
        config: KnowFreeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid train config: {error}") from error
    validate_config(config)
    return config


def _candidates(key: str, spec: ParamSpec) -> list[Any]:
    """The values that stand for a sampler when checking keys and types."""
    if spec.type in ("choice", "grid"):
        if not spec.values:
            raise ConfigError(f"search_space.{key}: {spec.type} needs a non-empty 'values' list")
        return list(spec.values)
    if spec.low is None or spec.high is None or spec.low > spec.high:
        raise ConfigError(f"search_space.{key}: {spec.type} needs low <= high")
    if spec.type == "loguniform" and spec.low <= 0:
        raise ConfigError(f"search_space.{key}: loguniform needs low > 0")
    if spec.type == "randint":
        if spec.low != int(spec.low) or spec.high != int(spec.high):
            raise ConfigError(f"search_space.{key}: randint needs integer low and high")
        return [int(spec.low), int(spec.high)]
    return [spec.low, spec.high]


def _values_of(key: str, spec: Optional[ParamSpec], default: int) -> list[int]:
    if spec is None:
        return [default]
    if spec.type == "randint":
        return list(range(int(spec.low), int(spec.high) + 1))  # type: ignore[arg-type]
    if spec.type in ("choice", "grid"):
        return [int(v) for v in spec.values or []]
    raise ConfigError(f"search_space.{key}: an integer that must divide or be divided cannot be {spec.type}")


def constrain_attn_heads(space: Dict[str, ParamSpec], base: KnowFreeConfig) -> Dict[str, ParamSpec]:
    """K (``model.attn_heads``) must divide ``model.grid_size``: a randint K becomes a choice of
    the divisors in its range; choice/grid values that do not divide are refused."""
    heads_key, grid_key = "model.attn_heads", "model.grid_size"
    if heads_key not in space and grid_key not in space:
        return space
    heads_spec, grid_spec = space.get(heads_key), space.get(grid_key)
    grids = _values_of(grid_key, grid_spec, base.model.grid_size)
    space = dict(space)
    if heads_spec is not None and heads_spec.type == "randint" and grid_spec is None:
        grid = grids[0]
        divisors = [k for k in _values_of(heads_key, heads_spec, 0) if k > 0 and grid % k == 0]
        if not divisors:
            raise ConfigError(f"search_space.{heads_key}: no value in [{heads_spec.low}, {heads_spec.high}] "
                              f"divides model.grid_size={grid}")
        logger.info("%s: sampling from the divisors of model.grid_size=%d in range: %s", heads_key, grid, divisors)
        space[heads_key] = ParamSpec(type="choice", values=divisors)
        return space
    heads = _values_of(heads_key, heads_spec, base.model.attn_heads)
    bad = sorted({(g, k) for g in grids for k in heads if k <= 0 or g % k})
    if bad:
        pairs = ", ".join(f"grid_size {g} / attn_heads {k}" for g, k in bad)
        raise ConfigError(f"search_space: model.grid_size must be divisible by model.attn_heads (K), not for: "
                          f"{pairs}; sample K from the divisors of the grid size")
    return space


def check_search_space(space: Dict[str, ParamSpec], base: KnowFreeConfig, search_alg: Optional[str]) -> Dict[str, ParamSpec]:
    """Refuse unknown keys, wrong types, data keys and impossible K before any trial starts."""
    for key, spec in space.items():
        if key.startswith(DATA_KEYS):
            raise ConfigError(f"search_space.{key}: the data is prepared once for every trial; "
                              "search model/encoder/train keys only")
        if search_alg == "optuna" and spec.type == "grid":
            raise ConfigError(f"search_space.{key}: Optuna cannot take grid samplers (use choice)")
        for value in _candidates(key, spec):
            _check_key(base, key, value)
        if spec.type in ("uniform", "loguniform"):
            try:
                _check_key(base, key, 0.5)
            except ConfigError:
                raise ConfigError(f"search_space.{key} is an integer: use randint or choice, not {spec.type}") from None
    space = constrain_attn_heads(space, base)
    for key, spec in space.items():
        if key not in ("model.attn_heads", "model.grid_size"):  # those two are checked together above
            for value in _candidates(key, spec):
                apply_params(base, {key: value})  # e.g. model.decode values, checked by validate_config
    return space


def _check_key(base: KnowFreeConfig, key: str, value: Any) -> None:
    """The key exists in the train config and takes this value's type."""
    merged = OmegaConf.structured(base)
    if OmegaConf.select(merged, key, default=_ABSENT) is _ABSENT:
        raise ConfigError(f"search_space: {key!r} is not a key of the train config")
    try:
        OmegaConf.update(merged, key, value, merge=False)
    except OmegaConfBaseException as error:
        raise ConfigError(f"search_space key {key!r} with value {value!r}: {error}") from error


_ABSENT = object()


def to_param_space(space: Dict[str, ParamSpec]) -> dict[str, Any]:
    from ray import tune

    samplers = {
        "choice": lambda s: tune.choice(list(s.values)),
        "grid": lambda s: tune.grid_search(list(s.values)),
        "uniform": lambda s: tune.uniform(float(s.low), float(s.high)),
        "loguniform": lambda s: tune.loguniform(float(s.low), float(s.high)),
        "randint": lambda s: tune.randint(int(s.low), int(s.high) + 1),  # Tune's high is exclusive
    }
    return {key: samplers[spec.type](spec) for key, spec in space.items()}
