"""Pure decision: whether a finished attempt is done, stopped, retried, or given up on.

No I/O here: it takes the typed outcome records and returns a Verdict, so each rule is tested
by a table without processes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from ..state.records import AttemptOutcome


class Verdict(str, enum.Enum):
    SUCCESS = "success"
    STOPPED = "stopped"
    RETRY = "retry"
    FATAL = "fatal"
    CRASH_LOOP = "crash_loop"
    NO_SPACE = "no_space"
    """The output volume is full: no retry can save anything until space is freed."""


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
    if outcome.disk_full:
        return Verdict.NO_SPACE
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
