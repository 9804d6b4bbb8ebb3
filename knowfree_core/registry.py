"""Name → class registries whose classes are imported only when chosen.

The annotators and the LLM engines each pull in a heavy dependency (LAC's ONNX model,
vllm, openai ...): a registry holds ``"module:Class"`` strings so that choosing one never
imports the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Mapping


def import_class(target: str) -> type:
    """The class named by ``"package.module:ClassName"``."""
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


@dataclass(frozen=True)
class LazyRegistry:
    """``targets``: name → ``"module:Class"``.

    what, plural
        How an error names one entry and the list (``"annotator"``, ``"annotators"``).
    open
        Also accept a ``"package.module:ClassName"`` that is not registered: a user's own
        class, plugged in without changing the registry.
    """

    targets: Mapping[str, str]
    what: str
    plural: str
    open: bool = False

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.targets))

    def resolve(self, name: str) -> type:
        """The class registered as ``name``; ValueError naming the known ones otherwise."""
        target = self.targets.get(name)
        if target is None and self.open and ":" in name:
            target = name
        if target is None:
            hint = " (or 'package.module:ClassName')" if self.open else ""
            raise ValueError(f"unknown {self.what} {name!r}; known {self.plural}: {', '.join(self.names())}{hint}")
        return import_class(target)
