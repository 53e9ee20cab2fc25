"""Batch autotune: the largest per-device micro-batch (or pack count) that fits at about 80% of GPU
memory, found with short real training probes, keeping the effective batch by adjusting gradient
accumulation. Decisions are cached per model, card, cutoff and method in the volume.

The choice itself is pure (candidates, choose); probing runs the normal launch path for 2 steps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import statefiles
from .config import Plan, RetryPolicy

TARGET = 0.8
PROBE_STEPS = 2
# What the memory of a step depends on; the cache key is built from these and the card.
KEY_ARGS = (
    "model_name_or_path",
    "cutoff_len",
    "finetuning_type",
    "lora_rank",
    "lora_target",
    "quantization_bit",
    "packing",
    "neat_packing",
    "enable_liger_kernel",
    "disable_gradient_checkpointing",
    "deepspeed",
    "bf16",
    "fp16",
    "flash_attn",
)


def candidates(per_device: int, grad_accum: int) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs with the same product, largest micro-batch first."""
    total = per_device * grad_accum
    return [(m, total // m) for m in range(total, 0, -1) if total % m == 0]


def choose(peaks: Mapping[int, int | None], gpu_bytes: int, target: float = TARGET) -> int | None:
    """The largest micro-batch whose probe peaked within target of the card (None: out of memory)."""
    fitting = [m for m, peak in peaks.items() if peak is not None and peak <= target * gpu_bytes]
    return max(fitting, default=None)


def cache_key(args: Mapping[str, Any], gpu_name: str, world: int) -> str:
    parts = {k: args.get(k) for k in KEY_ARGS}
    parts["gpu"] = gpu_name
    parts["world"] = world
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def probe_plan(plan: Plan, micro: int, probe_dir: Path) -> Plan:
    args = {
        **plan.args,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": 1,
        "max_steps": PROBE_STEPS,
        "save_strategy": "no",
        "logging_steps": 1,
        "output_dir": str(probe_dir),
        "report_to": "none",
    }
    args.pop("num_train_epochs", None)
    return replace(plan, args=args, output_dir=probe_dir, retry=RetryPolicy(max_restarts=0), notes=())


def autotune(
    plan: Plan,
    gpu_name: str,
    gpu_bytes: int,
    world: int,
    cache: Path,
    run_probe: Callable[[Plan], int | None],
    echo: Callable[[str], None],
) -> tuple[dict[str, Any], list[str]]:
    """(argument updates, notes). run_probe trains a probe plan and returns its peak reserved bytes,
    or None when it ran out of memory."""
    per = int(plan.args.get("per_device_train_batch_size", 8) or 8)
    ga = int(plan.args.get("gradient_accumulation_steps", 1) or 1)
    key = cache_key(plan.args, gpu_name, world)
    cached = (statefiles.read_json(cache) or {}).get(key)
    if isinstance(cached, dict) and "micro" in cached:
        micro = int(cached["micro"])
        note = f"autotune: micro-batch {micro} from the cache ({cache.name}, key {key})"
    else:
        peaks: dict[int, int | None] = {}
        micro = None
        for m, _ in candidates(per, ga):
            echo(f"[ft] autotune: probing micro-batch {m} ({PROBE_STEPS} steps)")
            peak = run_probe(probe_plan(plan, m, plan.output_dir / ".ft" / "autotune" / f"micro-{m}"))
            peaks[m] = peak
            echo(f"[ft] autotune: micro-batch {m}: " + (f"peak {peak / 2**30:.1f} GiB" if peak else "out of memory"))
            if choose(peaks, gpu_bytes) is not None:
                micro = choose(peaks, gpu_bytes)
                break
        if micro is None:
            return {}, ["autotune: no micro-batch fit within 80% of GPU memory; keeping the config's"]
        data = statefiles.read_json(cache) or {}
        data[key] = {"micro": micro, "peaks": {str(k): v for k, v in peaks.items()}, "gpu": gpu_name}
        try:
            statefiles.write_json(cache, data)
        except OSError:
            pass
        note = (
            f"autotune: micro-batch {micro} peaked at {peaks[micro] / 2**30:.1f} GiB of "
            f"{gpu_bytes / 2**30:.0f} GiB (target {TARGET:.0%})"
        )
    new_ga = per * ga // micro
    if (micro, new_ga) == (per, ga):
        return {}, [note + f"; per_device_train_batch_size {per} kept"]
    return (
        {"per_device_train_batch_size": micro, "gradient_accumulation_steps": new_ga},
        [
            note + f"; per_device_train_batch_size {per} -> {micro}, gradient_accumulation_steps {ga} -> {new_ga} "
            f"(effective batch {per * ga * world} kept)"
        ],
    )
