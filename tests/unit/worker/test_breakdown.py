"""The step breakdown's categories (worker/breakdown.py), by table, on kernel and op names from real
H200 traces of the profile (FlexAttention, Liger, peft LoRA r8, AdamW, NCCL)."""

from __future__ import annotations

import pytest
from ft_appliance.worker.breakdown import (
    ATTENTION,
    BASE,
    COMM,
    FUSED,
    HEAD,
    HOST_GAPS,
    LORA,
    OPTIMIZER,
    OTHER,
    Work,
    breakdown,
    category,
    largest_gaps,
    render,
    render_gaps,
    union_us,
)

TOKENS, H, R, V = 8192, 4096, 8, 128256


def work(name: str, op: str = "", shapes: tuple = (), around: tuple = (), dur: float = 1) -> Work:
    return Work(name, op, shapes, around, dur)


@pytest.mark.parametrize(
    ("w", "expected"),
    [
        (work("nvjet_tst_256x128_64x4", "aten::mm", ((TOKENS, H), (H, 14336))), BASE),
        (work("sm90_xmma_gemm_bf16", "aten::_scaled_mm", ((TOKENS, H), (H, 1024), (), ())), BASE),
        (work("nvjet_tst_64x8", "aten::mm", ((TOKENS, H), (H, R))), LORA),
        (work("cutlass_80_tensorop", "aten::addmm_", ((TOKENS, 1024), (TOKENS, R), (R, 1024))), LORA),
        (work("nvjet_tst_128x256", "aten::mm", ((TOKENS, H), (H, V))), HEAD),
        (work("triton_tem_fused_flex_attention_0", "aten::empty", (), ("FlexAttentionHOP",)), ATTENTION),
        (work("triton_tem_fused_0", "", (), ("flex_attention_backward",)), ATTENTION),
        (
            work("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128", "aten::_flash_attention_forward"),
            ATTENTION,
        ),
        (
            work("void pytorch_flash::flash_bwd_convert_dq_kernel", "", (), ("torch_attn::_varlen_attn_backward",)),
            ATTENTION,
        ),
        (work("cudnn_generated_fort_native_sdpa_sm90", "aten::_scaled_dot_product_cudnn_attention"), ATTENTION),
        (work("_rms_norm_forward_kernel", "triton"), FUSED),
        (work("_swiglu_backward_kernel", "triton"), FUSED),
        (work("_triton_rope", "triton"), FUSED),
        (work("liger_cross_entropy_kernel", "triton"), HEAD),
        (work("multi_tensor_apply_kernel", "aten::_foreach_mul_", ((),), ("Optimizer.step#AdamW.step",)), OPTIMIZER),
        (work("reduce_kernel", "aten::_foreach_norm"), OPTIMIZER),
        (work("elementwise_kernel", "aten::zero_", (), ("Optimizer.zero_grad#AdamW.zero_grad",)), OPTIMIZER),
        (work("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "c10d::allreduce_"), COMM),
        (work("vectorized_elementwise_kernel", "aten::add_", ((TOKENS, H), (TOKENS, H))), OTHER),
        (work("Memcpy DtoH (Device -> Pinned)", "aten::copy_"), OTHER),
        # CPU: ops are their own work
        (work("aten::mm", "aten::mm", ((16, 64), (64, 8))), LORA),
        (work("aten::_log_softmax", "aten::_log_softmax", ((16, V),)), HEAD),
        (
            work(
                "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu"
            ),
            ATTENTION,
        ),
    ],
)
def test_category(w: Work, expected: str) -> None:
    assert category(w, R, V) == expected


def test_without_lora_every_gemm_is_the_base() -> None:
    assert category(work("k", "aten::mm", ((TOKENS, H), (H, R))), 0, V) == BASE


@pytest.mark.parametrize(
    ("intervals", "covered"),
    [([], 0), ([(0, 10)], 10), ([(0, 10), (5, 15)], 15), ([(0, 10), (2, 3)], 10), ([(20, 30), (0, 10)], 20)],
)
def test_union(intervals: list, covered: float) -> None:
    assert union_us(intervals) == covered


def test_breakdown_per_step_with_host_gaps_on_a_device() -> None:
    works = [
        work("nvjet", "aten::mm", ((TOKENS, H), (H, H)), dur=6000),
        work("nccl", "c10d::allreduce_", dur=6000),
        work("nvjet", "aten::mm", ((TOKENS, H), (H, R)), dur=2000),
    ]
    busy = [(0, 6000), (2000, 8000), (10000, 12000)]  # the all-reduce overlaps the GEMM on another stream
    b = breakdown(works, wall_us=16000, steps=2, rank=R, vocab=V, busy=busy)
    assert b["wall_ms"] == 8.0 and b["busy_ms"] == 5.0
    assert b["categories"][BASE] == 3.0 and b["categories"][COMM] == 3.0 and b["categories"][LORA] == 1.0
    assert b["categories"][HOST_GAPS] == 3.0
    text = render(b)
    assert text.startswith("per step (mean of 2): wall 8.0 ms, kernels busy 5.0 ms")
    assert text.index(BASE) < text.index(LORA)  # largest first


def test_breakdown_on_cpu_has_no_host_gaps() -> None:
    b = breakdown([work("aten::mm", "aten::mm", dur=500)], wall_us=1000, steps=1, rank=R, vocab=V, busy=None)
    assert HOST_GAPS not in b["categories"] and "busy_ms" not in b


def test_largest_gaps_name_the_kernels_around_and_the_host_ops_under_way() -> None:
    kernels = [(0, 100, "gemm"), (50, 300, "gemm2"), (1300, 1400, "fill"), (1500, 1600, "add"), (4600, 4700, "mm")]
    host = [
        (0, 10_000, "ProfilerStep#9"),
        (280, 320, "aten::item"),
        (290, 1290, "cudaStreamSynchronize"),
        (4000, 4650, "Optimizer.step#AdamW.step"),
    ]
    gaps = largest_gaps(kernels, host, count=2, min_us=200)
    assert [g["ms"] for g in gaps] == [3.0, 1.0]  # the 100 us gap is under min_us
    first, second = gaps
    assert (first["after"], first["before"]) == ("add", "mm")
    assert first["ended"] == ["ProfilerStep#9", "Optimizer.step#AdamW.step"]
    assert (second["after"], second["before"]) == ("gemm2", "fill")
    assert second["began"] == ["ProfilerStep#9", "aten::item", "cudaStreamSynchronize"]
    text = render_gaps(gaps)
    assert "3.00 ms after 'add', before 'mm'" in text and "began in: ProfilerStep#9 > aten::item" in text
