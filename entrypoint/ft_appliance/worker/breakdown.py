"""Where a training step's time goes (pure): each kernel of a torch.profiler trace, or each op's own
CPU time on CPU, put in one category by its name, the op that launched it, that op's input shapes and
the ops around it. worker/counting.StepTrace feeds it; docs/benchmarks.md shows the tables.

The categories follow what the profile changes: the frozen base's GEMMs, the LoRA GEMMs (an input
with the adapter's rank as a dimension), attention, the lm head and the loss (a GEMM with the
vocabulary as a dimension), the optimizer (inside torch's Optimizer.* ranges, plus the foreach ops of
gradient clipping), Liger's fused norm, RoPE and SwiGLU kernels, communication, and everything else.
Host gaps are the step's wall time in which no kernel ran.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BASE, LORA, ATTENTION, HEAD, OPTIMIZER, FUSED, COMM, OTHER = (
    "base GEMMs",
    "LoRA GEMMs",
    "attention",
    "lm head + loss",
    "optimizer + grad clipping",
    "norms, RoPE, SwiGLU",
    "communication",
    "other kernels (elementwise, copies, casts)",
)
CATEGORIES = (BASE, LORA, ATTENTION, HEAD, OPTIMIZER, FUSED, COMM, OTHER)
HOST_GAPS = "host gaps (no kernel running)"

GEMM_OPS = frozenset(
    {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_scaled_mm"}
)
ATTENTION_WORDS = ("attention", "flash", "fmha", "flex", "sdpa", "softmax_fwd", "cudnn_mha")
FUSED_WORDS = ("rms_norm", "rmsnorm", "swiglu", "silu", "rope", "layer_norm")
LOSS_WORDS = ("cross_entropy", "nll_loss", "log_softmax", "liger_cross")


@dataclass(frozen=True)
class Work:
    """One kernel (or, on CPU, one op's own time) with what launched it."""

    name: str
    op: str
    """The innermost op around it: the aten op that launched the kernel (the op itself on CPU)."""
    shapes: tuple[tuple[int, ...], ...]
    ancestors: tuple[str, ...]
    """The names of the ops and ranges around `op`, innermost first."""
    dur_us: float


def category(w: Work, rank: int, vocab: int) -> str:
    name, op = w.name.lower(), w.op.lower()
    around = [a.lower() for a in w.ancestors]
    if "nccl" in name or op.startswith(("c10d::", "nccl:")):
        return COMM
    if any(a.startswith("optimizer.") for a in around) or op.startswith("aten::_foreach"):
        return OPTIMIZER
    dims = {d for shape in w.shapes for d in shape}
    if w.op in GEMM_OPS:
        if vocab and vocab in dims:
            return HEAD
        # A group of projections sharing an input (worker/lora_fused.py) runs rank x members at once.
        return LORA if rank and dims & {rank, 2 * rank, 3 * rank} else BASE
    if any(word in name or word in op or any(word in a for a in around) for word in ATTENTION_WORDS):
        return ATTENTION
    if any(word in name or word in op for word in LOSS_WORDS):
        return HEAD
    if any(word in name for word in FUSED_WORDS):
        return FUSED
    return OTHER


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the intervals (kernels on two streams overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def breakdown(
    works: Sequence[Work], wall_us: float, steps: int, rank: int, vocab: int, busy: Sequence[tuple[float, float]] | None
) -> dict:
    """Milliseconds per step in each category; on a device (busy: the kernels' intervals) also the
    time any kernel ran and the host gaps."""
    per = {c: 0.0 for c in CATEGORIES}
    for w in works:
        per[category(w, rank, vocab)] += w.dur_us
    out = {c: round(v / steps / 1000, 2) for c, v in per.items()}
    result = {"steps": steps, "wall_ms": round(wall_us / steps / 1000, 2), "categories": out}
    if busy is not None:
        covered = union_us(busy)
        result["busy_ms"] = round(covered / steps / 1000, 2)
        result["categories"][HOST_GAPS] = round(max(0.0, wall_us - covered) / steps / 1000, 2)
    return result


def render(b: dict) -> str:
    wall = b["wall_ms"] or 1.0
    rows = [f"per step (mean of {b['steps']}): wall {b['wall_ms']:.1f} ms" + (
        f", kernels busy {b['busy_ms']:.1f} ms" if "busy_ms" in b else ""
    )]  # fmt: skip
    for name, ms in sorted(b["categories"].items(), key=lambda kv: -kv[1]):
        rows.append(f"  {name:<45} {ms:9.1f} ms  {100 * ms / wall:5.1f}%")
    return "\n".join(rows) + "\n"


Span = tuple[float, float, str]
"""(start µs, end µs, name): a kernel on the device, or an op or range on the host."""


def largest_gaps(kernels: Sequence[Span], host: Sequence[Span], count: int = 12, min_us: float = 200.0) -> list[dict]:
    """The longest stretches with no kernel running, each with the kernels on either side and the host
    ops under way when it began (typically the call that waited for the device) and when it ended
    (what launched the next kernel), innermost last."""
    gaps: list[tuple[float, float, str, str]] = []
    end, last = float("-inf"), ""
    for a, b, name in sorted(kernels):
        if a - end >= min_us and last:
            gaps.append((end, a, last, name))
        if b > end:
            end, last = b, name
    gaps.sort(key=lambda g: g[0] - g[1])

    def under_way(t: float) -> list[str]:
        spans = sorted((s for s in host if s[0] <= t <= s[1]), key=lambda s: (s[0], -s[1]))
        return [s[2] for s in spans][-4:]

    return [
        {"ms": round((b - a) / 1000, 2), "after": before, "before": after, "began": under_way(a), "ended": under_way(b)}
        for a, b, before, after in gaps[:count]
    ]


def render_gaps(gaps: Sequence[dict]) -> str:
    rows = ["largest host gaps (no kernel running):"]
    for g in gaps:
        rows.append(f"  {g['ms']:7.2f} ms after {g['after'][:60]!r}, before {g['before'][:60]!r}")
        rows.append(f"           began in: {' > '.join(g['began']) or '-'}")
        rows.append(f"           ended in: {' > '.join(g['ended']) or '-'}")
    return "\n".join(rows) + "\n"
