"""Pure decisions, table-driven: no files, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from ft_appliance.policy.checkpoints import Candidate, choose_resume, to_rotate, to_set_aside
from ft_appliance.policy.restarts import Verdict, classify
from ft_appliance.state.records import AttemptOutcome, WorkerFailure


def cand(step: int, complete: bool = True) -> Candidate:
    return Candidate(Path(f"/o/checkpoint-{step}"), step, complete, "" if complete else "torn")


@pytest.mark.parametrize(
    ("cands", "expected"),
    [
        ([], None),
        ([cand(10), cand(20)], 20),
        ([cand(10), cand(20, complete=False)], 10),
        ([cand(20, complete=False), cand(10, complete=False)], None),
        ([cand(30), cand(100, complete=False), cand(5)], 30),
    ],
)
def test_choose_resume_takes_newest_complete(cands, expected) -> None:
    chosen = choose_resume(cands)
    assert (chosen.step if chosen else None) == expected


def test_only_incomplete_checkpoints_are_set_aside() -> None:
    assert [c.step for c in to_set_aside([cand(10), cand(20, False), cand(30), cand(40, False)])] == [20, 40]


def out(attempt=1, rc=1, start=0, last=None, failure=None, **kw) -> AttemptOutcome:
    return AttemptOutcome(attempt, rc, start, last, failure, **kw)


def fail(type_: str, phase: str) -> WorkerFailure:
    return WorkerFailure(type_, "boom", phase)


@pytest.mark.parametrize(
    ("outcome", "history", "verdict"),
    [
        (out(rc=0, last=30, completed=True), [], Verdict.SUCCESS),
        # a rank that aborted in interpreter teardown after the run completed is still success
        (out(rc=1, last=30, completed=True), [], Verdict.SUCCESS),
        (out(rc=1, last=12, stop_requested=True, stopped_cleanly=True), [], Verdict.STOPPED),
        (out(rc=-9, last=15), [], Verdict.RETRY),  # SIGKILL mid-step
        (out(rc=1, last=15, failure=fail("RuntimeError", "train")), [], Verdict.RETRY),
        (out(rc=1, failure=fail("ValueError", "setup")), [], Verdict.FATAL),  # bad config/data
        (out(rc=1, failure=fail("FileNotFoundError", "setup")), [], Verdict.FATAL),
        # a subclass of a setup error (importlib's PackageNotFoundError is a ModuleNotFoundError)
        (
            out(
                rc=1,
                failure=WorkerFailure(
                    "PackageNotFoundError",
                    "x",
                    "setup",
                    0,
                    ("PackageNotFoundError", "ModuleNotFoundError", "ImportError"),
                ),
            ),
            [],
            Verdict.FATAL,
        ),
        (out(rc=1, last=3, failure=fail("OutOfMemoryError", "train")), [], Verdict.FATAL),
        # a ValueError after training started (say, in a later eval) is retried
        (out(rc=1, last=15, failure=fail("ValueError", "train")), [], Verdict.RETRY),
        # a RuntimeError during setup (NCCL/c10d init) is transient
        (out(rc=1, failure=fail("RuntimeError", "setup")), [], Verdict.RETRY),
        (out(rc=1, last=15, hung=True), [], Verdict.RETRY),
    ],
)
def test_classify(outcome, history, verdict) -> None:
    assert classify(outcome, history, crash_loop_limit=3) is verdict


def test_crash_loop_needs_k_failures_at_the_same_step_without_progress() -> None:
    a1 = out(1, -9, start=10, last=10)
    a2 = out(2, -9, start=10, last=None)
    a3 = out(3, -9, start=10, last=None)
    assert classify(a1, [], 3) is Verdict.RETRY
    assert classify(a2, [a1], 3) is Verdict.RETRY
    assert classify(a3, [a1, a2], 3) is Verdict.CRASH_LOOP


def test_progress_resets_the_crash_loop_count() -> None:
    history = [out(1, -9, start=0, last=None), out(2, -9, start=0, last=12)]  # attempt 2 progressed
    assert classify(out(3, -9, start=10, last=None), history, 2) is Verdict.RETRY
    assert classify(out(4, -9, start=10, last=10), [*history, out(3, -9, start=10)], 2) is Verdict.CRASH_LOOP


def test_a_stop_ends_the_stuck_chain() -> None:
    history = [out(1, -9, start=10), out(2, 143, start=10, stop_requested=True)]
    assert classify(out(3, -9, start=10), history, 2) is Verdict.RETRY


def test_outcomes_saved_by_earlier_supervisors_read_back() -> None:
    o = out(4, 1, start=20, last=20, failure=WorkerFailure("OSError", "x", "setup", 1, ("OSError", "Exception")))
    assert AttemptOutcome.from_dict(o.to_dict()) == o


def marked(step: int, complete: bool = True) -> Candidate:
    return Candidate(Path(f"/o/checkpoint-{step}"), step, complete, "" if complete else "torn", marked=True)


@pytest.mark.parametrize(
    ("cands", "keep", "protected", "deleted"),
    [
        ([marked(5), marked(10), marked(15)], 1, (), [5, 10]),
        ([marked(5), marked(10), marked(15)], 2, (), [5]),
        ([marked(5), marked(10)], 0, (), [5]),  # the newest complete one always stays
        ([marked(5), marked(10), marked(15, complete=False)], 1, (), [5]),  # a torn newest counts for nothing
        ([cand(5), marked(10), marked(15)], 1, (), [10]),  # unmarked (plain LlamaFactory): left alone
        ([marked(5), marked(10), marked(15)], 1, ("/o/checkpoint-5",), [10]),  # the best model stays
    ],
)
def test_rotation_deletes_only_older_complete_checkpoints(cands, keep, protected, deleted) -> None:
    gone = to_rotate(cands, keep, frozenset(Path(p) for p in protected))
    assert [c.step for c in gone] == deleted
