"""The loss curve across restarts: a table of log histories and the curve each must give."""

from __future__ import annotations

import pytest
from ft_appliance.policy.curve import build_curve
from ft_appliance.state.records import LogRecord


def L(attempt: int, step: int, loss: float | None = None, lr: float | None = None, ev: float | None = None):  # noqa: N802
    return LogRecord(attempt, step, loss=loss, learning_rate=lr, eval_loss=ev)


CASES = [
    ("one attempt", [L(1, 1, 3.0, 0.1), L(1, 2, 2.0, 0.2)], {1: 0}, [1, 2], [3.0, 2.0], []),
    (
        "a resume from step 2 replaces what attempt 1 logged after it",
        [L(1, 1, 3.0), L(1, 2, 2.5), L(1, 3, 9.0), L(1, 4, 9.0), L(2, 3, 2.0), L(2, 4, 1.5)],
        {1: 0, 2: 2},
        [1, 2, 3, 4],
        [3.0, 2.5, 2.0, 1.5],
        [2],
    ),
    (
        "an attempt that started over replaces everything",
        [L(1, 1, 3.0), L(1, 2, 2.5), L(2, 1, 3.1), L(2, 2, 2.4)],
        {1: 0, 2: 0},
        [1, 2],
        [3.1, 2.4],
        [0],
    ),
    (
        "an attempt that died before logging is still a restart",
        [L(1, 1, 3.0), L(1, 2, 2.5), L(3, 3, 2.0)],
        {1: 0, 2: 2, 3: 2},
        [1, 2, 3],
        [3.0, 2.5, 2.0],
        [2, 2],
    ),
    ("no logs", [], {1: 0}, [], [], []),
]


@pytest.mark.parametrize(("what", "logs", "resumed", "steps", "losses", "restarts"), CASES, ids=[c[0] for c in CASES])
def test_each_step_counts_once_across_restarts(what, logs, resumed, steps, losses, restarts) -> None:
    curve = build_curve(logs, resumed)
    assert (curve.steps, curve.losses, curve.restarts) == (steps, losses, restarts)


def test_learning_rate_and_eval_loss_are_their_own_series() -> None:
    logs = [L(1, 1, 3.0, 1e-4), L(1, 2, 2.0, 2e-4), L(1, 2, ev=2.2), L(2, 2, ev=2.1), L(2, 3, 1.0, 3e-4)]
    curve = build_curve(logs, {1: 0, 2: 1})
    assert (curve.lr_steps, curve.lrs) == ([1, 3], [1e-4, 3e-4])
    assert (curve.eval_steps, curve.eval_losses) == ([2], [2.1])
    assert curve.steps == [1, 3]
