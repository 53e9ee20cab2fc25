"""The run's loss curve across restarts, from the workers' log records: each step once, restarts marked.

LlamaFactory's trainer_log.jsonl (and its plot_loss) holds only the last attempt and repeats the steps
redone after a resume. Here an attempt that resumed from step S replaces everything logged after S by
earlier attempts, so the curve is the history of the weights that were finally kept. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..state.records import LogRecord


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lr_steps: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    restarts: list[int] = field(default_factory=list)
    """The step each later attempt resumed from (0 for one that started over)."""

    def __bool__(self) -> bool:
        return bool(self.steps or self.eval_steps)


def _cut(steps: list[int], values: list[float], after: int) -> None:
    while steps and steps[-1] > after:
        steps.pop()
        values.pop()


def _add(steps: list[int], values: list[float], step: int, value: float) -> None:
    _cut(steps, values, step - 1)  # a step logged twice by one attempt keeps its last value
    steps.append(step)
    values.append(value)


def build_curve(logs: Iterable[LogRecord], resumed: Mapping[int, int]) -> Curve:
    """logs in the order they were written; resumed: every attempt -> the step it resumed from."""
    curve = Curve(restarts=[resumed[a] for a in sorted(resumed)[1:]])
    series = ((curve.steps, curve.losses), (curve.lr_steps, curve.lrs), (curve.eval_steps, curve.eval_losses))
    current: int | None = None
    for r in logs:
        if r.attempt != current:
            if current is not None:
                for steps, values in series:
                    _cut(steps, values, resumed.get(r.attempt, 0))
            current = r.attempt
        for (steps, values), value in zip(series, (r.loss, r.learning_rate, r.eval_loss), strict=True):
            if value is not None:
                _add(steps, values, r.step, value)
    return curve
