"""The soak tool, short: random SIGKILLs of the whole tree (some inside saves) and a SIGTERM, then the
final adapter compared with an uninterrupted run of the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_short_soak_matches_uninterrupted_run(tmp_path: Path) -> None:
    res = run_cli(
        "soak",
        str(tmp_path / "soak"),
        "--kills",
        "3",
        "--terms",
        "1",
        "--seed",
        "3",
        "--max-steps",
        "40",
        "--save-steps",
        "5",
        "--json",
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["failures"] == []
    assert report["final_step"] == 40
    assert report["max_abs_diff"] == 0.0
    kinds = [e["kind"] for e in report["events"]]
    assert kinds.count("SIGTERM") == 1 and len(kinds) == 4
    for e in report["events"]:
        assert e["resumed_from"] == e["expected_resume"]
        assert e["steps_lost"] == 0 if e["kind"] == "SIGTERM" else e["steps_lost"] <= 5
    assert "PASS" in res.stderr
