"""The default performance profile (pure): the speed settings LlamaFactory leaves off, applied only on
GPUs and only for keys the user's YAML does not set. `--no-profile` turns it off.

Each choice comes with its reason, logged at start. Measured effects are in docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GiB = 2**30

# Activation bytes per token per layer without gradient checkpointing, in units of hidden_size
# (bf16 LoRA, SDPA, Liger's fused MLP/RMSNorm): calibrated on the Llama-3.1-8B benchmark run
# (58.4 GiB reserved at 4 x 2048 tokens with 16 GiB of weights).
ACTIVATION_BYTES_PER_TOKEN_LAYER_H = 42
MEMORY_TARGET = 0.8


@dataclass(frozen=True)
class GpuFacts:
    compute_capability: tuple[int, int]
    memory_bytes: int
    liger_available: bool
    flash_attn_available: bool


def activation_bytes(config: Mapping[str, Any], tokens: int) -> float:
    h = int(config.get("hidden_size", 0))
    layers = int(config.get("num_hidden_layers", 0))
    return float(tokens * layers * h * ACTIVATION_BYTES_PER_TOKEN_LAYER_H)


def fits_without_checkpointing(
    weights_bytes: float, config: Mapping[str, Any], args: Mapping[str, Any], gpu_bytes: int
) -> tuple[bool, float]:
    per = int(args.get("per_device_train_batch_size", 8) or 8)
    cutoff = int(args.get("cutoff_len", 2048) or 2048)
    need = weights_bytes + activation_bytes(config, per * cutoff)
    return need <= MEMORY_TARGET * gpu_bytes, need


def performance_profile(
    args: Mapping[str, Any], gpu: GpuFacts, config: Mapping[str, Any] | None, weights_bytes: float | None
) -> tuple[dict[str, Any], list[str]]:
    """(updates, notes). Never touches a key the user set."""
    updates: dict[str, Any] = {}
    notes: list[str] = []

    def choose(key: str, value: Any, why: str) -> None:
        if key in args:
            notes.append(f"profile: {key} left as the config says ({args[key]!r})")
            return
        updates[key] = value
        notes.append(f"profile: {key}: {value} ({why})")

    if gpu.liger_available:
        choose(
            "enable_liger_kernel",
            True,
            "fused Triton kernels for RMSNorm, SwiGLU, RoPE and the loss: less memory and time per step",
        )
    if args.get("stage", "sft") in ("sft", "pt") and "packing" not in args and "neat_packing" not in args:
        choose("packing", True, "no compute spent on padding")
        choose("neat_packing", True, "examples in a pack cannot attend to each other, as without packing")
    if gpu.flash_attn_available and gpu.compute_capability >= (8, 0):
        choose("flash_attn", "fa2", "FlashAttention-2 is installed and the card supports it")
    elif "flash_attn" not in args:
        notes.append("profile: flash_attn: auto (SDPA; flash-attn is not installed)")
    if config and weights_bytes is not None and "disable_gradient_checkpointing" not in args:
        fits, need = fits_without_checkpointing(weights_bytes, config, args, gpu.memory_bytes)
        if fits:
            choose(
                "disable_gradient_checkpointing",
                True,
                f"about {need / GiB:.0f} GiB needed without it, within "
                f"{MEMORY_TARGET:.0%} of {gpu.memory_bytes / GiB:.0f} GiB: no recomputation",
            )
        else:
            notes.append(
                f"profile: gradient checkpointing kept: about {need / GiB:.0f} GiB needed without it, "
                f"over {MEMORY_TARGET:.0%} of {gpu.memory_bytes / GiB:.0f} GiB"
            )
    return updates, notes
