"""Pure decisions: which checkpoint to resume from, and whether a failed attempt is retried.

No I/O here: everything takes and returns plain data, so each rule is tested without processes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from .checkpoints import Candidate


def choose_resume(candidates: Sequence[Candidate]) -> Candidate | None:
    """The newest complete checkpoint."""
    return max((c for c in candidates if c.complete), key=lambda c: c.step, default=None)


def to_set_aside(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Incomplete checkpoints: the Trainer would pick the newest of them, and a later save of the
    same step would collide with it, so they are moved out of its sight."""
    return [c for c in candidates if not c.complete]


class Verdict(str, enum.Enum):
    SUCCESS = "success"
    STOPPED = "stopped"
    RETRY = "retry"
    FATAL = "fatal"
    CRASH_LOOP = "crash_loop"


@dataclass(frozen=True)
class WorkerFailure:
    type: str
    message: str
    phase: str
    """"setup" (before the first step of the attempt) or "train"."""
    rank: int = 0
    kinds: tuple[str, ...] = ()
    """The exception's class and its bases, so a subclass (PackageNotFoundError) counts as its base."""

    def is_a(self, names: frozenset[str]) -> bool:
        return self.type in names or any(k in names for k in self.kinds)


@dataclass(frozen=True)
class AttemptOutcome:
    attempt: int
    exit_code: int
    start_step: int
    """Global step the attempt resumed from (0 for a fresh start)."""
    last_step: int | None
    """Last optimizer step the attempt completed (None when it never reached one)."""
    failure: WorkerFailure | None = None
    hung: bool = False
    stop_requested: bool = False
    stopped_cleanly: bool = False
    completed: bool = False

    @property
    def progressed(self) -> bool:
        return self.last_step is not None and self.last_step > self.start_step


# Raised before training starts, these mean the inputs are wrong: the same launch fails the same way.
SETUP_ERRORS = frozenset(
    {
        "ValueError",
        "TypeError",
        "KeyError",
        "FileNotFoundError",
        "NotADirectoryError",
        "IsADirectoryError",
        "PermissionError",
        "ImportError",
        "ModuleNotFoundError",
        "AttributeError",
        "NotImplementedError",
        "AssertionError",
        "OSError",
        "HFValidationError",
        "DatasetGenerationError",
        "EnvironmentError",
    }
)
# Wherever they happen, more memory is not coming on retry.
RESOURCE_ERRORS = frozenset({"OutOfMemoryError"})


def classify(outcome: AttemptOutcome, history: Sequence[AttemptOutcome], crash_loop_limit: int) -> Verdict:
    """history: earlier attempts of this run, oldest first (not including outcome)."""
    if outcome.completed:
        # Rank 0 wrote the completion record after training and the final save returned; a rank
        # dying in interpreter teardown afterwards must not turn a finished run into a retry
        # (which would train past the end and overwrite the results).
        return Verdict.SUCCESS
    if outcome.stop_requested:
        return Verdict.STOPPED
    failure = outcome.failure
    if failure is not None and failure.is_a(RESOURCE_ERRORS):
        return Verdict.FATAL
    if failure is not None and failure.phase == "setup" and failure.is_a(SETUP_ERRORS):
        return Verdict.FATAL
    if not outcome.progressed:
        stuck = [outcome]
        for earlier in reversed(history):
            if earlier.progressed or earlier.start_step != outcome.start_step or earlier.stop_requested:
                break
            stuck.append(earlier)
        if len(stuck) >= crash_loop_limit:
            return Verdict.CRASH_LOOP
    return Verdict.RETRY


def outcome_from_dict(d: dict) -> AttemptOutcome:
    """An outcome as saved in attempts/N/outcome.json (earlier supervisors of the same run)."""
    f = d.get("failure")
    failure = (
        WorkerFailure(f["type"], f["message"], f["phase"], f.get("rank", 0), tuple(f.get("kinds", ())))
        if isinstance(f, dict)
        else None
    )
    return AttemptOutcome(
        attempt=int(d["attempt"]),
        exit_code=int(d["exit_code"]),
        start_step=int(d["start_step"]),
        last_step=d.get("last_step"),
        failure=failure,
        hung=bool(d.get("hung")),
        stop_requested=bool(d.get("stop_requested")),
        stopped_cleanly=bool(d.get("stopped_cleanly")),
        completed=bool(d.get("completed")),
    )
