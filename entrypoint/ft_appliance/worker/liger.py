"""Liger's fused linear cross-entropy without the device synchronisation in its backward.

Liger's backward (liger_kernel.ops.fused_linear_cross_entropy, 0.8.5) skips a multiply when the loss is
the graph's last node, and finds out with `torch.equal(grad_output, torch.tensor(1.0, device=...))`:
the tensor's copy to the GPU and the comparison's read back each wait for the GPU queue to empty, two of
the three synchronisations per micro-batch in the profile's H200 trace (docs/benchmarks.md), and the
GPU then idles while the host launches the backward. Scaling by grad_output every time gives the same
values (a multiply by 1.0 is exact) and waits for nothing.
"""

from __future__ import annotations

from typing import Any


def backward_without_sync(grad_output: Any, grad_input: Any, grad_weight: Any, grad_bias: Any) -> tuple[Any, Any, Any]:
    """Liger's fused_linear_cross_entropy_backward, the check left out. Out of place: these are
    autograd's saved tensors, which Liger too leaves to its own kernel rather than in-place torch ops.
    A bf16 tensor times the 0-dim fp32 grad_output is computed in fp32 and rounded once, as Liger's
    element-wise kernel does."""

    def scaled(t: Any) -> Any:
        return None if t is None else t * grad_output

    return scaled(grad_input), scaled(grad_weight), scaled(grad_bias)


def drop_loss_backward_sync() -> bool:
    """Point Liger's fused loss Function at backward_without_sync (it looks the function up in its
    module at every call); False where Liger or that function is missing."""
    try:
        from liger_kernel.ops import fused_linear_cross_entropy as flce
    except ImportError:
        return False
    if not callable(getattr(flce, "fused_linear_cross_entropy_backward", None)):
        return False
    flce.fused_linear_cross_entropy_backward = backward_without_sync
    return True
