"""Name → class registries whose classes are imported only when chosen.

The annotators and the LLM engines each pull in a heavy dependency (LAC's ONNX model,
vllm, openai ...): a registry holds ``"module:Class"`` strings so that choosing one never
imports the others.

An open registry also takes a user's ``"package.module:Class"``. Importing that module runs
its code, so such a plug-in is code the user trusts; what the registry guarantees is that the
value names a subclass of the registry's base class, checked *before* anything is called with
config values (``annotator: os:system`` must not run ``system(command=...)``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import ConfigError


def import_named(target: str, key: str = "class") -> object:
    """What ``"package.module:Name"`` names; a one-line ConfigError naming ``key`` when the
    string is malformed or the module or name is missing. Nothing is called."""
    module_name, colon, class_name = target.partition(":")
    if not colon or not module_name or not class_name.isidentifier():
        raise ConfigError(f"{key}: {target!r} is not 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}: cannot import {module_name!r} for {target!r}: {err}") from None
    if not hasattr(module, class_name):
        raise ConfigError(f"{key}: {module_name} has no {class_name!r}")
    return getattr(module, class_name)


@dataclass(frozen=True)
class LazyRegistry:
    """``targets``: name → ``"module:Class"``.

    what, plural
        How an error names one entry and the list (``"annotator"``, ``"annotators"``).
    open
        Also accept a ``"package.module:ClassName"`` that is not registered: a user's own
        class, plugged in without changing the registry.
    base
        Every resolved class must subclass it (checked before it is constructed).
    key
        The config key that names an entry, for error messages (default: ``what``).
    """

    targets: Mapping[str, str]
    what: str
    plural: str
    open: bool = False
    base: Optional[type] = None
    key: str = ""

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.targets))

    def resolve(self, name: str) -> type:
        """The class registered as ``name``; a ConfigError (a ValueError) naming the known
        ones, or saying why a ``module:Class`` plug-in is refused, otherwise."""
        key = self.key or self.what
        target = self.targets.get(name)
        if target is None and self.open and ":" in name:
            target = name
        if target is None:
            hint = " (or 'package.module:ClassName')" if self.open else ""
            raise ConfigError(
                f"{key}: unknown {self.what} {name!r}; known {self.plural}: {', '.join(self.names())}{hint}"
            )
        found = import_named(target, key)
        base = self.base or object
        if not (isinstance(found, type) and issubclass(found, base)):
            raise ConfigError(
                f"{key}: {name!r} is not a subclass of {base.__module__}.{base.__qualname__}; "
                f"a 'module:Class' {self.what} must be one"
            )
        return found
