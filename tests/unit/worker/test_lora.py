"""The profile's two LoRA changes, on a real peft model (the tiny Llama, fp32 adapters as LlamaFactory
keeps them) under bf16 autocast on CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from ft_appliance.worker.lora import add_lora_in_gemm, keep_lora_inputs_in_compute_dtype
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tests.unit.worker.test_attention import TINY, packed_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(**lora: object) -> torch.nn.Module:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16)
    # init_lora_weights=False: B is random too, so the LoRA branch changes the output.
    model = get_peft_model(base, LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False, **lora))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def loss_and_grads(model: torch.nn.Module, autocast: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ids = packed_batch()["input_ids"]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_lora_inputs_in_compute_dtype_change_nothing_under_autocast() -> None:
    """Same loss, same gradients, bit for bit."""
    model = lora_model()
    loss, grads = loss_and_grads(model)
    assert keep_lora_inputs_in_compute_dtype(model) == 2 * len(TARGETS)
    assert keep_lora_inputs_in_compute_dtype(model) == 0  # already done
    loss2, grads2 = loss_and_grads(model)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def assert_as_close_to_fp32_as_peft(change: Callable[[torch.nn.Module], int], grad_factor: float) -> None:
    """`change` applied to the tiny model (it must change every LoRA layer, once): its loss and each
    gradient held against the same model in fp32, no further off than peft's own (gradients within
    `grad_factor` of peft's distance), and close to peft's."""
    model = lora_model()
    want_loss, want_grads = loss_and_grads(lora_model().float(), autocast=False)
    peft_loss, peft_grads = loss_and_grads(model)

    assert change(model) == 2 * len(TARGETS)
    assert change(model) == 0  # already done
    loss, grads = loss_and_grads(model)

    assert abs(float(loss - want_loss)) <= abs(float(peft_loss - want_loss)) + 1e-3
    for got, peft, want in zip(grads, peft_grads, want_grads, strict=True):
        assert rel_err(got, want) <= rel_err(peft, want) * grad_factor + 1e-3
        assert rel_err(got, peft) < 0.05
    torch.testing.assert_close(loss, peft_loss, atol=2e-2, rtol=0)


def test_lora_add_in_gemm_is_at_least_as_close_to_fp32_as_peft() -> None:
    """Not bit-identical (one bf16 rounding of the sum instead of three), so both are held against the
    same model computed in fp32: the fused layer's loss and gradients are no further from it than
    peft's, and close to peft's."""
    assert_as_close_to_fp32_as_peft(add_lora_in_gemm, grad_factor=1.1)


def test_lora_add_in_gemm_steps_aside_where_peft_does_more() -> None:
    """Without autocast, with dropout, or with the adapter disabled, peft's own forward runs: the same
    values bit for bit."""
    cases = [({}, {"autocast": False}), ({"lora_dropout": 0.1}, {}), ({}, {})]
    for lora, kwargs in cases:
        model = lora_model(**lora).eval()  # eval: dropout off, so both runs see the same mask
        disable = lora == {} and kwargs == {}
        ids = packed_batch()["input_ids"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kwargs.get("autocast", True)):
            if disable:
                with model.disable_adapter():
                    expected = model(input_ids=ids).logits
            else:
                expected = model(input_ids=ids).logits
            add_lora_in_gemm(model)
            if disable:
                with model.disable_adapter():
                    got = model(input_ids=ids).logits
            else:
                got = model(input_ids=ids).logits
        assert torch.equal(got, expected), (lora, kwargs)


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_lora_add_in_gemm_keeps_shapes(dims: int) -> None:
    """(tokens x features) and (batch x length x features) inputs both come back in their own shape."""
    model = lora_model()
    add_lora_in_gemm(model)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(*([2] * (dims - 2)), 5, TINY["hidden_size"], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).shape == (*x.shape[:-1], TINY["intermediate_size"])
