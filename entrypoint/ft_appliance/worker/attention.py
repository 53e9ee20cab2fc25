"""Block-diagonal causal attention for neat packing, on torch's FlexAttention with a block-sparse mask.

LlamaFactory keeps packed examples apart (`neat_packing`) with FlashAttention-2's varlen kernel when
the flash-attn package is installed, and otherwise with a dense 4D block-diagonal mask that SDPA has to
read in full, forward and backward. FlexAttention instead takes the mask as a rule (same example and
not in the future) compiled into a block-sparse kernel that skips every tile outside an example. The
worker registers it with transformers' AttentionInterface and switches the loaded model to it.

Example boundaries come from `position_ids`, which LlamaFactory's neat packing restarts at 0 for every
example; the 4D mask LlamaFactory still builds is not read on this path (the worker's token counter
reads it). Anything this path does not cover (no CUDA kernel, no position_ids, dropout, sliding
windows, soft caps, decoding) falls back to transformers' SDPA function with the mask it was given.
"""

from __future__ import annotations

from typing import Any

NAME = "ft_blockdiag"


def flex_available() -> bool:
    try:
        import torch
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def example_ids(position_ids: Any) -> Any:
    """(B, L) index of the example each token belongs to: a new one wherever position_ids is 0."""
    return (position_ids == 0).cumsum(-1)


def reference_kernel(query: Any, key: Any, value: Any, examples: Any, scale: float | None) -> Any:
    """Exact block-diagonal causal attention by SDPA with a dense boolean mask, (B, H, L, D) in and out:
    the slow, obvious version, for CPU tests and to check the fast one against."""
    import torch
    import torch.nn.functional as F

    length = query.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    mask = (examples[:, :, None] == examples[:, None, :]) & causal
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scale)


def flex_kernel() -> Any:
    """FlexAttention, compiled once per process; the block mask is built once per forward (every
    layer gets the same example ids), not once per layer."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    last: dict[str, Any] = {"examples": None, "block": None}

    def call(query: Any, key: Any, value: Any, examples: Any, scale: float | None) -> Any:
        if last["examples"] is not examples:

            def same_example_causal(b: Any, _h: Any, q: Any, kv: Any) -> Any:
                return (examples[b, q] == examples[b, kv]) & (q >= kv)

            batch, _, length, _ = query.shape
            last["block"] = _block_mask(create_block_mask, same_example_causal, batch, length, query.device)
            last["examples"] = examples
        return compiled(query, key, value, block_mask=last["block"], scale=scale, enable_gqa=True)

    return call


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
    kernel: Any = None
    fallback: Any = None
    """transformers' SDPA attention function, bound once at registration (not imported per call)."""
    cuda_only = True
    position_ids: Any = None
    examples: Any = None
    proven = False
    """The kernel has run once; before that a failure (a compiler that cannot build it on this
    machine) turns the path off instead of failing every restart the same way."""
    broken = False


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
    unsupported = (
        _state.broken
        or (_state.cuda_only and not query.is_cuda)
        or position_ids is None
        or position_ids.shape != (query.shape[0], query.shape[2])
        or (dropout and module.training)
        or kwargs.get("sliding_window")
        or kwargs.get("softcap")
        or query.shape[2] != key.shape[2]  # decoding with a cache: not a training step
    )
    if unsupported:
        return _state.fallback(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    # Every layer of one forward gets the same position_ids tensor: derive the examples once.
    if _state.position_ids is not position_ids:
        _state.position_ids, _state.examples = position_ids, example_ids(position_ids)
    if _state.proven:
        out = _state.kernel(query, key, value, _state.examples, scaling)
    else:
        import torch

        try:
            out = _state.kernel(query, key, value, _state.examples, scaling)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: keep training on SDPA
            print(f"[ft-appliance worker] block-diagonal attention failed, SDPA kept: {exc!r:.300}", flush=True)
            _state.broken = True
            return _state.fallback(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        _state.proven = True
    return out.transpose(1, 2).contiguous(), None


def register(kernel: Any = None) -> None:
    """Make NAME a transformers attention implementation (its masks: SDPA's, for the fallback).

    kernel(query, key, value, example_ids, scale) defaults to FlexAttention on CUDA; the tests pass
    `reference_kernel` to run the same path on CPU.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    _state.fallback = sdpa_attention_forward
    _state.kernel, _state.cuda_only = (kernel, False) if kernel is not None else (flex_kernel(), True)
    _state.proven = _state.broken = False
    AttentionInterface.register(NAME, blockdiag_attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_blockdiag(model: Any) -> str:
    """Switch a loaded (possibly PEFT-wrapped) model to NAME; returns what it used before."""
    from transformers import PreTrainedModel

    base = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    before = base.config._attn_implementation
    base.set_attn_implementation(NAME)
    return before
