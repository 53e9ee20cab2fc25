"""Measurements the worker takes inside a step: real tokens, counted on the device, and the
FT_TRACE_STEPS profiler that benchmarks/ reads."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class TokenCount:
    """Real tokens of the current optimizer step, counted on the device where the masks are.

    Reading a device count stalls the CPU until the GPU queue is empty, so each micro-batch's running
    total is copied to pinned host memory asynchronously, and the step end waits only for the last
    copy (queued at the last micro-batch's start, long done or close to it), not for the whole step.
    """

    def __init__(self) -> None:
        self.on_host = 0
        self.on_device: Any = None
        self.pinned: Any = None
        self.copied: Any = None

    def add(self, count: Any) -> None:
        import torch

        if not (isinstance(count, torch.Tensor) and count.is_cuda):
            self.on_host += int(count)
            return
        self.on_device = count if self.on_device is None else self.on_device + count
        if self.pinned is None:
            self.pinned = torch.zeros((), dtype=torch.int64, pin_memory=True)
            self.copied = torch.cuda.Event()
        self.pinned.copy_(self.on_device, non_blocking=True)
        self.copied.record()

    def take(self) -> int:
        """The step's count, then zero for the next step."""
        value, self.on_host = self.on_host, 0
        if self.on_device is not None:
            self.copied.synchronize()
            value += int(self.pinned)
            self.on_device = None
        return value


class StepTrace:
    """FT_TRACE_STEPS=DIR[:FIRST[:COUNT]]: torch.profiler over COUNT optimizer steps from FIRST (default
    8 and 2) on rank 0, for benchmarks/: where a step's time goes, including time the GPU waits.
    Writes trace.txt (the profiler's tables) and breakdown.json/.txt (worker/breakdown.py)."""

    def __init__(self, out: Path, first: int, count: int) -> None:
        self.out, self.first, self.count = out, first, count
        self.prof: Any = None
        self.started = 0.0
        self.syncs: SyncSites | None = None

    @classmethod
    def from_env(cls, rank: int) -> StepTrace | None:
        spec = os.environ.get("FT_TRACE_STEPS")
        if not spec or rank != 0:
            return None
        parts = spec.split(":")
        return cls(Path(parts[0]), int(parts[1]) if len(parts) > 1 else 8, int(parts[2]) if len(parts) > 2 else 2)

    def maybe_start(self, step: int) -> None:
        if step == self.first and self.prof is None:
            import torch
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
            self.started = time.monotonic()
            if torch.cuda.is_available():
                self.syncs = SyncSites()
                self.syncs.start()

    def maybe_stop(self, step: int, model: Any = None) -> None:
        if self.prof is None or step != self.first + self.count:
            return
        import torch

        device = torch.cuda.is_available()
        sites = self.syncs.stop() if self.syncs else {}
        if device:
            torch.cuda.synchronize()
        wall = time.monotonic() - self.started
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        # Kernels only: the ops that launched them report the same device time again.
        cuda_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "trace.txt").write_text(
            f"{self.count} steps: wall {wall * 1000:.0f} ms, GPU busy {cuda_us / 1000:.0f} ms\n\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
            + "\n"
            + events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
        )
        if sites:
            rows = [f"{n:5d} x  {where}" for where, n in sorted(sites.items(), key=lambda kv: -kv[1])]
            head = f"device synchronisations in {self.count} steps:\n"
            (self.out / "syncs.txt").write_text(head + "\n".join(rows) + "\n")
        try:
            self._breakdown(wall * 1e6, device, model)
        except Exception as exc:  # a measurement aid: it must never end the training it measures
            (self.out / "breakdown.txt").write_text(f"breakdown failed: {type(exc).__name__}: {exc}\n")
        self.prof = None

    def _breakdown(self, wall_us: float, device: bool, model: Any) -> None:
        from . import breakdown

        rank, vocab = _lora_rank(model), int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        events = self.prof.events()
        works, busy = profiled_works(events, device)
        result = breakdown.breakdown(works, wall_us, self.count, rank, vocab, busy if device else None)
        text = breakdown.render(result)
        if device:
            kernels, host = spans(events)
            result["gaps"] = breakdown.largest_gaps(kernels, host)
            text += "\n" + breakdown.render_gaps(result["gaps"])
        (self.out / "breakdown.json").write_text(json.dumps(result, indent=1) + "\n")
        (self.out / "breakdown.txt").write_text(text)


class SyncSites:
    """Where the traced steps make the host wait for the device: torch's sync debug mode warns at each
    synchronising call (item(), a copy to the host, nonzero, ...); each warning's Python stack is
    counted. Each such wait empties the GPU's queue, and it stays idle until the host launches again."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._show: Any = None
        self._filters: Any = None

    def start(self) -> None:
        import warnings

        import torch

        self._show, self._filters = warnings.showwarning, list(warnings.filters)
        warnings.filterwarnings("always", message=".*synchroniz")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def _record(self, message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        import traceback

        if "synchroniz" not in str(message):
            return self._show(message, category, filename, lineno, *rest)
        frames = [f for f in traceback.extract_stack() if not f.filename.endswith(("warnings.py", "counting.py"))]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))
        self.counts[where] = self.counts.get(where, 0) + 1
        return None

    def stop(self) -> dict[str, int]:
        import warnings

        import torch

        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning, warnings.filters[:] = self._show, self._filters
        return self.counts


def profiled_works(events: Any, device: bool) -> tuple[list[Any], list[tuple[float, float]]]:
    """The profiler's events as breakdown.Work, and the device's busy intervals. On a device each
    kernel comes with the PyTorch op it was attached to (FunctionEvent.kernels, in every torch
    version); on CPU each op comes with its own time."""
    from torch.autograd import DeviceType

    from .breakdown import Work

    works, busy = [], []
    for e in events:
        if e.device_type != DeviceType.CPU:
            busy.append((e.time_range.start, e.time_range.end))
            continue
        shapes, around = tuple(_shapes(e.input_shapes or ())), _ancestors(e)
        if device:
            works.extend(Work(k.name, e.name, shapes, around, k.duration) for k in e.kernels)
        elif e.self_cpu_time_total > 0:
            works.append(Work(e.name, e.name, shapes, around, e.self_cpu_time_total))
    return works, busy


def spans(events: Any) -> tuple[list[tuple[float, float, str]], list[tuple[float, float, str]]]:
    """(kernels, host ops and ranges) as (start, end, name), for breakdown.largest_gaps."""
    from torch.autograd import DeviceType

    kernels, host = [], []
    for e in events:
        (host if e.device_type == DeviceType.CPU else kernels).append((e.time_range.start, e.time_range.end, e.name))
    return kernels, host


def _ancestors(op: Any) -> tuple[str, ...]:
    names, parent = [], op.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return tuple(names)


def _shapes(inputs: Any) -> Any:
    """Every tensor shape among an op's inputs; a tensor list (the foreach ops') gives each of its own."""
    for s in inputs:
        if isinstance(s, (list, tuple)) and all(isinstance(d, int) for d in s):
            yield tuple(s)
        elif isinstance(s, (list, tuple)):
            yield from _shapes(s)


def _lora_rank(model: Any) -> int:
    """The adapter's rank (peft's LoraLayer.r), 0 without LoRA."""
    for module in model.modules() if model is not None else ():
        r = getattr(module, "r", None)
        if isinstance(r, dict) and r:
            return int(next(iter(r.values())))
    return 0
