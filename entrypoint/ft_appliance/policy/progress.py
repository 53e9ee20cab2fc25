"""Honest progress numbers across restarts, from the workers' step and log records.

LlamaFactory's own trainer_log.jsonl repeats the steps redone after a resume and resets its timers;
here every step counts once (the attempt that last completed it wins), so tokens, tokens/s, ETA and
the final loss stay right however often training restarted.

ProgressTracker takes records as they are appended and keeps its sums as it goes, so a supervisor's
cost per logged step does not grow with the length of the run.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from ..state.records import LogRecord, Progress, StepRecord


class ProgressTracker:
    def __init__(self, recent: int = 20) -> None:
        self.recent = recent
        self._steps: list[StepRecord] = []
        """The run's surviving steps, ascending: a resume drops the steps of the attempt it replaces."""
        self._tokens = 0
        self._loss_steps: list[int] = []
        self._losses: list[float] = []
        self.learning_rate: float | None = None
        self.last_step_by_attempt: dict[int, int] = {}

    def add_steps(self, records: Iterable[StepRecord]) -> None:
        for r in records:
            while self._steps and self._steps[-1].step >= r.step:
                self._tokens -= self._steps.pop().tokens
            self._steps.append(r)
            self._tokens += r.tokens
            self.last_step_by_attempt[r.attempt] = r.step

    def add_logs(self, records: Iterable[LogRecord]) -> None:
        for r in records:
            if r.learning_rate is not None:
                self.learning_rate = r.learning_rate
            if r.loss is None:
                continue
            while self._loss_steps and self._loss_steps[-1] >= r.step:
                self._loss_steps.pop()
                self._losses.pop()
            self._loss_steps.append(r.step)
            self._losses.append(r.loss)

    @property
    def step(self) -> int | None:
        return self._steps[-1].step if self._steps else None

    def progress(self) -> Progress | None:
        if not self._steps:
            return None
        current = self._steps[-1]
        window = self._steps[-self.recent :]
        # The first step of an attempt includes warm-up (compilation, allocator), so it is left out of
        # the rate when there is anything else to go on.
        steady = [r for r in window if not r.first] or window
        w_seconds = sum(r.seconds for r in steady)
        s_per_step = w_seconds / len(steady)
        max_steps = current.max_steps or current.step
        # Losses logged beyond the current step belong to an attempt a resume replaced.
        upto = bisect.bisect_right(self._loss_steps, current.step)
        return Progress(
            step=current.step,
            max_steps=max_steps,
            tokens=self._tokens,
            tokens_per_s=sum(r.tokens for r in steady) / w_seconds if w_seconds > 0 else 0.0,
            seconds_per_step=s_per_step,
            eta_s=(max_steps - current.step) * s_per_step if s_per_step > 0 else None,
            loss=self._losses[upto - 1] if upto else None,
            first_loss=self._losses[0] if upto else None,
            learning_rate=self.learning_rate,
        )


def progress_of(steps: Iterable[StepRecord], logs: Iterable[LogRecord]) -> Progress | None:
    tracker = ProgressTracker()
    tracker.add_steps(steps)
    tracker.add_logs(logs)
    return tracker.progress()


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_progress(p: Progress) -> str:
    pct = 100.0 * p.step / p.max_steps if p.max_steps else 0.0
    loss = f"{p.loss:.4f}" if p.loss is not None else "-"
    return (
        f"step {p.step}/{p.max_steps} ({pct:.0f}%)  loss {loss}  "
        f"{p.tokens_per_s:,.0f} tok/s  {p.seconds_per_step:.2f} s/step  ETA {format_duration(p.eta_s)}"
    )


LINE_EVERY_S = 30.0
"""The progress line is said again after this long even when nothing changed: the run is alive."""


def line_due(text: str, last_text: str, since_last_s: float, every_s: float = LINE_EVERY_S) -> bool:
    """Say the progress line when it changed, or when it has not been said for every_s. A log with
    nothing new for the line (LlamaFactory's end-of-training summary) does not repeat it."""
    return bool(text) and (text != last_text or since_last_s > every_s)


def steps_lost(crashed_at: int | None, resumed_from: int) -> int:
    """Optimizer steps a crash threw away: done before it, redone after it."""
    return max(0, (crashed_at or 0) - resumed_from)


def restart_history(attempts: list[int], last_step: dict[int, int], resumed: dict[int, int]) -> tuple[int, list[int]]:
    """Restarts of a run and the steps each one lost: attempts in order, each attempt's last step,
    and the step each attempt resumed from. Counted the same whichever supervisor made them."""
    lost = [
        steps_lost(last_step.get(prev), resumed.get(cur, 0)) for prev, cur in zip(attempts, attempts[1:], strict=False)
    ]
    return max(0, len(attempts) - 1), lost
