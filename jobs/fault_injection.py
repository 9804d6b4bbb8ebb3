"""Test-only fault injection, kept out of every user config.

The resume tests need a training process to die once in the middle of a run. The switch is an
environment variable that the job's driver reads (workers get the value from the driver, so
it does not matter which environment a Ray worker starts with); no config file or ``--set``
can turn it on, and an unset variable costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

#: Epoch after which one training process fails once (a marker file in its run folder makes
#: it once): jobs.train's rank 1 (rank 0 with one worker) exits, jobs.tune's function trials
#: raise, so that a restart shows resuming from that epoch's checkpoint.
FAIL_AFTER_EPOCH = "KNOWFREE_TEST_FAIL_AFTER_EPOCH"
#: In the run folder once the failure has fired: the restarted run trains past that epoch.
FAIL_MARKER = ".fail_after_epoch.done"


def fail_after_epoch() -> Optional[int]:
    value = os.environ.get(FAIL_AFTER_EPOCH, "").strip()
    return int(value) if value else None


def fail_now(fail_after_epoch: Optional[int], epoch: int, run_dir: str | Path, note: str,
             before: Optional[Callable[[], object]] = None) -> bool:
    """True when the caller must fail now: ``epoch`` is the one asked for and ``run_dir`` has
    not failed yet. ``before`` runs first (e.g. waiting for this epoch's checkpoint), then the
    marker is written with ``note``, so that the restarted run does not fail again."""
    marker = Path(run_dir) / FAIL_MARKER
    if fail_after_epoch != epoch or marker.exists():
        return False
    if before is not None:
        before()
    marker.write_text(f"{note}\n", encoding="utf-8")
    return True
