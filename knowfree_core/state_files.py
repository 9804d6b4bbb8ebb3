"""Reading the files the project writes for itself (checkpoints, model folders) without
unpickling code.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only. Weights are safetensors. A file that holds anything else -- a pickle of an
arbitrary object, a pickle under a ``.safetensors`` name, a truncated write -- is a one-line
:class:`KnowFreeError` naming the file, never a traceback and never code that runs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import KnowFreeError

#: What torch.load raises for a file it refuses (forbidden global: UnpicklingError), a file that
#: is no zip/pickle at all (RuntimeError, UnpicklingError) or an empty or cut-off one (EOFError).
_TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError)


def _reason(error: BaseException) -> str:
    # torch's refusal is a paragraph; the line naming the forbidden global is the useful one.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line.lower().split()]
    return (named or lines or [f"{type(error).__name__} (empty or truncated file)"])[0][:300]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict saved by ``torch.save`` in ``path``, read with ``weights_only=True``."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except _TORCH_LOAD_ERRORS as error:
        raise KnowFreeError(
            f"{path}: not a knowfree checkpoint (refusing to unpickle arbitrary objects): {_reason(error)}"
        ) from None
    if not isinstance(data, dict):
        raise KnowFreeError(f"{path}: not a knowfree checkpoint (holds a {type(data).__name__}, not a dict)")
    return data


def check_safetensors(path: str | Path) -> None:
    """Read only the header of ``path``: a pickle or any other file under a ``.safetensors``
    name is an error naming it, before a loader that would print a traceback sees it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise KnowFreeError(f"{path}: not a safetensors file ({error})") from None


def check_safetensors_in(folder: str | Path) -> None:
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``; a file that is no safetensors file is one line naming it (the
    loader reads the header itself, so it is not opened twice)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise KnowFreeError(f"{path}: not a safetensors file ({error})") from None


def read_json_object(path: str | Path, known: Iterable[str]) -> dict[str, Any]:
    """A JSON object whose keys are all in ``known``; a one-line error naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KnowFreeError(f"{path}: not valid JSON ({error})") from None
    return refuse_unknown_keys(path, data, known)


def refuse_unknown_keys(path: str | Path, data: Any, known: Iterable[str], section: str = "") -> dict[str, Any]:
    """``data`` when it is a mapping with only ``known`` keys; else an error naming the file and
    the ``section.key`` (an unknown key means a newer or hand-edited file whose meaning this
    version would silently drop)."""
    where = f"{section}: " if section else ""
    if not isinstance(data, dict):
        raise KnowFreeError(f"{path}: {where}expected a JSON object, found {type(data).__name__}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{section}." if section else ""
        names = ", ".join(repr(prefix + key) for key in unknown)
        raise KnowFreeError(f"{path}: unknown key(s) {names}; known: {', '.join(sorted(known))}")
    return data
