"""Run commands N at a time under one deadline (the GPU sweeps: several ``knowfree train`` runs
share one GPU). Each command is a subprocess with its own log; a run still going at the
deadline is killed and reported as such, one never started as "not started".

Hand-rolled on purpose: concurrent.futures would need a thread per run only to wait on
``Popen``, and has no way to kill the runs still going at a deadline.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence


@dataclass
class Command:
    name: str
    argv: list[str]
    log: Path
    cwd: Optional[Path] = None
    extra: dict = field(default_factory=dict)  # what the caller needs back in on_finish


def run_commands(commands: Sequence[Command], parallel: int, deadline_s: float, env: Mapping[str, str],
                 on_finish: Optional[Callable[[Command, str], None]] = None, poll_s: float = 2.0) -> dict[str, str]:
    """Run ``commands``, at most ``parallel`` at once; returns name → "ok", "exit N",
    "stopped at deadline" or "not started". ``on_finish`` is called as each run ends."""
    started = time.monotonic()
    pending = list(commands)
    active: dict[str, tuple[subprocess.Popen, Command]] = {}
    status: dict[str, str] = {}

    def finish(command: Command, result: str) -> None:
        status[command.name] = result
        if on_finish is not None:
            on_finish(command, result)

    while pending or active:
        while pending and len(active) < parallel:
            command = pending.pop(0)
            command.log.parent.mkdir(parents=True, exist_ok=True)
            with command.log.open("w") as log:  # the child keeps its own copy of the descriptor
                process = subprocess.Popen(command.argv, stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                           cwd=command.cwd)
            active[command.name] = (process, command)
        time.sleep(poll_s)
        for name, (process, command) in list(active.items()):
            if process.poll() is not None:
                del active[name]
                finish(command, "ok" if process.returncode == 0 else f"exit {process.returncode}")
        if time.monotonic() - started > deadline_s:
            for process, command in active.values():
                process.kill()
                process.wait()
                finish(command, "stopped at deadline")
            for command in pending:
                finish(command, "not started")
            break
    return status
