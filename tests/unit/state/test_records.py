"""Typed records: round trips, tolerance of missing optional and unknown keys, and one clear
RecordError for anything malformed."""

from __future__ import annotations

import pytest
from ft_appliance.state.layout import BadRecord, read_record
from ft_appliance.state.records import (
    AttemptOutcome,
    Heartbeat,
    Progress,
    RecordError,
    RunFile,
    RunState,
    StatusRecord,
    StepRecord,
    WorkerFailure,
)


def test_round_trip_with_nested_records() -> None:
    st = StatusRecord(
        RunState.TRAINING, "/o", pid=3, progress=Progress(5, 10, 500, 10.0, 1.0, 5.0, 1.5, 2.0), steps_lost=[1, 0]
    )
    assert StatusRecord.from_dict(st.to_dict()) == st
    o = AttemptOutcome(2, -9, 10, 12, WorkerFailure("RuntimeError", "x", "train", 1, ("RuntimeError",)))
    assert AttemptOutcome.from_dict(o.to_dict()) == o


def test_missing_optional_and_unknown_keys_are_tolerated() -> None:
    assert StepRecord.from_dict({"attempt": 1, "step": 4, "added_later": True}) == StepRecord(1, 4)
    assert RunFile.from_dict({"args": {}, "state_dir": "/o/.ft", "attempt": 1}).tweaks == []


@pytest.mark.parametrize(
    ("cls", "data", "why"),
    [
        (StepRecord, [], "expected an object, got list"),
        (StepRecord, {"attempt": 1}, "step: missing"),
        (StepRecord, {"attempt": 1, "step": "4"}, "step: expected int, got str"),
        (StepRecord, {"attempt": True, "step": 4}, "attempt: expected int, got bool"),
        (Heartbeat, {"state": "training", "time": "now"}, "time: expected float, got str"),
        (Heartbeat, {"state": "dancing", "time": 1.0}, "state: 'dancing' is not one of"),
        (StatusRecord, {"state": "training", "output_dir": "/o", "progress": []}, "progress: expected an object"),
        (AttemptOutcome, {"attempt": 1, "exit_code": 1, "start_step": 0, "failure": {"message": "x"}}, "type: missing"),
    ],
)
def test_malformed_records_raise_one_clear_error(cls, data, why: str) -> None:
    with pytest.raises(RecordError, match=why.replace("(", r"\(")):
        cls.from_dict(data)


def test_reading_a_file_names_it(tmp_path) -> None:
    path = tmp_path / "status.json"
    assert read_record(path, StatusRecord) is None
    path.write_text("{")
    with pytest.raises(BadRecord, match=r"status.json is malformed \(not JSON\)"):
        read_record(path, StatusRecord)
