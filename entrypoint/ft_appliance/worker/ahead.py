"""What a spare does before its go, beyond importing the stack: the work the attempt it becomes would
otherwise do first, that depends on no run argument but whether the run uses DeepSpeed.

- deepspeed, for a DeepSpeed run (the Trainer's setup imports it; worker/deepspeed_import.py).
- Liger's model patches, where Liger is installed: load_model imports them for a run with
  enable_liger_kernel (0.5 s under py-spy on the H200 machine); importing patches nothing.
- Triton's cache key (warm_triton). An attempt that is not a spare's works it out in a thread while its
  model loads (warm_in_background).

(LlamaFactory's Auto-class lookups in load_model no longer need warming: worker/model_lookup.py.)
"""

from __future__ import annotations

import gc
import importlib.util
import threading


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
