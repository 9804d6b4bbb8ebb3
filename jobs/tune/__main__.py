"""``python -m jobs.tune``: the tune command alone (jobs/cli.py declares its options)."""

from __future__ import annotations

from ..cli import TUNE
from knowfree_core import commandline

# TUNE's handler imports the package jobs.tune: Ray pickles the trainables by reference to
# jobs.tune.trials, never to this __main__ module.
raise SystemExit(commandline.main(TUNE))
