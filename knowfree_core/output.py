"""What a command prints besides its own results: quiet by default, everything with ``--verbose``.

Quiet: the project's own log lines (one per stage, at INFO) and the result tables; other
libraries only warn. transformers' progress bars ("Loading weights", "Writing model shards")
and info messages are off, here and in the worker processes a local Ray cluster starts (they
inherit this process's environment). Ray's own switches (``ray.init``'s log level, Ray Data's
progress) are set by ``jobs.common.init_ray``, which reads :func:`OutputSettings.from_environment`:
this library does not import ray.

Verbose (``--verbose`` or ``KNOWFREE_VERBOSE=1``): every library logs at INFO, the project at
DEBUG, and the progress bars are on.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

#: Set to 1 for verbose output; ``--verbose`` sets it too, so that Ray workers see it.
VERBOSE_ENV = "KNOWFREE_VERBOSE"
#: The loggers of this project (``jobs`` is installed as ``knowfree_jobs``); ``__main__`` is a
#: script run directly, such as a benchmark.
PROJECT_LOGGERS = ("knowfree_core", "jobs", "knowfree_jobs", "__main__")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Read by transformers when it is imported (in this process or in a Ray worker).
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' tqdm bars follow huggingface_hub's switch
    "TRANSFORMERS_VERBOSITY": "error",
}


@dataclass(frozen=True)
class OutputSettings:
    verbose: bool = False

    @classmethod
    def from_environment(cls, environ: Optional[Mapping[str, str]] = None) -> "OutputSettings":
        value = (os.environ if environ is None else environ).get(VERBOSE_ENV, "")
        return cls(verbose=value.strip().lower() not in ("", "0", "false", "no"))

    @classmethod
    def resolve(cls, flag: bool, environ: Optional[Mapping[str, str]] = None) -> "OutputSettings":
        """``--verbose`` or, without it, ``KNOWFREE_VERBOSE``."""
        return cls(verbose=True) if flag else cls.from_environment(environ)


def configure_output(settings: OutputSettings) -> None:
    """Set up logging and the third-party switches for a command run in this process."""
    logging.basicConfig(level=logging.INFO if settings.verbose else logging.WARNING, format=LOG_FORMAT)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if settings.verbose else logging.INFO)
    if settings.verbose:
        # Child processes (Ray workers, jobs.common.init_ray) follow the command line.
        os.environ[VERBOSE_ENV] = "1"
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # a value the user exported wins
    if "transformers" in sys.modules:
        # Already imported (it read the environment then): its own switches.
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
