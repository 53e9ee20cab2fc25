"""Where a training micro-batch's time goes, without the Trainer: the Llama-3.1-8B architecture with
random weights, LoRA r8 on all linear layers, Liger's kernels, bf16, one micro-batch of 4 packs of
2056 tokens (examples of 235-1794 tokens, as the bench's data), forward and backward, under each way
of running attention on packs:

    sdpa-4d      neat packing as LlamaFactory does it without flash-attn (4D block-diagonal mask)
    blockdiag    neat packing through the appliance's FlexAttention block-sparse path
    sdpa-causal  plain packing (examples attend to each other), for reference

with `+nocast` the LoRA layers' inputs stay bf16, with `+gemm` the LoRA output is added inside its
second matmul (worker/lora.py), and with `+fused` the projections that share an input run as one
group (worker/lora_fused.py; it re-stores the frozen weights, so it comes last in a run).

    python benchmarks/step_anatomy.py [--iters 6] [--top 12] [VARIANT ...]

Prints ms per micro-batch and peak memory per variant (the first iterations, compilation included,
separately), and the largest CUDA kernels of the variants named with --kernels.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from ft_appliance.worker import attention, lora, lora_fused

from benchmarks.bench import LLAMA_8B


def packed_rows(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, segment indices) of greedily packed examples, padding at each row's end."""
    rng = random.Random(seed)
    pos, seg = [], []
    for _ in range(rows):
        p: list[int] = []
        s: list[int] = []
        while True:
            n = rng.randint(235, 1794)
            if len(p) + n > length - 7:
                break
            p += range(n)
            s += [len(set(s)) + 1] * n
        pad = length - len(p)
        pos.append(p + [0] * pad)
        seg.append(s + [0] * pad)
    return torch.tensor(pos), torch.tensor(seg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--kernels", nargs="*", default=[], help="variants whose CUDA kernel table to print")
    ap.add_argument(
        "variants",
        nargs="*",
        default=["sdpa-4d", "sdpa-4d+nocast", "sdpa-causal+nocast", "blockdiag+nocast", "blockdiag+nocast+gemm"],
    )
    a = ap.parse_args()

    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from llamafactory.data.collator import prepare_4d_attention_mask
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    apply_liger_kernel_to_llama()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(LlamaConfig(**LLAMA_8B), dtype=torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LlamaFactory keeps trainable LoRA weights in fp32
    model.train()
    attention.register()

    rows, length = 4, 2056
    position_ids, segs = packed_rows(rows, length)
    real = int((segs > 0).sum())
    ids = torch.randint(0, LLAMA_8B["vocab_size"], (rows, length), device="cuda")
    labels = ids.masked_fill(segs.cuda() == 0, -100)
    position_ids = position_ids.cuda()
    mask4d = prepare_4d_attention_mask(segs, torch.bfloat16).cuda()
    print(f"micro-batch: {rows} x {length} tokens, {real} real", flush=True)

    def step(variant: str) -> None:
        mask = None if variant == "sdpa-causal" else mask4d
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels)
        out.loss.backward()

    base = model.get_base_model()
    for variant in a.variants:
        kind, *changes = variant.split("+")
        base.set_attn_implementation(attention.NAME if kind == "blockdiag" else "sdpa")
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = "nocast" not in changes
            vars(module).pop("forward", None)  # peft's own forward again
        if "fused" in changes:
            lora_fused.fuse_lora_projections(model)
        if "gemm" in changes:
            lora.add_lora_in_gemm(model)
        t0 = time.perf_counter()
        for _ in range(2):
            step(kind)
        torch.cuda.synchronize()
        warmup = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            step(kind)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / a.iters * 1000
        print(
            f"{variant:20s} {ms:7.1f} ms/micro-batch  {real / ms * 1000:8.0f} real tok/s  "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB  (first 2: {warmup:.1f} s)",
            flush=True,
        )
        if variant not in a.kernels:
            continue
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(kind)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
