"""Does anything of a worker's start overlap with its imports? Prints one line per run:

    python3 benchmarks/import_overlap.py seq|thread|thread2

seq: import torch, then the stack (what ft_appliance.worker imports), then initialise CUDA, then
import Inductor, FlexAttention and Liger (what the first step imports). thread: CUDA is initialised in a
thread while the stack imports. thread2: that thread also imports Inductor. Needs a GPU.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time

t0 = time.time()
mode = sys.argv[1] if len(sys.argv) > 1 else "seq"
import torch  # noqa: E402

t1 = time.time()


def gpu() -> None:
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    if mode == "thread2":
        importlib.import_module("torch._inductor.compile_fx")


side = threading.Thread(target=gpu) if mode.startswith("thread") else None
if side:
    side.start()
importlib.import_module("ft_appliance.worker")
importlib.import_module("llamafactory.train.tuner")
t2 = time.time()
if side:
    side.join()
else:
    gpu()
t3 = time.time()
for name in ("torch._inductor.compile_fx", "torch.nn.attention.flex_attention", "liger_kernel.transformers"):
    importlib.import_module(name)
t4 = time.time()
print(
    f"{mode:8s} torch {t1 - t0:.2f} stack {t2 - t1:.2f} cuda/join {t3 - t2:.2f} "
    f"inductor+liger {t4 - t3:.2f} total {t4 - t0:.2f}",
    flush=True,
)
