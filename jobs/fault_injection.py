"""Test-only fault injection, kept out of every user config.

The resume tests need a training process to die once in the middle of a run. The switch is an
environment variable that the job's driver reads (workers get the value from the driver, so
it does not matter which environment a Ray worker starts with); no config file or ``--set``
can turn it on, and an unset variable costs nothing.
"""

from __future__ import annotations

import os
from typing import Optional

#: Epoch after which one training process fails once (a marker file in its run folder makes
#: it once): jobs.train's rank 1 (rank 0 with one worker) exits, jobs.tune's function trials
#: raise, so that a restart shows resuming from that epoch's checkpoint.
FAIL_AFTER_EPOCH = "KNOWFREE_TEST_FAIL_AFTER_EPOCH"


def fail_after_epoch() -> Optional[int]:
    value = os.environ.get(FAIL_AFTER_EPOCH, "").strip()
    return int(value) if value else None
