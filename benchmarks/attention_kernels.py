"""Attention over packed rows on the GPU, one layer's forward and backward, per kernel: the shapes of
the seed's micro-batch (4 packs of 2056 tokens, examples of 235-1794 tokens as the bench's data; 32
query heads, 8 key/value heads, head size 128, bf16).

    varlen         the worker's kernel: torch's FlashAttention-2 varlen (torch.nn.attention.varlen)
    cudnn          cuDNN's fused attention on the same ragged layout (aten._cudnn_attention_forward
                   with cumulative lengths), key/value heads as they are
    cudnn-repeat   the same with key/value repeated to the query's heads
    rows-flash     SDPA's flash backend on whole rows, causal (examples attend to each other): not the
                   same attention, a reference for the speed of dense causal rows
    rows-cudnn     the same through SDPA's cuDNN backend

    python benchmarks/attention_kernels.py [--iters 30] [KERNEL ...]

Prints ms per forward and backward, and each kernel's largest difference from an fp32 reference per
piece in the output and the three gradients (bf16 kernels differ from it by rounding).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from ft_appliance.worker.attention import segments

from benchmarks.step_anatomy import packed_rows

B, L, H, HKV, D = 4, 2056, 32, 8, 128


def varlen(q, k, v, cu, bound, scale):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, bound, bound, scale=scale, window_size=(-1, 0))


def cudnn(q, k, v, cu, bound, scale):
    out = torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu, cu, bound, bound, True, 0.0, True, False, scale=scale
    )
    return out[0]


def cudnn_repeat(q, k, v, cu, bound, scale):
    g = q.shape[1] // k.shape[1]
    return cudnn(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), cu, bound, scale)


def _rows(t):
    return t.view(B, L, t.shape[1], D).transpose(1, 2)


def rows(backend):
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v, cu, bound, scale):
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(
                _rows(q), _rows(k), _rows(v), is_causal=True, scale=scale, enable_gqa=True
            )
        return out.transpose(1, 2).reshape(B * L, H, D)

    return attend


def reference(q, k, v, cu, scale):
    """Exact per piece in fp32."""
    pieces = []
    g = q.shape[1] // k.shape[1]
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[lo:hi].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(g, dim=0), vs.repeat_interleave(g, dim=0)
        pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(pieces)


def kernels():
    from torch.nn.attention import SDPBackend

    return {
        "varlen": varlen,
        "cudnn": cudnn,
        "cudnn-repeat": cudnn_repeat,
        "rows-flash": rows(SDPBackend.FLASH_ATTENTION),
        "rows-cudnn": rows(SDPBackend.CUDNN_ATTENTION),
    }


def inputs(seed: int = 0):
    torch.manual_seed(seed)
    position_ids, _ = packed_rows(B, L)
    cu, bound = segments(position_ids.cuda())
    q, k, v = (torch.randn(B * L, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (H, HKV, HKV))
    return q, k, v, cu, bound, torch.randn(B * L, H, D, device="cuda", dtype=torch.bfloat16)


def run(fn, q, k, v, cu, bound, grad):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, cu, bound, D**-0.5)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


def timed(fn, args, iters: int) -> float:
    for _ in range(3):
        run(fn, *args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        run(fn, *args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def errors(fn, args) -> list[float]:
    q, k, v, cu, bound, grad = args
    got = run(fn, *args)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = reference(qr, kr, vr, cu, D**-0.5)
    want.backward(grad.float())
    return [float((a.float() - b).abs().max()) for a, b in zip(got, (want, qr.grad, kr.grad, vr.grad), strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("names", nargs="*")
    a = p.parse_args()
    table = kernels()
    args = inputs()
    print(
        f"pieces: {len(args[3]) - 1} in {B} rows of {L}; "
        f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    )
    for name in a.names or list(table):
        try:
            ms = timed(table[name], args, a.iters)
            err = [] if name.startswith("rows") else errors(table[name], args)
        except Exception as exc:  # noqa: BLE001 - a kernel this build lacks: say so, go on
            print(json.dumps({"kernel": name, "error": repr(exc)[:400]}), flush=True)
            continue
        print(
            json.dumps({"kernel": name, "ms": round(ms, 3), "max_err_out_dq_dk_dv": [round(e, 4) for e in err]}),
            flush=True,
        )


if __name__ == "__main__":
    main()
