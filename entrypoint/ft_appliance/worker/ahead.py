"""What a spare does before its go, beyond importing the stack: the work the attempt it becomes would
otherwise do first, that depends on no run argument but whether the run uses DeepSpeed.

- deepspeed, for a DeepSpeed run (the Trainer's setup imports it; worker/deepspeed_import.py).
- Liger's model patches, where Liger is installed: load_model imports them for a run with
  enable_liger_kernel (0.5 s under py-spy on the H200 machine); importing patches nothing.
- Triton's cache key (warm_triton). An attempt that is not a spare's works it out in a thread while its
  model loads (warm_in_background).

And what an attempt, a spare's included, starts as soon as it knows it trains: the GPU's CUDA context
(open_cuda_context), created through the driver in a thread while the main thread imports the stack.
A spare does not do it while it waits: it holds no GPU memory until it becomes an attempt.

(LlamaFactory's Auto-class lookups in load_model no longer need warming: worker/model_lookup.py.)
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import threading
from collections.abc import Mapping


def prepare(deepspeed: bool) -> None:
    if importlib.util.find_spec("liger_kernel") is not None:
        try:
            import liger_kernel.transformers.monkey_patch  # noqa: F401
        except Exception:  # noqa: BLE001 - a run without Liger must not lose its spare; one with it fails in load_model
            pass
    warm_triton()
    if deepspeed:
        import deepspeed as _  # noqa: F401
    gc.freeze()  # what these imports added joins the stack's frozen objects (worker/main.py)


def warm_triton() -> bool:
    """Work out Triton's cache key, which hashes Triton's own sources and libtriton: 0.6 s of the first
    step on the H200 machine (Liger's first kernel launch), once per process. False without Triton."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # CPU torch comes without Triton
        return False
    triton_key()  # functools.lru_cache: the kernels' launches find it
    return True


def warm_in_background() -> threading.Thread:
    """warm_triton in a daemon thread: hashing and reading files let go of the GIL, and the main thread
    spends the model's load waiting on transformers' copy threads. Triton is imported here, in the main
    thread, so that no two threads import one module."""
    try:
        import triton.runtime.cache  # noqa: F401
    except ImportError:
        pass
    thread = threading.Thread(target=warm_triton, name="ft-warm-triton", daemon=True)
    thread.start()
    return thread


def cuda_ahead_enabled(env: Mapping[str, str]) -> bool:
    """FT_CUDA_AHEAD=1: opt-in until a card has measured what it saves (docs/benchmarks.md)."""
    return env.get("FT_CUDA_AHEAD") == "1"


def open_cuda_context(device: int) -> bool:
    """cuInit and the primary context of this rank's GPU, the one torch's runtime adopts at its first
    call. Through ctypes, which lets go of the GIL in each driver call, so that the context's creation
    overlaps the imports instead of coming after them. False where there is no driver (CPU)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    handle, context = ctypes.c_int(), ctypes.c_void_p()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(handle), device) != 0:
        return False  # torch reports the same error at its own first call, with its words
    # Retained for the process's life: torch's runtime then finds the context made, not a second one.
    return cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle) == 0


def open_cuda_context_in_background(env: Mapping[str, str] | None = None) -> threading.Thread:
    """open_cuda_context for the GPU LlamaFactory gives this rank (cuda:LOCAL_RANK), in a daemon thread."""
    env = os.environ if env is None else env
    device = int(env.get("LOCAL_RANK", "0"))
    thread = threading.Thread(target=open_cuda_context, args=(device,), name="ft-cuda-context", daemon=True)
    thread.start()
    return thread
