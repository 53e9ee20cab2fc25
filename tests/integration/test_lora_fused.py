"""The grouped LoRA projections inside real LlamaFactory training (1 CPU process, the tiny Llama, bf16
autocast): the profile's worker tweak against LlamaFactory's own peft path on the same config. The
GPU inventory is the recorded L4 pair (the one faked part), so the appliance applies its profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ft_appliance.state.records import LORA_ADD_IN_GEMM, LORA_FUSED

from tests.helpers import INVENTORIES, run_cli

pytestmark = pytest.mark.slow

CONFIG = {
    "bf16": True,
    "use_cpu": True,  # transformers' condition for bf16 autocast on a CPU
    "logging_steps": 1,
    "max_steps": 6,
    "save_steps": 6,
    "per_device_train_batch_size": 2,
}


def _train(cfg: Path, env: dict[str, str] | None = None) -> tuple[list[float], dict, Path]:
    env = {"FT_GPU_INVENTORY": str(INVENTORIES / "l4.json"), **(env or {})}
    res = run_cli("train", str(cfg), "--nproc", "1", "--no-autotune", timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    events = [json.loads(line) for line in (out / ".ft" / "events.jsonl").read_text().splitlines()]
    (tweaks,) = [e["data"] for e in events if e["event"] == "tweaks"]
    return [r["loss"] for r in log if "loss" in r], tweaks, out


@pytest.fixture
def bf16_model(make_config, tmp_path: Path) -> str:
    """The tiny Llama stored in bf16, as real checkpoints are: LlamaFactory loads the dtype a model's
    config names, and the grouped path takes bf16/fp16 bases only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = yaml.safe_load(make_config("probe").read_text())["model_name_or_path"]
    dest = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(src, dtype="bfloat16").save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return str(dest)


def test_profile_groups_the_projections_and_trains_as_without(make_config, bf16_model: str) -> None:
    """The same profile with and without the grouped path (FT_SKIP_TWEAKS): the one change is the
    projections' arithmetic order, so every logged loss and the adapter agree to bf16 rounding."""
    losses, tweaks, out = _train(make_config("fused", model_name_or_path=bf16_model, **CONFIG))
    assert tweaks[LORA_FUSED] == "14 LoRA layers"  # 2 layers x 7 projections
    assert tweaks[LORA_ADD_IN_GEMM] == "0 LoRA layers"  # none left for the per-layer path
    ref, ref_tweaks, ref_out = _train(
        make_config("ungrouped", model_name_or_path=bf16_model, **CONFIG), {"FT_SKIP_TWEAKS": LORA_FUSED}
    )
    assert LORA_FUSED not in ref_tweaks and ref_tweaks[LORA_ADD_IN_GEMM] == "14 LoRA layers"
    assert len(losses) == len(ref) == CONFIG["max_steps"]
    assert losses == pytest.approx(ref, rel=5e-3)

    from safetensors.torch import load_file

    got, want = (load_file(str(o / "adapter_model.safetensors")) for o in (out, ref_out))
    assert got.keys() == want.keys()
    for k in got:
        assert float((got[k] - want[k]).norm() / want[k].norm()) < 0.02, k
