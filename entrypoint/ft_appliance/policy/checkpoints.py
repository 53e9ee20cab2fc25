"""Pure checkpoint decisions: which one to resume from, which to set aside. No I/O: the scan that
judges each checkpoint on disk lives in state/checkpoints.py and hands its Candidates here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Candidate:
    path: Path
    step: int
    complete: bool
    reason: str = ""
    """Why it is not complete (empty when complete)."""
    marked: bool = False


def torn_after_marked(found: Sequence[Candidate]) -> list[Candidate]:
    """Once the appliance has marked a checkpoint of this run, a newer one without a marker is a save
    that did not finish on every rank, whatever its files look like: the marker is the signal."""
    newest_marked = max((c.step for c in found if c.marked), default=None)
    if newest_marked is None:
        return list(found)
    return [
        replace(c, complete=False, reason="no completion marker (the save was interrupted)")
        if c.complete and not c.marked and c.step > newest_marked
        else c
        for c in found
    ]


def choose_resume(candidates: Sequence[Candidate]) -> Candidate | None:
    """The newest complete checkpoint."""
    return max((c for c in candidates if c.complete), key=lambda c: c.step, default=None)


def to_rotate(candidates: Sequence[Candidate], keep: int, protected: frozenset[Path] = frozenset()) -> list[Candidate]:
    """save_total_limit, the appliance's way: only marked complete checkpoints count and go, the
    newest `keep` of them stay (so the newest complete one always does), and a protected one (the
    Trainer's best model) stays too. Torn ones are not this rule's: the supervisor sets them aside."""
    complete = sorted((c for c in candidates if c.complete and c.marked), key=lambda c: c.step)
    old = complete[: max(0, len(complete) - max(1, keep))]
    return [c for c in old if c.path not in protected]


def to_set_aside(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Incomplete checkpoints: the Trainer would pick the newest of them, and a later save of the
    same step would collide with it, so they are moved out of its sight."""
    return [c for c in candidates if not c.complete]
