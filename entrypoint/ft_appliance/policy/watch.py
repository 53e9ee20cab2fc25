"""Pure hang watchdog rule: given when the attempt launched and when it last showed progress, is it
hung? Progress is a new step record, or a new beat from rank 0 while it evaluates, saves, loads or
tokenises (the worker beats only outside training steps, so a stuck step is still caught).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    hang_s: float
    """After the first step: no step and no beat for this long is a hang."""
    startup_s: float
    """From launch to the first step (imports, model load, tokenisation)."""


@dataclass(frozen=True)
class Watch:
    hung: bool
    waited_s: float
    limit_s: float
    waiting_for: str


def decide(now: float, launched_at: float, last_progress_at: float, first_step_seen: bool, limits: Limits) -> Watch:
    if not first_step_seen:
        waited = now - launched_at
        return Watch(waited > limits.startup_s, waited, limits.startup_s, "the first step")
    waited = now - last_progress_at
    return Watch(waited > limits.hang_s, waited, limits.hang_s, "a step or a beat")
