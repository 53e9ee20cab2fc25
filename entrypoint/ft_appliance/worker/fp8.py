"""The FP8 profile (`--fp8-base`): a LoRA run's frozen base matmuls in float8, the LoRA path and the loss in bf16.

Each frozen base Linear keeps its weight in float8 (e4m3) with one scale, quantised once at train
begin, in two layouts: row-major for the forward, transposed for the input gradient. Each call
quantises its input per tensor (e4m3, forward) or its output gradient (e5m2, backward) and runs
torch._scaled_mm, the kernel torchao's float8 training calls. torchao's Float8Linear itself is not
used: it always computes the weight gradient, a third of the base's matmuls, which a frozen base does
not need. Neither does it need its input saved for backward, so the base saves no activations.

The input of q, k and v (and of gate and up) is one tensor: it is quantised once and reused.
Hopper and Ada (compute capability 8.9 and newer) run float8 matmuls; preflight refuses others.
"""

from __future__ import annotations

from typing import Any

E4M3_MAX = 448.0
E5M2_MAX = 57344.0


def quantize(t: Any, dtype: Any, limit: float) -> tuple[Any, Any]:
    """(t in float8, the inverse scale as a float32 scalar): one scale for the whole tensor.

    On the GPU through torch.compile: eager, the scaling runs five passes over the tensor (abs, amax,
    the fp32 copy, the scale, the clamp and the cast), as much memory traffic as the matmul it feeds;
    compiled it is one reduction and one fused cast."""
    t = t.contiguous()  # the kernel takes row-major operands
    if not t.is_cuda:
        return _quantize(t, dtype, limit)
    if _compiled.fn is None:
        import torch

        _compiled.fn = torch.compile(_quantize, dynamic=True)
    return _compiled.fn(t, dtype, limit)


def _quantize(t: Any, dtype: Any, limit: float) -> tuple[Any, Any]:
    amax = t.abs().amax().float().clamp(min=1e-12)
    scale = limit / amax
    return (t.float() * scale).clamp(-limit, limit).to(dtype), scale.reciprocal()


class _Compiled:
    fn: Any = None


_compiled = _Compiled()


class _LastInput:
    """The last quantised input: q, k and v (gate and up) read the same tensor one after the other.
    Each layer passes its own view of it, so the key is its memory, version and shape; the tensor is
    held, so that no other tensor can take that memory while the entry lives."""

    key: tuple[int, int, tuple[int, ...]] | None = None
    tensor: Any = None
    value: tuple[Any, Any] | None = None


_last = _LastInput()


def _quantized_input(x: Any) -> tuple[Any, Any]:
    import torch

    key = (x.data_ptr(), x._version, tuple(x.shape))
    if _last.key != key:
        _last.key, _last.tensor, _last.value = key, x, quantize(x, torch.float8_e4m3fn, E4M3_MAX)
    return _last.value  # type: ignore[return-value]


def _function() -> Any:
    import torch

    class FrozenFloat8Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, flat: Any, weight: Any, weight_t: Any, inv: Any) -> Any:
            # 2D in, 2D out, and never a view: the LoRA layer adds its output in place.
            xq, x_inv = _quantized_input(flat)
            ctx.save_for_backward(weight_t, inv)
            return torch._scaled_mm(xq, weight.t(), scale_a=x_inv, scale_b=inv, out_dtype=torch.bfloat16)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            weight_t, inv = ctx.saved_tensors
            gq, g_inv = quantize(grad, torch.float8_e5m2, E5M2_MAX)
            dx = torch._scaled_mm(gq, weight_t.t(), scale_a=g_inv, scale_b=inv, out_dtype=torch.bfloat16)
            return dx, None, None, None

    return FrozenFloat8Matmul


def eligible(linear: Any) -> bool:
    """A frozen bias-free Linear whose sizes the float8 kernel takes (multiples of 16)."""
    w = linear.weight
    return not w.requires_grad and linear.bias is None and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0


def frozen_float8_forward(linear: Any) -> Any:
    """A forward for `linear` through float8; its bf16 weight stays as it is (saves and merges read it)."""
    import torch

    weight, inv = quantize(linear.weight.detach(), torch.float8_e4m3fn, E4M3_MAX)
    weight_t = weight.t().contiguous()
    matmul = _function()

    def forward(x: Any) -> Any:
        rows = x.numel() // x.shape[-1]
        if rows % 16:  # the kernel's shape rule; such calls (decoding, odd lengths) stay in bf16
            return torch.nn.functional.linear(x.to(torch.bfloat16), linear.weight)
        out = matmul.apply(x.to(torch.bfloat16).reshape(rows, x.shape[-1]), weight, weight_t, inv)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    return forward


def use_float8_base(model: Any) -> int:
    """Route every eligible base Linear of a peft LoRA layer through float8; returns how many."""
    from peft.tuners.lora.layer import Linear

    changed = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(module, Linear) and type(base).__name__ == "Linear" and eligible(base):
            base.forward = frozen_float8_forward(base)
            changed += 1
    return changed
