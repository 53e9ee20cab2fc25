"""LoRA layers under mixed precision: keep their inputs in the compute dtype."""

from __future__ import annotations

from typing import Any


def keep_lora_inputs_in_compute_dtype(model: Any) -> int:
    """Stop peft casting each LoRA layer's input to the adapter's fp32 weights' dtype; returns how many
    layers changed.

    Under autocast the cast is a round trip (bf16 -> fp32 -> autocast back to bf16 for the matmul)
    that changes no value, yet copies every LoRA layer's input twice, forward and backward. Only for
    autocast training: without it an fp32 adapter needs fp32 inputs.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and getattr(module, "cast_input_dtype_enabled", False):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed
