"""The soak tool, short: one of every fault kind against one run with save_total_limit 1, then the final
adapter compared with an uninterrupted run of the same seed (CI's short mix; docs/benchmarks.md has a
long one)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ft_appliance.tools.soak import FAULTS, GRACEFUL

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_short_soak_of_every_fault_kind_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the disk-full fault mounts a tmpfs, which needs root (CI runs as root)")
    res = run_cli(
        "soak", str(tmp_path / "soak"),
        "--kills", "3", "--terms", "1", "--supervisor-kills", "1", "--second-starts", "1", "--config-changes", "1",
        "--hangs", "1", "--disk-fulls", "1",
        "--save-total-limit", "1", "--seed", "3", "--max-steps", "60", "--save-steps", "5", "--json",
        timeout=1500,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["failures"] == []
    assert report["final_step"] == 60
    assert report["max_abs_diff"] == 0.0
    kinds = [e["kind"] for e in report["events"]]
    assert len(kinds) == 9 and set(kinds) >= set(FAULTS) - {"SIGKILL", "SIGKILL-save"}
    assert {"SIGKILL", "SIGKILL-save"} & set(kinds)
    for e in report["events"]:
        assert e["resumed_from"] == e["expected_resume"]
        assert e["steps_lost"] == 0 if e["kind"] in GRACEFUL else e["steps_lost"] <= 5
    assert "PASS" in res.stderr
