"""On a machine with NVIDIA GPUs only (skipped elsewhere): the real NVML path and a short bf16 run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ft_appliance.hardware import read_nvml

from tests.helpers import run_cli, trainer_state

INV = read_nvml()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(INV.count == 0, reason=f"no GPU: {INV.error}")]


def test_nvml_inventory_is_complete() -> None:
    g = INV.gpus[0]
    assert g.name and g.memory_total_mib > 1000 and g.compute_capability >= (3, 0)
    assert INV.driver_version and INV.driver_cuda and INV.torch_cuda


def test_check_and_short_bf16_lora_run_on_every_gpu(tmp_path: Path) -> None:
    from ft_appliance.demo import build_demo

    cfg = build_demo(tmp_path / "data", max_steps=20, save_steps=10)
    res = run_cli("check", str(cfg), "--json", timeout=300)
    report = json.loads(res.stdout)
    assert res.returncode == 0, res.stdout
    assert report["nproc"] == INV.count
    if min(g.compute_capability for g in INV.gpus) >= (8, 0):
        assert report["updates"] == {"bf16": True}
    res = run_cli("train", str(cfg), "--json", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "data" / "output" / "demo-lora"
    assert trainer_state(out)["global_step"] == 20
    result = json.loads(res.stdout)
    assert result["progress"]["tokens"] > 0 and result["progress"]["loss"] < result["progress"]["first_loss"]
