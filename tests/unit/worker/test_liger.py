"""The sync-free stand-in for Liger's fused-loss backward, on CPU tensors (Liger itself is GPU-only:
tests/gpu runs it through Liger's Function with synchronisation made an error)."""

from __future__ import annotations

import torch
from ft_appliance.worker.liger import backward_without_sync


def test_a_scale_of_one_changes_no_value_and_another_scales_as_liger_does() -> None:
    torch.manual_seed(0)
    grad_input = torch.randn(8, 16).to(torch.bfloat16)
    grad_weight = torch.randn(32, 16)
    one = torch.tensor(1.0)
    gi, gw, gb = backward_without_sync(one, grad_input, grad_weight, None)
    assert torch.equal(gi, grad_input) and gi.dtype == torch.bfloat16
    assert torch.equal(gw, grad_weight) and gb is None
    scale = torch.tensor(1 / 3)
    gi, gw, _ = backward_without_sync(scale, grad_input, grad_weight, None)
    # computed in fp32, rounded once to bf16 (Liger's element-wise kernel: load, multiply, store)
    assert torch.equal(gi, (grad_input.float() * (1 / 3)).to(torch.bfloat16))
    torch.testing.assert_close(gw, grad_weight / 3)


def test_autograds_saved_tensors_are_left_as_they_were() -> None:
    saved = torch.ones(4, 4)
    out, _, _ = backward_without_sync(torch.tensor(0.5), saved, None, None)
    assert torch.equal(saved, torch.ones(4, 4)) and saved._version == 0
    assert torch.equal(out, torch.full((4, 4), 0.5))
