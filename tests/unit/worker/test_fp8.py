"""The FP8 profile's frozen base (worker/fp8.py) on the real tiny Llama with a peft LoRA, under bf16
autocast, on the CPU's float8 matmul: the base runs in float8, gets no gradient and saves no input;
the loss and the LoRA gradients stay close to the bf16 run's."""

from __future__ import annotations

import pytest
import torch
from ft_appliance.worker.fp8 import E4M3_MAX, quantize, use_float8_base
from ft_appliance.worker.lora import add_lora_in_gemm, keep_lora_inputs_in_compute_dtype

from tests.unit.worker.test_lora import TARGETS, lora_model, loss_and_grads, rel_err


def test_quantize_fills_the_float8_range_and_round_trips() -> None:
    t = torch.randn(64, 32) * 3
    q, inv = quantize(t, torch.float8_e4m3fn, E4M3_MAX)
    assert q.dtype == torch.float8_e4m3fn and float(q.float().abs().max()) == E4M3_MAX
    assert rel_err(q.float() * inv, t) < 0.05


@pytest.mark.parametrize("tweaks", [(), (keep_lora_inputs_in_compute_dtype, add_lora_in_gemm)], ids=["peft", "profile"])
def test_float8_base_tracks_bf16_and_leaves_the_base_frozen(tweaks: tuple) -> None:
    model = lora_model()
    for tweak in tweaks:
        tweak(model)
    want_loss, want_grads = loss_and_grads(model)
    assert use_float8_base(model) == 2 * len(TARGETS)  # every base Linear of the two layers
    loss, grads = loss_and_grads(model)
    assert loss != want_loss  # the float8 path ran: its rounding differs
    assert abs(float(loss - want_loss)) / float(want_loss) < 0.01
    for got, want in zip(grads, want_grads, strict=True):
        cos = torch.nn.functional.cosine_similarity(got.flatten().float(), want.flatten().float(), dim=0)
        assert cos > 0.98
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


def test_rows_the_kernel_cannot_take_stay_in_bf16() -> None:
    model = lora_model()
    use_float8_base(model)
    ids = torch.randint(3, 200, (1, 7))  # 7 rows: not a multiple of 16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
