"""What a background save's write costs per GiB, by format: torch.save with and without its CRC32
(the optimizer state), safetensors (the weights). Writes to DIR (default /dev/shm: serialisation
only, no disk) and prints seconds per GiB, best of three.

    python benchmarks/save_cost.py [--dir DIR] [--gib 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.serialization


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--gib", type=int, default=1)
    a = ap.parse_args()
    n = 128 * a.gib  # 4 MiB fp32 tensors, two moments each: an AdamW state of a.gib GiB
    state = {i: {"exp_avg": torch.randn(512, 1024), "exp_avg_sq": torch.randn(512, 1024)} for i in range(n)}
    weights = {f"layer.{i}.weight": torch.randn(1024, 1024) for i in range(n)}
    opt, st = a.dir / "save_cost.pt", a.dir / "save_cost.safetensors"
    try:
        for crc in (True, False):
            torch.serialization.set_crc32_options(crc)
            print(
                f"torch.save, crc32 {'on ' if crc else 'off'}: {best(lambda: torch.save(state, opt)) / a.gib:.2f} s/GiB"
            )
        torch.serialization.set_crc32_options(True)
        print(
            f"safetensors save_file:  {best(lambda: safetensors.torch.save_file(weights, str(st))) / a.gib:.2f} s/GiB"
        )
    finally:
        opt.unlink(missing_ok=True)
        st.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
