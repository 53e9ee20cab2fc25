"""Batch autotune in the workers, on real LlamaFactory runs (2 CPU processes, the tiny Llama).

The GPU inventory is the recorded pair of L4s (the one faked part), so the appliance asks its workers to
autotune; they time forward and backward on the CPU, agree across the two ranks, log the decision
and its cost, and cache it. A decision in the cache (a real file the appliance reads) makes the
workers regroup the config's micro-batches: joined two by two, or each cut in two. The adapter must
come out as the one trained with the config's micro-batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import INVENTORIES, run_cli

pytestmark = pytest.mark.slow

# The profile's GPU choices do not apply on CPU; the batch is what autotune regroups.
BATCH = {
    "bf16": False,
    "fp16": False,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_steps": 8,
    "save_steps": 4,
}


def _train(cfg: Path, cache: Path, *flags: str) -> tuple[Path, list[dict], str]:
    env = {"FT_GPU_INVENTORY": str(INVENTORIES / "l4.json"), "FT_CACHE_DIR": str(cache)}
    res = run_cli("train", str(cfg), "--nproc", "2", *flags, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    events = [json.loads(line) for line in (out / ".ft" / "events.jsonl").read_text().splitlines()]
    return out, [e["data"] for e in events if e["event"] == "autotune"], res.stdout + res.stderr


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_workers_time_the_sizes_log_and_cache_the_decision(make_config, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cfg = make_config("tune", **BATCH)
    out, tuned, console = _train(cfg, cache)
    assert len(tuned) == 1 and tuned[0]["source"] == "measured"
    decision = tuned[0]
    assert f"autotune (measured in {decision['seconds']:.1f} s): micro-batch {decision['micro']}" in console
    probed = [p["micro"] for p in decision["probes"]]
    assert probed[0] == 2 and set(probed) <= {1, 2, 4}  # the config's first; 4 = two joined
    assert all(p["seconds_per_token"] > 0 for p in decision["probes"])
    assert decision["seconds"] > 0 and decision["reason"]
    entry = next(iter(json.loads((cache / "autotune.json").read_text()).values()))
    assert entry["micro"] == decision["micro"] and entry["probes"] == decision["probes"]
    log = (out / ".ft" / "attempts" / "1" / "run.json").read_text()
    assert json.loads(log)["autotune"]["per_device"] == 2

    # The next start reads the decision: no probes, the same micro-batch.
    cfg2 = make_config("tune-again", **BATCH)
    _, again, console = _train(cfg2, cache)
    assert again[0]["source"] == "cache" and again[0]["micro"] == decision["micro"]
    assert f"autotune: micro-batch {decision['micro']} from the cache" in console
    assert "autotune (from the cache)" not in console  # said once, by the supervisor before the launch


@pytest.mark.parametrize("micro", [4, 1], ids=["merged", "split"])
def test_regrouped_micro_batches_train_the_same_adapter(make_config, tmp_path: Path, micro: int) -> None:
    from ft_appliance.policy.autotune import cache_key

    plain_out, _, _ = _train(make_config("plain", **BATCH), tmp_path / "c0", "--no-autotune")
    cfg = make_config("regrouped", **BATCH)
    run = json.loads((plain_out / ".ft" / "attempts" / "1" / "run.json").read_text())
    key = cache_key(run["args"], "NVIDIA L4", 2, tuple(run["tweaks"]))
    cache = tmp_path / "c1"
    cache.mkdir()
    decision = {"micro": micro, "per_device": 2, "reason": "written by the test"}
    (cache / "autotune.json").write_text(json.dumps({key: decision}))
    out, tuned, _ = _train(cfg, cache)
    assert tuned[0]["source"] == "cache" and tuned[0]["micro"] == micro
    assert _max_diff(_adapter(out), _adapter(plain_out)) < 1e-5
