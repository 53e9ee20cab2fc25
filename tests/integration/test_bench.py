"""benchmarks/bench.py on CPU (--tiny): the tool the H200 numbers in docs/benchmarks.md come from runs
end to end here, a crash and its resume included, and reports where startup time goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_bench_reports_startup_phases_and_the_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out)}
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny", "--no-bytecode"]
    argv += ["--workdir", str(tmp_path / "work"), "--steps", "14", "--kill-at", "6", "profile"]
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (result,) = json.loads((out / "bench.json").read_text())
    assert result["rc"] == 0, (tmp_path / "work" / "profile.log").read_text()[-3000:]

    start = result["startup"]
    for phase in ("cli_to_launch (imports, preflight)", "worker_imports (torch, transformers, llamafactory)"):
        assert start[phase] > 0, start
    for phase in ("load_tokenizer", "get_dataset", "load_model"):
        assert f"  {phase}" in start, start
    assert all(v >= 0 for v in start.values()), start
    # The phases that follow each other add up to the launch-to-first-step time bench.py measured.
    top = sum(v for k, v in start.items() if not k.startswith("  "))
    assert abs(top - result["launch_to_first_step_done_s"]) <= 0.5, (top, result)

    assert result["crash_to_first_resumed_step_s"] > 0
    assert "cli_to_launch (imports, preflight)" not in result["resume_startup"]  # a restart has no CLI start
    assert "  load_model" in result["resume_startup"]
