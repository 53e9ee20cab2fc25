"""Block-diagonal causal attention for neat packing: torch's own FlashAttention-2 varlen kernel, and
FlexAttention with a block-sparse mask where torch lacks it.

LlamaFactory keeps packed examples apart (`neat_packing`) with FlashAttention-2's varlen kernel when
the flash-attn package is installed, and otherwise with a dense 4D block-diagonal mask that SDPA has to
read in full, forward and backward. The worker registers this module's function with transformers'
AttentionInterface and switches the loaded model to it. The kernels, fastest first:

- varlen: the packed rows are flattened into one run of B·L tokens cut at every example, and
  torch.nn.attention.varlen (FlashAttention-2 built into torch >= 2.10) attends causally within each
  piece. No mask is built or read, nothing outside an example is computed, and nothing is compiled:
  FlexAttention compiled a kernel and a block mask per micro-batch size, and on an empty cache
  autotune's probes paid for every size (docs/benchmarks.md).
- flex: FlexAttention, the rule "same example and not in the future" compiled into a block-sparse
  kernel that skips every tile outside an example.

Example boundaries come from `position_ids`, which LlamaFactory's neat packing restarts at 0 for every
example (and sets to 0 for every pad token); the 4D mask LlamaFactory still builds is not read on this
path (the worker's token counter reads it). With FT_HOST_PIECES=1 the host works varlen's pieces out
from the batch's CPU position_ids while the data loader copies it to the GPU (install_host_layouts),
so the GPU never waits for them (opt-in until measured on a card). Anything this path does not
cover (no CUDA kernel, no position_ids, dropout, sliding windows, soft caps, decoding) falls back to
transformers' SDPA function with the mask it was given. A kernel that fails at its first call hands
over to the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

NAME = "ft_blockdiag"


@dataclass(frozen=True)
class Kernel:
    """One way to compute the attention. `layout(position_ids)` runs once per forward (every layer gets
    the same position_ids tensor); `attend(query, key, value, layout, scale)` once per layer, with query
    (B, H, L, D) and key, value (B, Hkv, L, D) in and (B, L, H, D) out."""

    name: str
    layout: Callable[[Any], Any]
    attend: Callable[[Any, Any, Any, Any, float | None], Any]
    cuda_only: bool = True
    host_layout: bool = False
    """`layout` runs on CPU tensors too and gives (cu_seqlens, bound): the data loader's copy of a
    batch to the GPU can bring it along (install_host_layouts)."""


def flex_available() -> bool:
    try:
        import torch
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def varlen_available() -> bool:
    """torch's varlen_attn with its backward (torch >= 2.10) on a GPU FlashAttention-2 runs on (sm80+)."""
    try:
        import torch
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def cudnn_available() -> bool:
    """cuDNN's fused attention on ragged (cumulative-length) tensors: torch's aten op and a cuDNN 9."""
    try:
        import torch
    except ImportError:
        return False
    if not (torch.cuda.is_available() and hasattr(torch.ops.aten, "_cudnn_attention_forward")):
        return False
    version = torch.backends.cudnn.version() or 0
    return version >= 90000 and torch.cuda.get_device_capability() >= (8, 0)


def example_ids(position_ids: Any) -> Any:
    """(B, L) index of the example each token belongs to: a new one wherever position_ids is 0."""
    return (position_ids == 0).cumsum(-1)


def segments(position_ids: Any) -> tuple[Any, int]:
    """(cu_seqlens, bound) of the (B, L) rows flattened to B·L tokens: a piece starts at each row's
    first token and wherever position_ids restarts at 0, except inside a row's trailing padding
    (LlamaFactory gives every pad token position 0: one piece for the run, not one per token; pads come
    after every example of their row, so no real token's output changes).

    Worked out on the GPU; the host waits once, for the number of pieces (it sizes the kernel's grid).
    The row length bounds every piece: the kernel's blocks past a piece's end return at once, and the
    true longest would be a second wait."""
    import torch

    zero = position_ids == 0
    tail = zero.flip(-1).int().cumprod(-1).flip(-1).bool()  # this token and all after it in its row are at 0
    inside_padding = torch.zeros_like(zero)
    inside_padding[:, 1:] = tail[:, 1:] & tail[:, :-1]
    start = zero & ~inside_padding
    start[:, 0] = True
    first = start.flatten().nonzero().flatten()
    end = torch.full((1,), start.numel(), dtype=first.dtype, device=first.device)
    return torch.cat([first, end]).to(torch.int32), position_ids.shape[1]


def _flat(t: Any) -> Any:
    """(B, H, L, D) -> (B·L, H, D); a view when the projection's (B, L, H, D) layout is underneath."""
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b * length, h, d)


def varlen_kernel() -> Kernel:
    from torch.nn.attention.varlen import varlen_attn

    def attend(query: Any, key: Any, value: Any, layout: Any, scale: float | None) -> Any:
        cu, bound = layout  # segments(): the row length, no piece longer
        b, h, length, d = query.shape
        # window (-1, 0) is causal; the kernel takes grouped key/value heads as they are
        out = varlen_attn(
            _flat(query), _flat(key), _flat(value), cu, cu, bound, bound, scale=scale, window_size=(-1, 0)
        )
        return out.view(b, length, h, d)

    return Kernel("varlen", segments, attend, host_layout=True)


def cudnn_kernel() -> Kernel:
    """varlen's layout through cuDNN's fused attention (its Hopper kernels are not FlashAttention-2's).
    torch's own varlen_attn keeps its cuDNN path switched off, so the aten op is called here; its
    autograd formula is torch's."""
    import torch

    forward = torch.ops.aten._cudnn_attention_forward

    def attend(query: Any, key: Any, value: Any, layout: Any, scale: float | None) -> Any:
        cu, bound = layout
        b, h, length, d = query.shape
        # causal within each piece; the log-sum-exp is what the backward needs
        out = forward(
            _flat(query), _flat(key), _flat(value), None, cu, cu, bound, bound, True, 0.0, True, False, scale=scale
        )
        return out[0].view(b, length, h, d)

    return Kernel("cudnn", segments, attend, host_layout=True)


def reference_varlen_kernel() -> Kernel:
    """The varlen kernel's layout and shapes with SDPA per piece in place of FlashAttention: CPU tests
    run the same segmentation and flattening as the GPU path."""
    import torch
    import torch.nn.functional as F

    def attend(query: Any, key: Any, value: Any, layout: Any, scale: float | None) -> Any:
        cu, _ = layout
        b, h, length, d = query.shape
        q, k, v = _flat(query), _flat(key), _flat(value)
        groups = h // k.shape[1]
        pieces = []
        for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            qs, ks, vs = (t[lo:hi].transpose(0, 1) for t in (q, k, v))
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
            pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
        return torch.cat(pieces).view(b, length, h, d)

    return Kernel("reference-varlen", segments, attend, cuda_only=False, host_layout=True)


def reference_kernel(query: Any, key: Any, value: Any, examples: Any, scale: float | None) -> Any:
    """Exact block-diagonal causal attention by SDPA with a dense boolean mask, (B, H, L, D) in and out:
    the slow, obvious version, for CPU tests and to check the fast ones against."""
    import torch
    import torch.nn.functional as F

    length = query.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    mask = (examples[:, :, None] == examples[:, None, :]) & causal
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scale)


def dense_kernel() -> Kernel:
    """reference_kernel as a Kernel: CPU tests of the path around it."""

    def attend(query: Any, key: Any, value: Any, examples: Any, scale: float | None) -> Any:
        return reference_kernel(query, key, value, examples, scale).transpose(1, 2).contiguous()

    return Kernel("dense", example_ids, attend, cuda_only=False)


def flex_kernel() -> Kernel:
    """FlexAttention, compiled once per process at its first call; the block mask is built once per
    forward. Not at construction: torch.compile imports Inductor (1.2-2 s on the H200 machine), and as
    varlen's fallback this kernel is built at every start and restart but rarely run."""
    import functools

    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = functools.cache(lambda: torch.compile(flex_attention, dynamic=False))

    def layout(position_ids: Any) -> Any:
        examples = example_ids(position_ids)

        def same_example_causal(b: Any, _h: Any, q: Any, kv: Any) -> Any:
            return (examples[b, q] == examples[b, kv]) & (q >= kv)

        batch, length = position_ids.shape
        return _block_mask(create_block_mask, same_example_causal, batch, length, position_ids.device)

    def attend(query: Any, key: Any, value: Any, block: Any, scale: float | None) -> Any:
        out = compiled()(query, key, value, block_mask=block, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()

    return Kernel("flex", layout, attend)


def _block_mask(create: Any, mask_mod: Any, batch: int, length: int, device: Any) -> Any:
    """The block mask, built by a compiled function: eager, its vmapped index and compare ops are
    hundreds of small launches per forward, and the GPU waits through them (about 2-6 ms each time on
    the H200 trace in docs/benchmarks.md). A compiler that cannot build it leaves it eager."""
    if not _mask.broken:
        try:
            return create(mask_mod, batch, None, length, length, device=device, _compile=True)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager path is exact too
            print(f"[ft-appliance worker] compiled block mask failed, built eagerly: {exc!r:.300}", flush=True)
            _mask.broken = True
    return create(mask_mod, batch, None, length, length, device=device)


class _Mask:
    broken = False


_mask = _Mask()


class _State:
    kernels: tuple[Kernel, ...] = ()
    """Fastest first; a kernel that fails at its first call is dropped and the next one tried (a
    compiler or a kernel build this machine lacks), so a restart does not fail the same way again."""
    fallback: Any = None
    """transformers' SDPA attention function, bound once at registration (not imported per call)."""
    position_ids: Any = None
    layout: Any = None
    """The current kernel's layout for `position_ids` (held, so no other tensor can take its id)."""
    proven = False
    """The current kernel has run once."""


_state = _State()


def blockdiag_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature: query (B, H, L, D), key/value (B, Hkv, L, D);
    returns ((B, L, H, D), None)."""
    position_ids = kwargs.get("position_ids")
    kernel = _state.kernels[0] if _state.kernels else None
    unsupported = (
        kernel is None
        or (kernel.cuda_only and not query.is_cuda)
        or position_ids is None
        or position_ids.shape != (query.shape[0], query.shape[2])
        or (dropout and module.training)
        or kwargs.get("sliding_window")
        or kwargs.get("softcap")
        or query.shape[2] != key.shape[2]  # decoding with a cache: not a training step
    )
    if unsupported:
        return _state.fallback(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if _state.proven:
        return _attend(kernel, query, key, value, position_ids, scaling), None
    import torch

    try:
        out = _attend(kernel, query, key, value, position_ids, scaling)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any kernel or compiler failure: the next kernel, or SDPA
        _state.kernels, _state.position_ids, _state.layout = _state.kernels[1:], None, None
        after = _state.kernels[0].name if _state.kernels else "SDPA"
        print(
            f"[ft-appliance worker] attention kernel {kernel.name} failed, {after} takes over: {exc!r:.300}", flush=True
        )
        return blockdiag_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    _state.proven = True
    return out, None


def _attend(kernel: Kernel, query: Any, key: Any, value: Any, position_ids: Any, scale: float | None) -> Any:
    if _state.position_ids is not position_ids:  # the first layer of a forward
        ahead = _ahead.take(position_ids) if kernel.host_layout else None
        _state.layout = kernel.layout(position_ids) if ahead is None else ahead
        _state.position_ids = position_ids
    return kernel.attend(query, key, value, _state.layout, scale)


class _Ahead:
    """Layouts worked out on the host for batches on their way to the GPU, by the device tensor of
    position_ids each is for. Found by identity (the tensor is held, so its id stays its own); a
    batch that never reaches the model (the loader fetches ahead) is dropped after LIMIT newer ones."""

    LIMIT = 256

    def __init__(self) -> None:
        self.entries: dict[int, tuple[Any, Any]] = {}

    def put(self, position_ids: Any, layout: Any) -> None:
        self.entries[id(position_ids)] = (position_ids, layout)
        while len(self.entries) > self.LIMIT:
            del self.entries[next(iter(self.entries))]

    def take(self, position_ids: Any) -> Any:
        held, layout = self.entries.pop(id(position_ids), (None, None))
        return layout if held is position_ids else None


_ahead = _Ahead()


def host_layout(position_ids: Any, device: Any) -> Any:
    """segments() of a batch's CPU position_ids, on the host, and the pieces' copy to `device` queued
    behind the batch's own: on the GPU, segments() waits once per forward for the number of pieces
    (the kernel's grid), and the GPU idles while the host catches up. The host also knows the longest
    piece, the bound the kernel's grid is sized by, for free."""
    cu, _ = segments(position_ids)
    bound = int((cu[1:] - cu[:-1]).max())
    if str(device) == "cpu":
        return cu, bound
    return cu.pin_memory().to(device, non_blocking=True), bound  # pinned: the copy does not wait


def install_host_layouts() -> bool:
    """Wrap accelerate's send_to_device as its data loader calls it: a batch with 2D CPU position_ids
    leaves with its pieces worked out, for a kernel with host_layout. False where accelerate's data
    loader has no such function (then the GPU works the pieces out, as before)."""
    try:
        from accelerate import data_loader
    except ImportError:
        return False
    original = getattr(data_loader, "send_to_device", None)
    if original is None or getattr(original, "_ft_host_layout", False):
        return original is not None

    def send_to_device(tensor: Any, device: Any, *args: Any, **kwargs: Any) -> Any:
        moved = original(tensor, device, *args, **kwargs)
        kernel = _state.kernels[0] if _state.kernels else None
        pos = tensor.get("position_ids") if isinstance(tensor, Mapping) else None
        if kernel is None or not kernel.host_layout or getattr(pos, "ndim", 0) != 2 or pos.device.type != "cpu":
            return moved
        target = moved.get("position_ids")
        if target is not None and target.shape == pos.shape:
            _ahead.put(target, host_layout(pos, target.device))
        return moved

    send_to_device._ft_host_layout = True  # type: ignore[attr-defined]
    data_loader.send_to_device = send_to_device
    return True


KERNELS = {
    "varlen": (varlen_available, varlen_kernel),
    "cudnn": (cudnn_available, cudnn_kernel),
    "flex": (flex_available, flex_kernel),
}
DEFAULT_ORDER = "varlen,flex"


def kernel_order(text: str | None) -> tuple[str, ...]:
    """FT_ATTENTION_KERNELS (names, comma-separated, in the order to try; benchmarks/ compares them in
    one run): the known names it lists, or the default order when it lists none."""
    names = tuple(n for n in dict.fromkeys((text or "").replace(" ", "").split(",")) if n in KERNELS)
    return names or tuple(DEFAULT_ORDER.split(","))


def default_kernels() -> tuple[Kernel, ...]:
    """The kernels this machine can run, in FT_ATTENTION_KERNELS's order (empty: SDPA only)."""
    import os

    order = kernel_order(os.environ.get("FT_ATTENTION_KERNELS"))
    return tuple(KERNELS[n][1]() for n in order if KERNELS[n][0]())


def register(kernels: tuple[Kernel, ...] | None = None) -> tuple[Kernel, ...]:
    """Make NAME a transformers attention implementation (its masks: SDPA's, for the fallback), running
    `kernels` (default_kernels() unless given: the tests pass CPU ones). Returns the kernels."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    _state.fallback = sdpa_attention_forward
    _state.kernels = default_kernels() if kernels is None else tuple(kernels)
    _state.position_ids = _state.layout = None
    _state.proven = False
    AttentionInterface.register(NAME, blockdiag_attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return _state.kernels


def use_blockdiag(model: Any) -> str:
    """Switch a loaded (possibly PEFT-wrapped) model to NAME; returns what it used before."""
    from transformers import PreTrainedModel

    base = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    before = base.config._attn_implementation
    base.set_attn_implementation(NAME)
    return before
