"""How fast the 8B LoRA step's GEMM shapes run on this card, alone: the frozen base's projections
(separate and fused q/k/v, gate/up), their backward (grad of the input), the LoRA rank-8 GEMMs and an
elementwise pass over a layer's output for scale; and the two orders of a LoRA layer's sum (the base
GEMM accumulating into the low-rank product, cuBLAS's beta = 1 kernels, or the base GEMM first and
the rank-r product added by its own GEMM).

    python benchmarks/gemm_shapes.py [--tokens 8192]

Prints ms and TFLOP/s (or GB/s for the memory-bound rows) per shape, bf16, best of 20 after warm-up.
"""

from __future__ import annotations

import argparse

import torch


def timed(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    t = ap.parse_args().tokens
    h, kv, inter, r = 4096, 1024, 14336, 8
    rows = {
        "q / o (h -> h)": (h, h),
        "k or v (h -> 1024)": (h, kv),
        "q+k+v fused (h -> 6144)": (h, h + 2 * kv),
        "gate or up (h -> 14336)": (h, inter),
        "gate+up fused (h -> 28672)": (h, 2 * inter),
        "down (14336 -> h)": (inter, h),
    }
    for name, (k, n) in rows.items():
        shape(name, t, k, n, r)


def shape(name: str, t: int, k: int, n: int, r: int) -> None:
    bf = torch.bfloat16
    x = torch.randn(t, k, device="cuda", dtype=bf)
    w = torch.randn(n, k, device="cuda", dtype=bf)
    dy = torch.randn(t, n, device="cuda", dtype=bf)
    fwd = timed(lambda: x @ w.t())
    bwd = timed(lambda: dy @ w)
    tf = 2 * t * k * n / 1e12
    print(f"{name:28s} fwd {fwd:7.3f} ms {tf / fwd * 1e3:5.0f} TF/s  dgrad {bwd:7.3f} ms {tf / bwd * 1e3:5.0f} TF/s")
    a = torch.randn(r, k, device="cuda", dtype=bf)
    b = torch.randn(n, r, device="cuda", dtype=bf)
    xa = x @ a.t()
    out = x @ w.t()
    la = timed(lambda: x @ a.t())
    lb = timed(lambda: out.addmm_(xa, b.t(), alpha=2.0))
    lbw = timed(lambda: dy.t() @ xa)
    add = timed(lambda: out.add_(dy))
    dxa = torch.randn(t, r, device="cuda", dtype=bf)
    lora_first = timed(lambda: torch.mm(xa, b.t()).addmm_(x, w.t()))
    base_first = timed(lambda: torch.mm(x, w.t()).addmm_(xa, b.t()))
    lora_first_bwd = timed(lambda: torch.mm(dxa, a).addmm_(dy, w))
    base_first_bwd = timed(lambda: torch.mm(dy, w).addmm_(dxa, a))
    print(
        f"{'':28s} sum: forward lora first {lora_first:7.3f} ms, base first {base_first:7.3f} ms; "
        f"input grad lora first {lora_first_bwd:7.3f} ms, base first {base_first_bwd:7.3f} ms"
    )
    print(
        f"{'':28s} lora A {la:6.3f} ms ({x.numel() * 2 / la / 1e6:5.0f} GB/s)  B addmm_ {lb:6.3f} ms "
        f"({out.numel() * 4 / lb / 1e6:5.0f} GB/s)  dB {lbw:6.3f} ms  add_ pass {add:6.3f} ms"
    )


if __name__ == "__main__":
    main()
