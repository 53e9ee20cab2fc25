"""The result package's pure parts, by tables: the state `status` names, the metrics a status record
gives, and which webhook errors are worth another try."""

from __future__ import annotations

import urllib.error

import pytest
from ft_appliance.result.metrics import values
from ft_appliance.result.notify import _transient
from ft_appliance.result.story import display_state
from ft_appliance.state.records import Progress, RunState, StatusRecord


def st(state: RunState, verdict: str | None = None, **kw: object) -> StatusRecord:
    return StatusRecord(state=state, output_dir="/data/output/run", verdict=verdict, **kw)


@pytest.mark.parametrize(
    ("record", "alive", "shown"),
    [
        (st(RunState.TRAINING), True, "running"),
        (st(RunState.STARTING), True, "running"),
        (st(RunState.RESTARTING), True, "restarting"),
        (st(RunState.TRAINING), False, "supervisor gone"),
        (st(RunState.STOPPING), False, "supervisor gone"),
        (st(RunState.FINISHED), False, "finished"),
        (st(RunState.ALREADY_FINISHED), False, "finished"),
        (st(RunState.STOPPED), False, "stopped"),
        (st(RunState.FAILED, "fatal"), False, "crashed"),
        (st(RunState.FAILED, "retry"), False, "gave up (restarts used up)"),
        (st(RunState.FAILED, "crash_loop"), False, "gave up (crash loop)"),
        (st(RunState.FAILED, "no_space"), False, "gave up (volume full)"),
    ],
)
def test_the_state_status_names(record: StatusRecord, alive: bool, shown: str) -> None:
    assert display_state(record, alive) == shown


def test_metrics_come_from_the_status_record_and_unknown_ones_are_left_out() -> None:
    p = Progress(step=30, max_steps=100, tokens=3000, tokens_per_s=500.0, seconds_per_step=0.2, eta_s=14.0,
                 loss=1.5, first_loss=3.0, learning_rate=1e-4)  # fmt: skip
    record = st(RunState.TRAINING, restarts=2, steps_lost=[3, 4], progress=p, updated=1000.0,
                last_checkpoint=25, last_checkpoint_time=990.0)  # fmt: skip
    assert values(record, now=1000.0) == {
        "step": 30.0, "max_steps": 100.0, "loss": 1.5, "learning_rate": 1e-4, "tokens_per_second": 500.0,
        "eta_seconds": 14.0, "restarts": 2.0, "steps_lost": 7.0, "last_checkpoint_step": 25.0,
        "last_checkpoint_age_seconds": 10.0, "updated_timestamp_seconds": 1000.0,
    }  # fmt: skip
    assert values(st(RunState.STARTING), now=0.0) == {
        "restarts": 0.0,
        "steps_lost": 0.0,
        "updated_timestamp_seconds": 0.0,
    }


def _http(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://x", code, "x", None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "again"),
    [
        (urllib.error.URLError("refused"), True),
        (TimeoutError(), True),
        (_http(503), True),
        (_http(429), True),
        (_http(404), False),
        (_http(401), False),
        (ValueError("bad url"), False),
    ],
)
def test_which_webhook_errors_are_retried(exc: BaseException, again: bool) -> None:
    assert _transient(exc) is again
