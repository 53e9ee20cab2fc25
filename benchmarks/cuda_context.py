"""What opening the GPU's CUDA context during the stack's import saves (worker/ahead.open_cuda_context):
each round starts two fresh interpreters, one as a worker without it and one with it (FT_CUDA_AHEAD),
that import LlamaFactory's entry point and then make a tensor on the GPU, and prints the seconds from
the interpreter's start to the import's end and to that tensor.

    python benchmarks/cuda_context.py [ROUNDS]   (default 3; PYTHONPATH must reach entrypoint/)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

CHILD = """
import json, sys, time
t0 = float(sys.argv[1])
from ft_appliance.worker import ahead
ahead_thread = ahead.open_cuda_context_in_background() if sys.argv[2] == "1" else None
from llamafactory.train.tuner import run_exp
imported = time.time()
import torch
torch.ones(1, device="cuda").sum().item()
ready = time.time()
print(json.dumps({"imported": imported - t0, "ready": ready - t0, "after_import": ready - imported}))
"""


def one(ahead: bool) -> dict:
    start = time.time()
    res = subprocess.run(
        [sys.executable, "-c", CHILD, repr(start), "1" if ahead else "0"], capture_output=True, text=True, timeout=300
    )
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    one(False)  # bytecode and page cache warm for both
    for r in range(rounds):
        for ahead in (False, True):
            m = one(ahead)
            print(
                f"round {r} ahead={int(ahead)}: imported {m['imported']:.2f} s, first GPU tensor {m['ready']:.2f} s "
                f"(+{m['after_import']:.2f} s after the import)",
                flush=True,
            )


if __name__ == "__main__":
    main()
