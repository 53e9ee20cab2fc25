"""How fast transformers loads bench.py's 8B model onto the GPU with each number of copy threads
(transformers.core_model_loading.GLOBAL_WORKERS, 4 upstream: it reads every tensor from the memory-mapped
file and copies it to the GPU). One line per load; the first also warms the page cache.

    python benchmarks/load_threads.py [--workdir /tmp/bench] [THREADS ...]   (default: 4 8 16 4)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def load_seconds(model_dir: Path, threads: int) -> float:
    import torch
    import transformers.core_model_loading as loading
    from transformers import AutoModelForCausalLM

    loading.GLOBAL_WORKERS = threads
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("threads", nargs="*", type=int, default=[4, 8, 16, 4])
    a = ap.parse_args()
    model_dir = a.workdir / "models" / "llama-8b-random"
    for n in a.threads:
        print(f"threads {n:2d}: {load_seconds(model_dir, n):5.2f} s", flush=True)


if __name__ == "__main__":
    main()
