"""Honest numbers across restarts: each step counted once, the latest attempt's record wins."""

from __future__ import annotations

from ft_appliance.policy.progress import format_duration, format_progress, line_due, progress_of, steps_lost
from ft_appliance.state.records import LogRecord, StepRecord


def step(attempt: int, n: int, tokens: int = 100, seconds: float = 1.0, first: bool = False) -> StepRecord:
    return StepRecord(attempt, n, max_steps=20, tokens=tokens, seconds=seconds, first=first)


def log(attempt: int, n: int, loss: float) -> LogRecord:
    return LogRecord(attempt, n, loss=loss)


def progress(steps: list[StepRecord], logs: list[LogRecord]):
    return progress_of(steps, logs)


def test_repeated_steps_after_resume_count_once() -> None:
    # attempt 1 ran steps 1..12 and died; attempt 2 resumed from checkpoint 10 and ran 11..15.
    records = [step(1, n, first=n == 1) for n in range(1, 13)]
    records += [step(2, n, tokens=200, seconds=2.0, first=n == 11) for n in range(11, 16)]
    logs = [log(1, 5, 3.0), log(1, 10, 2.5), log(1, 12, 9.9), log(2, 15, 2.0)]
    p = progress(records, logs)
    assert p is not None
    assert p.step == 15 and p.max_steps == 20
    assert p.tokens == 10 * 100 + 5 * 200  # steps 11 and 12 from attempt 2 only
    assert p.first_loss == 3.0 and p.loss == 2.0
    assert p.eta_s is not None and p.eta_s > 0


def test_steps_beyond_the_current_step_are_dropped() -> None:
    records = [step(1, n) for n in range(1, 13)] + [step(2, 11)]
    p = progress(records, [log(1, 10, 1.0), log(1, 12, 9.0)])
    assert p.step == 11 and p.tokens == 1100
    assert p.loss == 1.0  # the loss logged at step 12 belongs to a dead attempt


def test_rate_leaves_out_warmup_step() -> None:
    records = [step(1, 1, seconds=30.0, first=True)] + [step(1, n, seconds=0.5) for n in range(2, 6)]
    p = progress(records, [])
    assert p.tokens_per_s == 200.0 and p.seconds_per_step == 0.5
    assert p.eta_s == 15 * 0.5


def test_formatting() -> None:
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05" and format_duration(None) == "?"
    p = progress([step(1, 5)], [log(1, 5, 1.23456)])
    assert format_progress(p) == "step 5/20 (25%)  loss 1.2346  100 tok/s  1.00 s/step  ETA 0:15"
    assert steps_lost(17, 10) == 7 and steps_lost(None, 0) == 0 and steps_lost(10, 10) == 0


def test_progress_line_is_said_when_it_changed_or_after_a_quiet_while() -> None:
    rows = [  # text, last said, seconds since, due
        ("step 3/3  loss 1.0", "", 0.0, True),  # the first line
        ("step 3/3  loss 1.0", "step 2/3  loss 1.1", 0.4, True),  # changed
        ("step 3/3  loss 1.0", "step 3/3  loss 1.0", 0.5, False),  # the end-of-training log: nothing new
        ("step 3/3  loss 1.0", "step 3/3  loss 1.0", 31.0, True),  # alive, said again
        ("", "step 3/3  loss 1.0", 31.0, False),  # no progress to say
    ]
    for text, last, since, due in rows:
        assert line_due(text, last, since, every_s=30.0) is due, (text, last, since)
