"""The spare: once an attempt has trained a step, a second torchrun imports the stack and waits, so a
restart on this node hands it the next run file instead of importing everything again (most of a
restart's time). One spare per attempt at most; single node only (command.spare_allowed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config.plan import Plan
from ..state.layout import StateDir
from .command import build_spare, spare_allowed
from .process import TrainingProcess, free_port


@dataclass
class Spare:
    proc: TrainingProcess
    go_file: Path
    argv: list[str]


class WarmPool:
    def __init__(self, plan: Plan, sd: StateDir, env: Mapping[str, str], say: Callable[[str], None]) -> None:
        self.plan = plan
        self.sd = sd
        self.env = env
        self.say = say
        self.spare: Spare | None = None
        self.started_for = 0
        """The attempt that last started a spare: one per attempt, even if it dies."""

    def maybe_start(self, attempt: int) -> None:
        """Called once an attempt trains: its imports then no longer compete with that attempt's start."""
        if self.spare is not None or self.started_for >= attempt or not spare_allowed(self.plan):
            return
        self.started_for = attempt
        k = self.sd.new_spare()
        go = self.sd.go_file(k)
        spec = build_spare(self.plan, go, self.sd.spare_dir(k) / "output.log", free_port(), self.env, os.getpid())
        # Quiet until adopted: its import warnings belong to the attempt it becomes, not this one.
        self.spare = Spare(TrainingProcess(spec, lambda _line: None), go, spec.argv)

    def take(self) -> Spare | None:
        spare, self.spare = self.spare, None
        if spare is not None and spare.proc.poll() is not None:
            self.say(f"spare workers exited (code {spare.proc.returncode}); launching afresh")
            spare.proc.close()
            return None
        return spare

    def close(self) -> None:
        if self.spare is not None:
            self.spare.proc.close()
            self.spare = None
