"""A worker's start, in a fresh interpreter with the real stack: after the stack's import its objects are
frozen out of the garbage collector's view (worker/main.py), so the Trainer's gc.collect() at train
start scans only what the run allocated since; Triton's warm-up is a no-op without Triton."""

from __future__ import annotations

import subprocess
import sys

START = """
import gc
from ft_appliance.worker import ahead, main
main._import_stack()
frozen, tracked = gc.get_freeze_count(), len(gc.get_objects())  # what a collection visits
thread = ahead.warm_in_background(); thread.join(60)
print(frozen, tracked, ahead.warm_triton(), thread.is_alive())
"""


def test_the_stacks_objects_are_frozen_and_a_collection_skips_them() -> None:
    res = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    frozen, tracked, triton, alive = res.stdout.split()[-4:]
    assert int(frozen) > 100_000, frozen  # torch, transformers, datasets, llamafactory
    assert int(tracked) < int(frozen) / 10, (tracked, frozen)
    assert triton == "False" and alive == "False"  # the CPU torch has no Triton


def test_cuda_context_ahead_is_opt_in() -> None:
    from ft_appliance.worker import ahead

    table = [({}, False), ({"FT_CUDA_AHEAD": "0"}, False), ({"FT_CUDA_AHEAD": "1"}, True)]
    for env, enabled in table:
        assert ahead.cuda_ahead_enabled(env) is enabled, env


def test_without_a_cuda_driver_the_context_thread_ends_at_once() -> None:
    """This machine has no libcuda: the thread says so and ends; torch's own first call then reports it."""
    from ft_appliance.worker import ahead

    assert ahead.open_cuda_context(0) is False
    thread = ahead.open_cuda_context_in_background({"LOCAL_RANK": "1"})
    thread.join(10)
    assert not thread.is_alive()
