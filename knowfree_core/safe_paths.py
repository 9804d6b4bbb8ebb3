"""Names from configs that become file or folder names stay inside the folder they name into.

A run folder is chosen by the user (``output_dir``); everything a job writes lies under it.
Some config values become path components below it -- dataset names of the quality harness,
Ray Train and Tune run names, prompt languages and steps -- and a value such as ``../../etc``
or ``/tmp/x`` would otherwise write (or read) outside. These helpers refuse such values with a
:class:`ConfigError` naming the key. (No library does this check for plain folders: Python's
``tarfile`` data filter only covers archive members.)
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError

# Letters (any script), digits, _ first; then also . = + -; no separators, so no "../" and no "/x".
_PLAIN_NAME = re.compile(r"^\w[\w.=+-]*$")


def plain_name(value: object, what: str) -> str:
    """``value`` as one path component, or a ConfigError naming ``what`` (the config key)."""
    text = str(value)
    # The pattern already refuses "", a leading dot and any separator.
    if not _PLAIN_NAME.match(text) or len(text) > 128:
        raise ConfigError(
            f"{what}: {text!r} is not a plain name; use letters, digits and . _ = + - "
            "(no path separators, no leading dot, at most 128 characters)"
        )
    return text


def child_path(root: str | Path, name: object, what: str) -> Path:
    """``root / name`` for a plain ``name``; the result is checked to lie inside ``root``."""
    return inside(root, plain_name(name, what), what)


def inside(root: str | Path, path: str | Path, what: str) -> Path:
    """``path`` resolved (a relative one against ``root``), if it lies inside ``root``.

    Symbolic links are followed, so a link in the run folder that points elsewhere is refused.
    """
    base = Path(root).resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{what}: {str(path)!r} lies outside the run folder {str(base)!r}")
    return resolved
