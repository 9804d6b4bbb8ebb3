"""Reading a user's YAML file (a config, a prompt template) with one-line errors.

Three things a YAML parser lets through or reports as a traceback are checked here, before
the file's values are used: a syntax error (reported with its line), a document that is not a
mapping (a top-level list or scalar), and an alias bomb ("billion laughs": anchors whose
aliases nest, so a 1 kB file expands to billions of nodes). PyYAML itself shares aliased
nodes, but OmegaConf and every later copy expand them, so the expanded size is what is
bounded. A legitimate config reuses an anchor a few times (bench/quality.yaml) and expands to
a few thousand nodes at most.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

#: Nodes a document may expand to once every alias is replaced by a copy of its anchor.
MAX_EXPANDED_NODES = 100_000


def _expanded_size(root: yaml.Node, path: str | Path) -> int:
    """Nodes of the document with aliases expanded; computed on the shared node graph, once
    per distinct node, so a bomb is measured without being expanded."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:  # an anchor that contains an alias of itself expands forever
            raise ConfigError(f"{path}: a YAML alias refers to an anchor that contains it")
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        on_path.discard(key)
        sizes[key] = total
        return total

    return size(root)


def _syntax_error(path: str | Path, error: yaml.YAMLError, what: str) -> ConfigError:
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return ConfigError(f"{where}: malformed YAML in {what}: {problem}")


def check_yaml_mapping(text: str, path: str | Path, what: str = "config file") -> None:
    """Raise a one-line ConfigError naming ``path`` unless ``text`` is one YAML mapping (or
    empty) of bounded expanded size. Nothing is constructed, so the caller's own loader
    (OmegaConf's, with its own float rules) still reads the values."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise _syntax_error(path, error, what) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: YAML nested too deeply in {what}") from None
    if root is None:
        return
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        raise ConfigError(f"{path}: a {what} must be a YAML mapping of keys, found {kind}")
    try:
        expanded = _expanded_size(root, path)
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply in {what}") from None
    if expanded > MAX_EXPANDED_NODES:
        raise ConfigError(
            f"{path}: YAML aliases expand to {expanded} nodes (limit {MAX_EXPANDED_NODES}); "
            "refusing an alias bomb"
        )


def checked_yaml_text(path: str | Path, what: str = "config file") -> str:
    """The text of the YAML file ``path``, after :func:`check_yaml_mapping`; unreadable or
    non-UTF-8 files are one-line errors too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {what}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what} is not UTF-8 text") from None
    check_yaml_mapping(text, path, what)
    return text


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file's mapping (``{}`` when empty), read with the safe loader once checked."""
    return yaml.safe_load(checked_yaml_text(path, what)) or {}
