"""A typed view of LlamaFactory's arguments, for the places that read the same keys (preflight, the
profile, autotune): one spelling of each default and each derived fact. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _int(args: Mapping[str, Any], key: str, default: int) -> int:
    value = args.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value else default


def per_device(args: Mapping[str, Any]) -> int:
    return _int(args, "per_device_train_batch_size", 8)


def grad_accum(args: Mapping[str, Any]) -> int:
    return _int(args, "gradient_accumulation_steps", 1)


def cutoff(args: Mapping[str, Any]) -> int:
    return _int(args, "cutoff_len", 2048)


def is_full(args: Mapping[str, Any]) -> bool:
    """Full-weight training (optimizer state for every trained weight): full and freeze."""
    return args.get("finetuning_type", "lora") in ("full", "freeze")


def zero_stage(args: Mapping[str, Any]) -> int | None:
    """The DeepSpeed ZeRO stage the config names, by LlamaFactory's file naming (ds_z3_...), or None."""
    ds = str(args.get("deepspeed") or "")
    if not ds:
        return None
    for stage in (3, 2, 1, 0):
        if f"z{stage}" in ds or f"zero{stage}" in ds:
            return stage
    return 0


def names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def dataset_names(args: Mapping[str, Any]) -> list[str]:
    """Every dataset and eval_dataset name, whether written as "a,b" or as a YAML list."""
    return [n for key in ("dataset", "eval_dataset") for n in names(args.get(key))]
