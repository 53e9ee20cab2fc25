"""What a rank's callbacks share, kept apart from them so that the worker installs its stop handler
before importing transformers (callbacks.py does, at import)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..state.layout import StateDir, append_record
from ..state.records import Event
from .beat import Beat
from .counting import TokenCount


class StopRequested(Exception):
    """Raised inside the Trainer once the stop checkpoint is on disk; unwinds training cleanly."""


class StopFlag:
    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signum = signum


@dataclass
class WorkerContext:
    sd: StateDir
    attempt: int
    rank: int
    stop: StopFlag
    beat: Beat
    tweaks: tuple[str, ...] = ()
    keep_checkpoints: int | None = None
    stopping: bool = False
    trained: bool = False
    """This attempt finished a step: a failure from now on is a training failure, not a setup one."""
    tokens: TokenCount = field(default_factory=TokenCount)
    saver: Any = None
    """worker/saves.BackgroundSaver when this run's checkpoints are written in the background."""
    setup_seconds: dict[str, float] = field(default_factory=dict)
    """worker/setup_clock's phases (tokenizer, data, model) of this attempt, for its train_begin event."""

    def event(self, name: str, **data: Any) -> None:
        if self.rank == 0:
            append_record(self.sd.events, Event(name, self.attempt, time.time(), data))
