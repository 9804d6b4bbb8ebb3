"""Test-only fault injection, kept out of every user config.

The resume tests need a training process, or a pool actor, to die once in the middle of a
run. The switch is an environment variable that the job's driver reads (workers get the value
from the driver, so it does not matter which environment a Ray worker starts with); no config
file or ``--set`` can turn it on, and an unset variable costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

#: Epoch after which one training process fails once (a marker file in its run folder makes
#: it once): jobs.train's rank 1 (rank 0 with one worker) exits, jobs.tune's function trials
#: raise, so that a restart shows resuming from that epoch's checkpoint.
FAIL_AFTER_EPOCH = "KNOWFREE_TEST_FAIL_AFTER_EPOCH"
#: In the run folder once the failure has fired: the restarted run trains past that epoch.
FAIL_MARKER = ".fail_after_epoch.done"
#: Sentence id at which a jobs.predict actor process exits once, mid-batch (as on an OOM kill):
#: Ray Data must restart the actor and retry its batch, losing and repeating no row.
EXIT_ON_ID = "KNOWFREE_TEST_EXIT_ON_ID"
#: In the job's output folder once the actor has exited: the retried batch goes through.
EXIT_MARKER = ".exit_on_id.done"


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


def exit_on_id() -> Optional[str]:
    return os.environ.get(EXIT_ON_ID, "").strip() or None


def exit_once_on(exit_on: Optional[str], ids: Sequence[str], run_dir: str | Path) -> None:
    """Exit this process at once (no cleanup, as a killed one) when ``ids`` holds ``exit_on``
    and ``run_dir`` has not seen it happen yet."""
    marker = Path(run_dir) / EXIT_MARKER
    if exit_on is None or exit_on not in ids or marker.exists():
        return
    marker.write_text(f"pid {os.getpid()} exited on {exit_on}\n", encoding="utf-8")
    os._exit(1)
