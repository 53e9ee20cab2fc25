"""State file I/O: the incremental reader sees each complete line once, never a torn one."""

from __future__ import annotations

from pathlib import Path

from ft_appliance.state.files import JsonlTail, append_jsonl, last_jsonl, write_json


def test_tail_reads_only_what_was_appended_and_waits_for_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    tail = JsonlTail(path)
    assert tail.read_new() == []  # no file yet
    append_jsonl(path, {"step": 1})
    append_jsonl(path, {"step": 2})
    assert tail.read_new() == [{"step": 1}, {"step": 2}]
    with open(path, "a") as fh:
        fh.write('{"step": 3')  # being written
    assert tail.read_new() == []
    with open(path, "a") as fh:
        fh.write("}\n")
    assert tail.read_new() == [{"step": 3}]
    assert tail.read_new() == []


def test_last_record_is_read_from_the_end_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    for n in range(1, 5001):
        append_jsonl(path, {"step": n, "pad": "x" * 40})
    with open(path, "a") as fh:
        fh.write('{"step": 5001, "pa')  # killed mid-write
    assert last_jsonl(path) == {"step": 5000, "pad": "x" * 40}
    assert last_jsonl(tmp_path / "missing.jsonl") is None


def test_atomic_writes_leave_no_temporary_file(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": 1})
    write_json(tmp_path / "a.json", {"x": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
