"""Batch autotune, the pure part: which micro-batches to probe, which one fits, what the cache key is,
and what the config becomes. The probes themselves (real 2-step runs through the supervisor) and
the cache file are run/probe.py's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config.plan import Plan, RetryPolicy

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


def updates_for(per: int, ga: int, micro: int, world: int, note: str) -> tuple[dict[str, Any], list[str]]:
    """The config change for a chosen micro-batch, keeping the effective batch."""
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
