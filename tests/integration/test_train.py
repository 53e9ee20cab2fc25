"""A real LlamaFactory LoRA run through `ft-appliance train`: 2 torchrun processes on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_cli, status, trainer_state

pytestmark = pytest.mark.slow


def test_train_two_processes_end_to_end(make_config) -> None:
    cfg = make_config("e2e", max_steps=20, save_steps=10, logging_steps=2)
    out = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    trace = cfg.parent / "trace"
    env = {"FT_TRACE_STEPS": f"{trace}:4:2"}  # the benchmarks' profiler over steps 5-6, rank 0
    res = run_cli("train", str(cfg), "--nproc", "2", "--json", timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]

    # What LlamaFactory produced.
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "adapter_config.json").exists()
    assert trainer_state(out)["global_step"] == 20
    assert trainer_state(out / "checkpoint-20")["global_step"] == 20
    losses = [e["loss"] for e in trainer_state(out)["log_history"] if "loss" in e]
    assert len(losses) == 10
    assert losses[-1] < losses[0]

    # Two ranks really ran (one rng state per rank in each checkpoint).
    assert sorted(p.name for p in (out / "checkpoint-10").glob("rng_state_*.pth")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    launch = json.loads((out / ".ft" / "attempts" / "1" / "launch.json").read_text())
    assert launch["argv"][launch["argv"].index("--nproc-per-node") + 1] == "2"

    # What the appliance reports.
    result = json.loads(res.stdout)
    assert result["state"] == "finished" and result["step"] == 20 and result["max_steps"] == 20
    assert result["restarts"] == 0
    assert result["progress"]["tokens"] > 0
    assert result["progress"]["first_loss"] > result["progress"]["loss"]
    assert str(out / "adapter_model.safetensors") in result["artifacts"]
    assert status(out)["state"] == "finished"
    assert "finished: 20/20 steps" in res.stderr
    assert "loss " in res.stderr and "tok/s" in res.stderr
    lines = [line for line in res.stderr.splitlines() if "tok/s" in line and "ETA" in line]
    assert lines and all(a != b for a, b in zip(lines, lines[1:], strict=False)), lines  # none said twice
    table = (trace / "trace.txt").read_text()
    assert table.startswith("2 steps: wall ") and "aten::mm" in table
    # Where the steps' CPU time went: the tiny Llama's base and LoRA (rank 8) matmuls, attention, the
    # loss over its vocabulary and AdamW each found their category, and nothing exceeds the wall time.
    split = json.loads((trace / "breakdown.json").read_text())
    got = split["categories"]
    assert split["steps"] == 2 and split["wall_ms"] > 0
    for name in ("base GEMMs", "LoRA GEMMs", "attention", "lm head + loss", "optimizer + grad clipping"):
        assert got[name] > 0, (name, got)
    assert sum(got.values()) <= split["wall_ms"]
    assert "LoRA GEMMs" in (trace / "breakdown.txt").read_text()


def test_demo_command_builds_layout_and_trains(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    res = run_cli("demo", str(root), "--max-steps", "10", "--save-steps", "5", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    for sub in (
        "configs/train.yaml",
        "datasets/dataset_info.json",
        "models/tiny-llama/config.json",
        "models/tiny-llama/tokenizer.json",
        "output/demo-lora/adapter_model.safetensors",
    ):
        assert (root / sub).exists(), sub
    assert "finished: 10/10 steps" in res.stdout
    assert "adapter_model.safetensors" in res.stdout
