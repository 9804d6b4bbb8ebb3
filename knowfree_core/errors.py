"""Errors that point a user at the exact place in their input that is wrong."""

from __future__ import annotations


class KnowFreeError(Exception):
    """Base class of every error this library raises on purpose."""


class DataFormatError(KnowFreeError, ValueError):
    """A data file does not match the format it was read as.

    The message always names the file and (1-based) line and says what was expected,
    so that a user can open the file at that line and fix it.
    """

    def __init__(self, path: str, line: int | None, problem: str, expected: str | None = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        self.expected = expected
        where = f"{self.path}:{line}" if line is not None else self.path
        message = f"{where}: {problem}"
        if expected:
            message += f" (expected {expected})"
        super().__init__(message)


class UnknownLabelError(KnowFreeError, ValueError):
    """A label that is not in the model's label vocabulary."""


class ConfigError(KnowFreeError, ValueError):
    """A configuration value is missing or invalid."""
