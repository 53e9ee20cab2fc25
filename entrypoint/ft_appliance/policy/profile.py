"""The default performance profile (pure): the speed settings LlamaFactory leaves off, applied only on
GPUs and only for keys the user's YAML does not set. `--no-profile` turns it off.

Each choice comes with its reason, logged at start. Measured effects are in docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config.args import cutoff, per_device
from ..state.records import (
    BLOCKDIAG_ATTENTION,
    FP8_BASE,
    LIGER_LOSS_NO_SYNC,
    LORA_ADD_IN_GEMM,
    LORA_FUSED,
    LORA_INPUTS,
)

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
    flex_available: bool = False
    """torch ships FlexAttention (torch.nn.attention.flex_attention, torch >= 2.5)."""


@dataclass
class Profile:
    updates: dict[str, Any] = field(default_factory=dict)
    """LlamaFactory keys the profile sets; never one the user's YAML set."""
    notes: list[str] = field(default_factory=list)
    tweaks: list[str] = field(default_factory=list)
    """Changes the worker makes to the loaded model or its kernels, BLOCKDIAG_ATTENTION, LORA_INPUTS,
    LORA_FUSED, LORA_ADD_IN_GEMM and LIGER_LOSS_NO_SYNC below; LlamaFactory has no key for them."""


def activation_bytes(config: Mapping[str, Any], tokens: int) -> float:
    h = int(config.get("hidden_size", 0))
    layers = int(config.get("num_hidden_layers", 0))
    return float(tokens * layers * h * ACTIVATION_BYTES_PER_TOKEN_LAYER_H)


def fits_without_checkpointing(
    weights_bytes: float, config: Mapping[str, Any], args: Mapping[str, Any], gpu_bytes: int
) -> tuple[bool, float]:
    need = weights_bytes + activation_bytes(config, per_device(args) * cutoff(args))
    return need <= MEMORY_TARGET * gpu_bytes, need


def performance_profile(
    args: Mapping[str, Any],
    gpu: GpuFacts,
    config: Mapping[str, Any] | None,
    weights_bytes: float | None,
    fp8_base: bool = False,
) -> Profile:
    """Never touches a key the user set. fp8_base: the opt-in FP8 profile (preflight checked it applies)."""
    profile = Profile()
    updates, notes = profile.updates, profile.notes

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
        if updates.get("enable_liger_kernel", args.get("enable_liger_kernel")):
            profile.tweaks.append(LIGER_LOSS_NO_SYNC)
            notes.append(
                "profile: Liger's fused loss backward scales its gradient without first comparing the "
                "scale with 1.0 on the CPU (a wait for the GPU at every micro-batch; the values are the same)"
            )
    if args.get("stage", "sft") in ("sft", "pt") and "packing" not in args and "neat_packing" not in args:
        choose("packing", True, "no compute spent on padding")
        choose("neat_packing", True, "examples in a pack cannot attend to each other, as without packing")
    _choose_attention(profile, args, gpu, choose)
    if config and weights_bytes is not None and "disable_gradient_checkpointing" not in args:
        _choose_checkpointing(profile, args, gpu, config, weights_bytes, choose)
    _choose_lora_tweaks(profile, args, fp8_base)
    if fp8_base:
        profile.tweaks.append(FP8_BASE)
        profile.notes.append(
            "profile: the frozen base's matmuls in float8 (--fp8-base): weights quantised once, inputs and "
            "gradients per call; the LoRA path, the loss and the optimizer stay in bf16/fp32"
        )
    if args.get("dataloader_pin_memory", True):
        choose(
            "accelerator_config",
            {"non_blocking": True},
            "batches are copied to the GPU from pinned memory without waiting: a blocking copy empties "
            "the GPU's queue at every micro-batch, and it idles while the host launches the next forward",
        )
    choose(
        "logging_nan_inf_filter",
        False,
        "its NaN check reads every micro-batch's loss on the CPU, stalling the GPU queue each time; it "
        "only changes what the log shows",
    )
    return profile


Choose = Callable[[str, Any, str], None]


def _choose_attention(profile: Profile, args: Mapping[str, Any], gpu: GpuFacts, choose: Choose) -> None:
    notes = profile.notes
    neat = bool(profile.updates.get("neat_packing", args.get("neat_packing")))
    if gpu.flash_attn_available and gpu.compute_capability >= (8, 0):
        choose("flash_attn", "fa2", "FlashAttention-2 is installed and the card supports it")
    elif "flash_attn" in args:
        notes.append(f"profile: flash_attn left as the config says ({args['flash_attn']!r})")
    elif neat and gpu.flex_available and gpu.compute_capability >= (8, 0):
        profile.tweaks.append(BLOCKDIAG_ATTENTION)
        notes.append(
            "profile: attention: examples kept apart by torch's FlashAttention-2 varlen kernel, or by "
            "FlexAttention with a block-sparse mask where torch lacks it (flash-attn is not installed; SDPA "
            "would read a dense 4D block-diagonal mask, forward and backward)"
        )
    else:
        notes.append("profile: flash_attn: auto (SDPA; flash-attn is not installed)")


def _choose_checkpointing(
    profile: Profile,
    args: Mapping[str, Any],
    gpu: GpuFacts,
    config: Mapping[str, Any],
    weights_bytes: float,
    choose: Choose,
) -> None:
    fits, need = fits_without_checkpointing(weights_bytes, config, args, gpu.memory_bytes)
    if fits:
        choose(
            "disable_gradient_checkpointing",
            True,
            f"about {need / GiB:.0f} GiB needed without it, within "
            f"{MEMORY_TARGET:.0%} of {gpu.memory_bytes / GiB:.0f} GiB: no recomputation",
        )
    else:
        profile.notes.append(
            f"profile: gradient checkpointing kept: about {need / GiB:.0f} GiB needed without it, "
            f"over {MEMORY_TARGET:.0%} of {gpu.memory_bytes / GiB:.0f} GiB"
        )


def _choose_lora_tweaks(profile: Profile, args: Mapping[str, Any], fp8_base: bool) -> None:
    notes = profile.notes
    # Autocast only: DeepSpeed and FSDP manage the adapter's dtype themselves.
    autocast = bool(args.get("bf16") or args.get("fp16")) and not args.get("pure_bf16")
    autocast = autocast and not args.get("deepspeed") and not args.get("fsdp")
    if args.get("finetuning_type", "lora") == "lora" and autocast:
        profile.tweaks.append(LORA_INPUTS)
        notes.append(
            "profile: LoRA layer inputs stay in the compute dtype (peft casts them to the adapter's fp32 "
            "and autocast casts them straight back: no value changes, two copies per layer saved)"
        )
        profile.tweaks.append(LORA_ADD_IN_GEMM)
        notes.append(
            "profile: LoRA output added inside its second matmul (peft scales and adds it in two more "
            "passes over each layer's output, and a third in backward)"
        )
        if not fp8_base:  # the float8 base replaces the base matmuls this path would run
            profile.tweaks.append(LORA_FUSED)
            notes.append(
                "profile: LoRA projections that share an input (q/k/v, gate/up) run as one autograd node: one "
                "low-rank GEMM per group, each base GEMM accumulating into its LoRA product, the input "
                "gradient written once with every dy·W accumulated into it (no per-projection passes, no "
                "gradient sums)"
            )
