"""The block-diagonal attention path, on CPU: the same model, the same packed batch, once with
LlamaFactory's 4D block-diagonal mask under SDPA and once through the appliance's attention function
(with CPU kernels standing in for the CUDA varlen and FlexAttention ones; tests/gpu checks those)."""

from __future__ import annotations

import pytest
import torch
from ft_appliance.worker import attention
from llamafactory.data.collator import prepare_4d_attention_mask
from transformers import LlamaConfig, LlamaForCausalLM

# Two packed rows of 24 tokens: examples of 5, 7 and 4 tokens then padding; examples of 10 and 14.
ROWS = [[5, 7, 4], [10, 14]]
LENGTH = 24


def packed_batch() -> dict[str, torch.Tensor]:
    """What LlamaFactory's neat packing hands the model: position_ids restarting at 0 per example,
    an attention mask of example indices (1, 2, ...; 0 for padding)."""
    positions, indices = [], []
    for row in ROWS:
        pos = [p for n in row for p in range(n)]
        idx = [i + 1 for i, n in enumerate(row) for _ in range(n)]
        pad = LENGTH - len(pos)
        positions.append(pos + [0] * pad)
        indices.append(idx + [0] * pad)
    torch.manual_seed(0)
    return {
        "input_ids": torch.randint(3, 200, (len(ROWS), LENGTH)),
        "position_ids": torch.tensor(positions),
        "segment_mask": torch.tensor(indices),
    }


TINY = dict(
    vocab_size=200,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in Llama-3.1-8B
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="sdpa")).eval()


def test_examples_start_wherever_position_ids_restart() -> None:
    ids = attention.example_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 0, 1, 2]]))
    assert ids.tolist() == [[1, 1, 1, 2, 2, 3, 4], [1, 1, 1, 1, 2, 2, 2]]


def test_pieces_start_at_rows_and_examples_and_a_rows_padding_is_one_piece() -> None:
    position_ids = torch.tensor(
        [
            [0, 1, 2, 0, 1, 0, 0, 0],  # examples of 3 and 2, then three pad tokens (position 0 each)
            [0, 1, 2, 3, 0, 0, 1, 2],  # a one-token example between two longer ones: its own piece
            [3, 4, 5, 6, 7, 8, 9, 10],  # a row that does not start at 0 still starts a piece
        ]
    )
    cu, bound = attention.segments(position_ids)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 8, 12, 13, 16, 24]
    assert bound == 8  # the row length: no piece is longer


@pytest.mark.parametrize(
    ("text", "order"),
    [
        (None, ("varlen", "flex")),
        ("", ("varlen", "flex")),
        ("flex", ("flex",)),
        ("flex, varlen", ("flex", "varlen")),
        ("flex,flex,fa3", ("flex",)),  # repeats and unknown names dropped
        ("fa3", ("varlen", "flex")),
        ("cudnn,varlen", ("cudnn", "varlen")),
    ],
)
def test_the_kernel_order_comes_from_ft_attention_kernels(text: str | None, order: tuple[str, ...]) -> None:
    assert attention.kernel_order(text) == order


def test_reference_kernel_keeps_examples_apart_and_causal() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    examples = torch.tensor([[1] * 4 + [2] * 5])
    out = attention.reference_kernel(q, k, v, examples, None)
    # the second example alone gives the same result: nothing leaked from the first
    alone = attention.reference_kernel(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], examples[:, 4:], None)
    torch.testing.assert_close(out[:, :, 4:], alone)
    # a token sees only what came before it: changing a later token changes nothing earlier
    v2 = v.clone()
    v2[:, :, 8] += 10
    torch.testing.assert_close(attention.reference_kernel(q, k, v2, examples, None)[:, :, :8], out[:, :, :8])


@pytest.mark.parametrize(
    "kernel", [attention.dense_kernel(), attention.reference_varlen_kernel()], ids=lambda k: k.name
)
def test_blockdiag_path_matches_llamafactory_block_diagonal_mask(model: LlamaForCausalLM, kernel) -> None:  # noqa: ANN001
    batch = packed_batch()
    real = batch["segment_mask"] > 0
    mask4d = prepare_4d_attention_mask(batch["segment_mask"], torch.float32)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model(input_ids=batch["input_ids"], attention_mask=mask4d, position_ids=batch["position_ids"])
        plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])  # packs attend across
        attention.register((kernel,))
        assert attention.use_blockdiag(model) == "sdpa"
        assert model.config._attn_implementation == attention.NAME
        got = model(input_ids=batch["input_ids"], attention_mask=mask4d, position_ids=batch["position_ids"])
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got.logits[real], expected.logits[real], atol=1e-5, rtol=1e-5)
    # and the comparison means something: without the block-diagonal mask the logits differ
    assert not torch.allclose(plain.logits[real], expected.logits[real], atol=1e-3)


def test_the_varlen_layout_gives_the_dense_masks_gradients(model: LlamaForCausalLM) -> None:
    """Backward through the flattened pieces: every weight's gradient as under LlamaFactory's mask."""
    batch = packed_batch()
    labels = batch["input_ids"].masked_fill(batch["segment_mask"] == 0, -100)
    mask4d = prepare_4d_attention_mask(batch["segment_mask"], torch.float32)
    grads = []
    for impl in ("sdpa", attention.NAME):
        attention.register((attention.reference_varlen_kernel(),))
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(
            input_ids=batch["input_ids"], attention_mask=mask4d, position_ids=batch["position_ids"], labels=labels
        ).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.set_attn_implementation("sdpa")
    model.zero_grad()
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert grads[0]["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_pieces_worked_out_on_the_host_come_with_the_batch_and_are_used_once(model: LlamaForCausalLM) -> None:
    """accelerate's data loader copies each batch with send_to_device; wrapped, it leaves the batch's
    pieces (and the longest piece, not the row length) for the attention's first layer to take."""
    from accelerate import data_loader

    batch = packed_batch()
    real = batch["segment_mask"] > 0
    mask4d = prepare_4d_attention_mask(batch["segment_mask"], torch.float32)
    attention.register((attention.reference_varlen_kernel(),))
    assert attention.install_host_layouts() and attention.install_host_layouts()  # once, however often asked
    moved = data_loader.send_to_device({**batch, "attention_mask": mask4d}, "cpu")
    cu, bound = attention._ahead.entries[id(moved["position_ids"])][1]
    assert cu.tolist() == [0, 5, 12, 16, 24, 34, 48] and bound == 14
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model(input_ids=batch["input_ids"], attention_mask=mask4d, position_ids=batch["position_ids"])
        attention.use_blockdiag(model)
        got = model(input_ids=moved["input_ids"], attention_mask=mask4d, position_ids=moved["position_ids"])
        model.set_attn_implementation("sdpa")
    assert attention._ahead.entries == {}  # taken by the first layer, the rest reuse it
    assert attention._state.layout[1] == 14
    torch.testing.assert_close(got.logits[real], expected.logits[real], atol=1e-5, rtol=1e-5)


def test_a_batch_the_host_did_not_see_gets_its_pieces_from_its_own_position_ids() -> None:
    seen, unseen = torch.tensor([[0, 1, 2, 0, 1]]), torch.tensor([[0, 1, 0, 1, 2]])
    attention._ahead.put(seen, attention.host_layout(seen, "cpu"))
    assert attention._ahead.take(unseen) is None
    assert attention._ahead.take(torch.tensor([[0, 1, 2, 0, 1]])) is None  # equal values, another tensor
    assert attention._ahead.take(seen)[0].tolist() == [0, 3, 5]
    for i in range(attention._Ahead.LIMIT + 5):  # batches fetched ahead that never ran: the oldest go
        attention._ahead.put(torch.zeros(1, 2 + i % 3, dtype=torch.long), (None, 1))
    assert len(attention._ahead.entries) == attention._Ahead.LIMIT
    attention._ahead.entries.clear()


def test_cpu_tensors_fall_back_to_sdpa(model: LlamaForCausalLM) -> None:
    ids = packed_batch()["input_ids"]
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model(input_ids=ids).logits
        attention.register()  # the real kernel: CUDA only, so CPU tensors take the SDPA fallback
        attention.use_blockdiag(model)
        got = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, expected)


def test_a_kernel_that_cannot_run_hands_over_to_the_next_then_to_sdpa(model: LlamaForCausalLM) -> None:
    batch = packed_batch()
    real = batch["segment_mask"] > 0
    mask4d = prepare_4d_attention_mask(batch["segment_mask"], torch.float32)
    calls = []

    def failing(*_args: object) -> None:
        calls.append(1)
        raise RuntimeError("triton: no compiler for this machine")

    broken = attention.Kernel("broken", attention.example_ids, failing, cuda_only=False)

    def forward() -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=mask4d, position_ids=batch["position_ids"]).logits

    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = forward()
        attention.register((broken, attention.reference_varlen_kernel()))
        attention.use_blockdiag(model)
        got, again = forward(), forward()
        assert [k.name for k in attention._state.kernels] == ["reference-varlen"]
        attention.register((broken,))
        alone, alone_again = forward(), forward()
        assert attention._state.kernels == ()
        model.set_attn_implementation("sdpa")
    assert len(calls) == 2  # each registration tried it once, then never again
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, expected)  # SDPA with the 4D mask: the very same function
    torch.testing.assert_close(alone_again, expected)


def test_the_compiled_block_mask_is_the_eager_one() -> None:
    """The block mask is built through torch.compile (fewer launches per forward); on CPU here, by
    Inductor's C++ backend: the same blocks, full and partial, as the eager build."""
    from ft_appliance.worker import attention
    from torch.nn.attention.flex_attention import create_block_mask

    examples = attention.example_ids(packed_batch()["position_ids"])
    length = examples.shape[1]

    def rule(b, _h, q, kv):  # noqa: ANN001, ANN202
        return (examples[b, q] == examples[b, kv]) & (q >= kv)

    compiled = attention._block_mask(create_block_mask, rule, examples.shape[0], length, "cpu")
    assert not attention._mask.broken
    eager = create_block_mask(rule, examples.shape[0], None, length, length, device="cpu")
    assert torch.equal(compiled.to_dense(), eager.to_dense())
    assert torch.equal(compiled.full_kv_num_blocks, eager.full_kv_num_blocks)


FLEX_BUILD = """
import sys
from ft_appliance.worker import attention
kernel = attention.flex_kernel()
print(kernel.name, "torch._inductor.compile_fx" in sys.modules)
"""


def test_building_the_flex_kernel_leaves_inductor_unimported() -> None:
    """As varlen's fallback it is built at every start; torch.compile (and Inductor's import, 1.2-2 s on
    the H200 machine) waits for its first call. A fresh interpreter, the real torch."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", FLEX_BUILD], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["flex", "False"]
