"""LoRA projections that share an input, computed together with one autograd node per group.

A step's LoRA cost is memory traffic, not arithmetic: in the 8B profile's step on an H200
(docs/benchmarks.md) the rank-8 GEMMs took 102 ms and elementwise kernels, mostly autograd's sums, 63
ms, against 588 ms for the whole frozen base. Per decoder layer peft runs, for each of seven
projections, a rank-r GEMM over the input, a pass that adds the product into the output, and in
backward two passes over the output gradient, one more GEMM writing an input-sized gradient, and
autograd's additions of the five gradients that q, k and v (and gate and up) send to their one input.
Here each group of projections fed by one tensor (q/k/v, gate/up; o and down alone) runs as one
function:

- forward: one rank-(r·n) GEMM over the input for the whole group; each output starts as its small
  product (s·x A^T) B^T and the base GEMM accumulates x W^T into it in place (beta = 1: the epilogue's
  read hides under a compute-bound GEMM; out-of-place addmm would copy the output first);
- backward: the low-rank gradient of every member, then the input gradient as (dy B s) A written once
  and every member's dy W accumulated into it the same way: no separate gradient, no autograd sum.

FT_LORA_SUM_ORDER=base-first reverses each sum (the base GEMM writes, the low-rank GEMM accumulates):
cuBLAS's accumulating kernels for the large GEMMs were 3-5% slower than its writing ones on the H200,
which may outweigh the extra pass over each output; not measured yet, so not the default.

The frozen weights are not touched. No value changes beyond bf16 rounding order
(tests/unit/worker/test_lora_fused.py holds loss and gradients against fp32). Where the fast path does
not apply (no autocast, dropout, DoRA, several or disabled adapters, a base that trains) peft's own
forward runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections that read one tensor in the architectures LlamaFactory trains most."""


@dataclass
class Group:
    members: list[Any]
    """peft lora.Linear layers, in the order the model calls them."""
    name: str
    """The one active adapter, when built."""
    offsets: list[tuple[int, int]]
    """Member i's columns in the group's low-rank product (its rank's share of R)."""
    scalings: list[float]
    scale: Any
    """(R,) peft's scaling per low-rank column, in the compute dtype."""
    pending_key: Any = None
    pending: dict[int, Any] = field(default_factory=dict)
    """Outputs computed for the members not yet called, for the input `pending_key` names."""
    held: Any = None
    """That input, kept alive while outputs wait: no other tensor can take its memory (and its key)."""
    base_first: bool = False
    """Which GEMM a sum starts with (sum_order): the base's, then the low-rank product added by its
    own GEMM; or the low-rank product's, the base GEMM accumulating into it."""

    @property
    def dtype(self) -> Any:
        return self.members[0].base_layer.weight.dtype


def _function() -> Any:
    import torch

    class FusedLoRA(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, group: Group, x: Any, *params: Any) -> Any:
            n, dt = len(group.members), group.dtype
            a_cat = torch.cat([a.to(dt) for a in params[:n]]) if n > 1 else params[0].to(dt)
            bs = [b.to(dt) for b in params[n:]]
            xa_s = (x @ a_cat.t()).mul_(group.scale)  # (T, R): s * x A^T for every member at once
            outs = []
            for m, b, (lo, hi) in zip(group.members, bs, group.offsets, strict=True):
                bias = m.base_layer.bias
                low, base = (xa_s[:, lo:hi], b.t()), (x, m.base_layer.weight.t())
                first, second = (base, low) if group.base_first else (low, base)
                out = torch.mm(*first) if bias is None else torch.addmm(bias, *first)
                outs.append(out.addmm_(*second))
            ctx.group = group
            ctx.save_for_backward(x, xa_s, a_cat, *bs)
            return tuple(outs)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            group: Group = ctx.group
            x, xa_s, a_cat, *bs = ctx.saved_tensors
            dys = [g.reshape(-1, g.shape[-1]) for g in grads]
            dxa = torch.cat([dy @ b for dy, b in zip(dys, bs, strict=True)], dim=1).mul_(group.scale)
            dx = None
            if ctx.needs_input_grad[1]:  # not for the first layer, whose input needs no gradient
                dx = _input_grad(group, dys, dxa, a_cat)
            d_a_cat = dxa.t() @ x
            d_a, d_b = [], []
            for m, dy, (lo, hi) in zip(group.members, dys, group.offsets, strict=True):
                d_a.append(d_a_cat[lo:hi].to(m.lora_A[group.name].weight.dtype))
                d_b.append((dy.t() @ xa_s[:, lo:hi]).to(m.lora_B[group.name].weight.dtype))
            return (None, dx, *d_a, *d_b)

    return FusedLoRA


def _input_grad(group: Group, dys: list[Any], dxa: Any, a_cat: Any) -> Any:
    """(dy B s) A plus every member's dy W, written once, in the group's order."""
    bases = [(dy, m.base_layer.weight) for dy, m in zip(dys, group.members, strict=True)]
    terms = [*bases, (dxa, a_cat)] if group.base_first else [(dxa, a_cat), *bases]
    first, second = terms[0]
    dx = first @ second
    for term in terms[1:]:
        dx.addmm_(*term)
    return dx


def sum_order(text: str | None) -> bool:
    """FT_LORA_SUM_ORDER: True for base-first, False (lora-first, the default) for anything else.
    cuBLAS runs a GEMM that accumulates into its output (beta = 1) with other kernels than one that
    writes it; which order is faster is measured by benchmarks/gemm_shapes.py."""
    return (text or "").strip() == "base-first"


class _Fn:
    cls: Any = None


_fn = _Fn()


def _fast(layer: Any, name: str, x: Any) -> bool:
    """The calls this path covers: lora.add_lora_in_gemm's, with a base that stays frozen and autocast
    to the base's dtype; the rest run peft's forward."""
    import torch

    from .lora import plain_call

    return (
        plain_call(layer, x) == name
        and not layer.base_layer.weight.requires_grad
        and torch.get_autocast_dtype(x.device.type) == layer.base_layer.weight.dtype
    )


def _pending(group: Group, index: int, x: Any) -> Any:
    """Member `index`'s output for x if the group's first call computed it (HF calls q, k and v one
    after the other on one tensor), else None."""
    if group.pending_key != (x.data_ptr(), x._version, tuple(x.shape)) or index not in group.pending:
        return None
    out = group.pending.pop(index)
    if not group.pending:
        group.pending_key = group.held = None
    return out


def _run(group: Group, index: int, x: Any) -> Any:
    """Every member's output for x in one call; member `index`'s is returned, the others wait in
    `pending` for their own calls."""
    key = (x.data_ptr(), x._version, tuple(x.shape))
    flat = x.reshape(-1, x.shape[-1]).to(group.dtype)
    params = [m.lora_A[group.name].weight for m in group.members] + [m.lora_B[group.name].weight for m in group.members]
    outs = _fn.cls.apply(group, flat, *params)
    shaped = [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]
    group.pending = {i: o for i, o in enumerate(shaped) if i != index}
    group.pending_key, group.held = (key, x) if group.pending else (None, None)
    return shaped[index]


def _member_forward(group: Group, index: int) -> Any:
    from peft.tuners.lora.layer import Linear

    layer = group.members[index]

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and (out := _pending(group, index, x)) is not None:
            return out  # the group's first call checked the conditions for this input
        if args or kwargs or not all(_fast(m, group.name, x) for m in group.members) or _scalings_changed(group):
            return Linear.forward(layer, x, *args, **kwargs)
        return _run(group, index, x)

    return forward


def _scalings_changed(group: Group) -> bool:
    return [m.scaling[group.name] for m in group.members] != group.scalings


def fuse_lora_projections(model: Any, base_first: bool | None = None) -> int:
    """Give every plain peft LoRA Linear of `model` the grouped forward above; returns how many layers
    changed. Siblings named in SHARED_INPUT form one group when all are eligible; the rest are groups
    of one. Quantized bases (QLoRA), layers already patched and weights shared with another module
    (tied embeddings) are left alone. `base_first` (default: FT_LORA_SUM_ORDER) orders each sum."""
    import os

    if base_first is None:
        base_first = sum_order(os.environ.get("FT_LORA_SUM_ORDER"))
    if _fn.cls is None:
        _fn.cls = _function()
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    changed = 0
    for parent in list(model.modules()):
        children = {n: c for n, c in parent.named_children() if _eligible(c) and counts[id(c.base_layer.weight)] == 1}
        grouped: set[str] = set()
        for names in SHARED_INPUT:
            members = [children[n] for n in names if n in children]
            if len(members) == len(names) and _compatible(members):
                _install(members, base_first)
                grouped.update(names)
        for n, c in children.items():
            if n not in grouped:
                _install([c], base_first)
        changed += len(children)
    return changed


def _eligible(module: Any) -> bool:
    import torch
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or type(module.base_layer) is not torch.nn.Linear or "forward" in vars(module):
        return False
    adapters = module.active_adapters
    w = module.base_layer.weight
    return (
        len(adapters) == 1
        and adapters[0] in module.lora_A
        and module.lora_B[adapters[0]].bias is None
        and not module.fan_in_fan_out
        and not w.requires_grad
        and w.dtype in (torch.bfloat16, torch.float16)
        and w.device.type != "meta"
    )


def _compatible(members: list[Any]) -> bool:
    first = members[0]
    w = first.base_layer.weight
    return all(
        m.active_adapters == first.active_adapters
        and m.in_features == first.in_features
        and m.base_layer.weight.dtype == w.dtype
        and m.base_layer.weight.device == w.device
        for m in members
    )


def _install(members: list[Any], base_first: bool) -> None:
    import torch

    name = members[0].active_adapters[0]
    ranks = [m.r[name] for m in members]
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    offsets = [(s, s + r) for s, r in zip(starts, ranks, strict=True)]
    scalings = [m.scaling[name] for m in members]
    w = members[0].base_layer.weight
    scale = torch.tensor([s for s, r in zip(scalings, ranks, strict=True) for _ in range(r)], dtype=w.dtype)
    group = Group(members, name, offsets, scalings, scale.to(w.device), base_first=base_first)
    for i, m in enumerate(members):
        m.forward = _member_forward(group, i)
