"""LoRA layers under mixed precision: two ways peft's Linear spends memory traffic it need not."""

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


def add_lora_in_gemm(model: Any) -> int:
    """Give every plain peft LoRA Linear a forward that adds `scaling * B(A(x))` to the base output inside
    the second LoRA matmul (addmm's alpha and accumulate) instead of peft's `result + B(A(x)) * scaling`;
    returns how many layers changed.

    peft's expression runs two extra passes over the layer's full output (the scale, then the add) and a
    third in backward (the scale's gradient); the layer's output is (tokens x out_features), so for a
    LoRA on every linear layer of an 8B model that is a few GB of memory traffic per micro-batch, plus
    two kernel launches per layer. Rounding differs from peft's (one bf16 rounding instead of three),
    values do not. Calls the fast path does not cover (no autocast, dropout, DoRA and other variants,
    lora_bias, merged or disabled adapters, several active adapters, extra arguments) run peft's own
    forward. Quantized base layers (QLoRA) are other peft classes and are left alone.
    """
    import torch
    from peft.tuners.lora.layer import Linear

    changed = 0
    for module in model.modules():
        if type(module) is Linear and type(module.base_layer) is torch.nn.Linear and "forward" not in vars(module):
            module.forward = _gemm_add_forward(module)
            changed += 1
    return changed


def _gemm_add_forward(layer: Any) -> Any:
    import torch
    from peft.tuners.lora.layer import Linear

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = plain_call(layer, x)
        if args or kwargs or name is None:
            return Linear.forward(layer, x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        out = layer.base_layer(flat)  # autocast: compute dtype; this fresh tensor takes the sum in place
        low_rank = layer.lora_A[name](flat)
        out.addmm_(low_rank.to(out.dtype), layer.lora_B[name].weight.to(out.dtype).t(), alpha=layer.scaling[name])
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


def plain_call(layer: Any, x: Any) -> str | None:
    """The one active adapter's name when a call of peft LoRA Linear `layer` on x is one the fast paths
    here and in lora_fused.py cover (autocast on; no dropout, DoRA or other variant, lora_B bias,
    merged, disabled or several adapters); None where peft's own forward must run."""
    import torch

    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    plain = (
        name is not None
        and not layer.disable_adapters
        and not layer.merged
        and name in layer.lora_A
        and name not in layer.lora_variant
        and layer.lora_B[name].bias is None
        and isinstance(layer.lora_dropout[name], torch.nn.Identity)
        and torch.is_autocast_enabled(x.device.type)
    )
    return name if plain else None
