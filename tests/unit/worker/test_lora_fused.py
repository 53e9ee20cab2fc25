"""The grouped LoRA projections (worker/lora_fused.py) on a real peft model: the tiny Llama with fp32
adapters as LlamaFactory keeps them, under bf16 autocast on CPU. Not bit-identical to peft (bf16
rounding in another order), so both are held against the same model computed in fp32."""

from __future__ import annotations

import pytest
import torch
from ft_appliance.worker.lora_fused import fuse_lora_projections

from tests.unit.worker.test_attention import TINY, packed_batch
from tests.unit.worker.test_lora import assert_as_close_to_fp32_as_peft, lora_model, loss_and_grads, rel_err

GROUPS = {"self_attn": [["q_proj", "k_proj", "v_proj"], ["o_proj"]], "mlp": [["gate_proj", "up_proj"], ["down_proj"]]}


def group_outputs_and_grads(model: torch.nn.Module, block: str, names: list[str], autocast: bool) -> list[torch.Tensor]:
    """One group of one decoder layer on a fixed input and fixed output gradients: the outputs, the
    input's gradient and the group's adapter gradients."""
    parent = getattr(model.base_model.model.model.layers[1], block)
    layers = [getattr(parent, n) for n in names]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, layers[0].in_features, generator=gen)
    x = (x if not autocast else x.bfloat16()).requires_grad_(True)
    dys = [torch.randn(64, m.out_features, generator=gen) for m in layers]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = [m(x) for m in layers]
    sum((o.float() * d).sum() for o, d in zip(outs, dys, strict=True)).backward()
    adapters = [p.grad for m in layers for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    return [o.detach().float() for o in outs] + [x.grad.float()] + adapters


@pytest.mark.parametrize("base_first", [False, True], ids=["lora-first", "base-first"])
@pytest.mark.parametrize("block,names", [(b, n) for b, groups in GROUPS.items() for n in groups])
def test_each_group_is_as_close_to_fp32_as_peft(block: str, names: list[str], base_first: bool) -> None:
    """Outputs, the input gradient and every adapter gradient of one group, against the same layers in
    fp32: no further off than peft's (bf16 roundings in another order, not fewer digits), whichever
    GEMM each sum starts with."""
    want = group_outputs_and_grads(lora_model().float(), block, names, autocast=False)
    peft = group_outputs_and_grads(lora_model(), block, names, autocast=True)
    model = lora_model()
    fuse_lora_projections(model, base_first=base_first)
    got = group_outputs_and_grads(model, block, names, autocast=True)
    for g, p, w in zip(got, peft, want, strict=True):
        assert rel_err(g, w) <= rel_err(p, w) * 1.05 + 1e-4


@pytest.mark.parametrize("base_first", [False, True], ids=["lora-first", "base-first"])
def test_whole_model_loss_and_gradients_stay_with_peft(base_first: bool) -> None:
    """The whole tiny model: every layer's roundings feed the next, so each gradient is held against
    fp32 within twice peft's own distance, and the loss within bf16's."""
    assert TINY["num_hidden_layers"] == 2  # the helper counts 2 x 7 LoRA layers
    assert_as_close_to_fp32_as_peft(lambda m: fuse_lora_projections(m, base_first=base_first), grad_factor=2)


@pytest.mark.parametrize(
    ("text", "base_first"), [(None, False), ("", False), ("base-first", True), ("lora-first", False), ("x", False)]
)
def test_the_sum_order_comes_from_ft_lora_sum_order(text: str | None, base_first: bool) -> None:
    from ft_appliance.worker.lora_fused import sum_order

    assert sum_order(text) is base_first


def test_the_frozen_weights_are_left_as_they_are() -> None:
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    fuse_lora_projections(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight is q


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = lora_model()
    fuse_lora_projections(model)
    loss, grads = loss_and_grads(model)
    model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    loss2, grads2 = loss_and_grads(model)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))


@pytest.mark.parametrize("case", ["no-autocast", "dropout", "disabled"])
def test_steps_aside_where_peft_does_more(case: str) -> None:
    """Without autocast, with dropout, or with the adapter disabled, peft's own forward runs: the same
    values bit for bit."""
    model = lora_model(**({"lora_dropout": 0.1} if case == "dropout" else {})).eval()
    ids = packed_batch()["input_ids"]

    def logits() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "no-autocast"):
            if case == "disabled":
                with model.disable_adapter():
                    return model(input_ids=ids).logits
            return model(input_ids=ids).logits

    expected = logits()
    fuse_lora_projections(model)
    assert torch.equal(logits(), expected)


def test_an_output_left_unused_gets_no_gradient_from_it() -> None:
    """Calling only q of a q/k/v group (the others' outputs are computed and wait, unused): q's
    gradients match peft's, and k's and v's adapters get zero."""
    model = lora_model()
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(6, TINY["hidden_size"], dtype=torch.bfloat16, requires_grad=True)

    def grads() -> tuple[torch.Tensor, ...]:
        model.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attn.q_proj(x).float().square().sum().backward()
        return x.grad.clone(), attn.q_proj.lora_A["default"].weight.grad.clone()

    want = grads()
    fuse_lora_projections(model)
    got = grads()
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b.float()) < 0.02
    assert not attn.k_proj.lora_B["default"].weight.grad.any()
