"""Checkpoints written in the background (policy/saves.py says for which runs).

Trainer._save_checkpoint runs as it always does, except for its two large writes, the model's weights
and the optimizer's state. Each tensor is copied into a host buffer (pinned on GPUs, and reused from
one save to the next). The step waits only for that copy. A thread then writes the files from the
copies while training goes on.

trainer_state.json is what the Trainer's resume and the appliance's content check read as "the save
finished", so it is kept under another name until the thread is done. Then the thread calls the
marker callback, which makes every file durable before the marker is written.

A write that fails raises in the training thread at the next save, at the end of training, or at a
stop. A crash during a write leaves an unmarked checkpoint, which the next attempt sets aside.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..policy.saves import host_copy_fits

PENDING_SUFFIX = ".ft-pending"
Job = Callable[[], None]


def available_host_bytes() -> int:
    """MemAvailable, or less under a cgroup (a container's --memory) limit: pinned pages count there."""
    import psutil

    free = int(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return free
    return free if limit == "max" else min(free, int(limit) - used)


class BackgroundSaver:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.buffers: dict[tuple[Any, ...], Any] = {}
        """Host copies by tree path, reused while the tensor's shape and dtype stay the same."""
        self.jobs: list[Job] = []
        self.deferring = False
        self.off: str | None = None
        """Why this run's saves are written in the step after all (the copy would not fit)."""
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.held: Path | None = None
        self.preparing: threading.Thread | None = None
        self.arena: Any = None

    def prepare(self, trees: dict[str, Any]) -> None:
        """Lay out one host arena for the copies of these trees and allocate it in a thread, after the
        first step (when the optimizer has its state): the first save then only copies. One
        allocation pinned with cudaHostRegister: with torch's pinned allocator each tensor was
        allocated and pinned in the step (27.6 s of stall at a 23 GiB save on an H200, 0.46 s
        with the arena; docs/benchmarks.md)."""
        layout, total = _layout(trees)
        if not host_copy_fits(total, available_host_bytes()):
            self._turn_off(total)
            return
        self.preparing = threading.Thread(
            target=self._allocate, args=(layout, total), name="ft-host-arena", daemon=True
        )
        self.preparing.start()

    def _allocate(self, layout: list[tuple[tuple[Any, ...], Any, Any, int]], total: int) -> None:
        import torch

        arena = torch.empty(total, dtype=torch.uint8)
        if torch.cuda.is_available():
            from torch.cuda._pin_memory_utils import pin_memory

            pin_memory(arena.data_ptr(), total)
        for path, shape, dtype, offset in layout:
            size = math.prod(shape) * dtype.itemsize
            self.buffers[path] = arena[offset : offset + size].view(dtype).view(shape)
        self.arena = arena

    def _turn_off(self, total: int) -> None:
        self.off = f"the training state ({total / 2**30:.1f} GiB) would take over half the free host memory"
        self.say(f"background saves off: {self.off}; checkpoints are written in the step")

    def begin(self, state_bytes: Callable[[], int]) -> None:
        """Called by each checkpoint save before it writes: defer its writes when the copy fits.
        state_bytes is asked only while there is no arena (a save before the first step ended)."""
        started, writing = time.monotonic(), self.thread is not None
        self.wait()  # the previous checkpoint is marked before this one starts
        waited = time.monotonic() - started
        if writing and waited >= 1.0:
            self.say(
                f"this save waited {waited:.0f} s for the previous checkpoint's write: saves come faster than "
                f"the volume takes them (raise save_steps to train without the wait)"
            )
        if self.preparing is not None:
            self.preparing.join()
            self.preparing = None
        if self.off is None and not self.buffers and not host_copy_fits(total := state_bytes(), available_host_bytes()):
            self._turn_off(total)
        self.deferring = self.off is None

    def copy(self, name: str, tree: Any) -> Any:
        """The tree with every tensor replaced by its host copy; the step waits for the copies only."""
        import torch

        memo: dict[tuple[Any, ...], Any] = {}
        out = self._copy(tree, (name,), memo)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    def _copy(self, node: Any, path: tuple[Any, ...], memo: dict[tuple[Any, ...], Any]) -> Any:
        import torch

        if isinstance(node, torch.Tensor):
            # Tied weights stay tied: save_pretrained finds them by their shared storage.
            alias = _alias(node)
            if alias not in memo:
                memo[alias] = self._buffer(path, node)
                memo[alias].copy_(node.detach(), non_blocking=True)
            return memo[alias]
        if isinstance(node, dict):
            return {k: self._copy(v, (*path, k), memo) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(self._copy(v, (*path, i), memo) for i, v in enumerate(node))
        return copy.deepcopy(node)

    def _buffer(self, path: tuple[Any, ...], like: Any) -> Any:
        import torch

        buf = self.buffers.get(path)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            # Not in the arena (a save before the first step ended, a tensor that changed): pageable
            # memory, still copied once and reused.
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu")
            self.buffers[path] = buf
        return buf

    def hold(self, trainer_state: Path) -> None:
        """Hide trainer_state.json until the weights are written (the thread puts it back)."""
        if trainer_state.is_file():
            trainer_state.rename(trainer_state.with_name(trainer_state.name + PENDING_SUFFIX))
            self.held = trainer_state

    def start(self, then: Job) -> None:
        """Write the deferred files in a thread, put trainer_state.json back, then call `then`."""
        jobs, self.jobs, held, self.held = self.jobs, [], self.held, None

        def run() -> None:
            try:
                for job in jobs:
                    job()
                if held is not None:
                    held.with_name(held.name + PENDING_SUFFIX).rename(held)
                then()
            except BaseException as exc:  # raised in the training thread by wait()
                self.error = exc

        self.thread = threading.Thread(target=run, name="ft-background-save", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Block until the background write is done; re-raise its error here."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def settle(self, timeout_s: float = 120.0) -> None:
        """Let a write under way finish (a failing attempt's last checkpoint may still complete), for
        a while: a write that hangs leaves its checkpoint unmarked, which the next attempt sets aside."""
        if self.thread is not None:
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                self.say(f"background save still writing after {timeout_s:.0f} s: its checkpoint stays unmarked")
                return
        try:
            self.wait()
        except BaseException as exc:  # the attempt is failing already; its own error is the one to report
            self.say(f"background save failed too: {type(exc).__name__}: {exc}")


ALIGN = 64


def _alias(t: Any) -> tuple[Any, ...]:
    return (t.data_ptr(), t.shape, t.stride(), t.dtype)


def _tensors(node: Any, path: tuple[Any, ...]) -> Any:
    """(path, tensor) for every tensor of a tree, in the order BackgroundSaver._copy visits them."""
    import torch

    if isinstance(node, torch.Tensor):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _tensors(v, (*path, k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _tensors(v, (*path, i))


def _layout(trees: dict[str, Any]) -> tuple[list[tuple[tuple[Any, ...], Any, Any, int]], int]:
    """Each distinct tensor's (path, shape, dtype, byte offset) in one arena, and the arena's size."""
    layout, seen, total = [], set(), 0
    for name, tree in trees.items():
        for path, t in _tensors(tree, (name,)):
            if _alias(t) in seen:
                continue
            seen.add(_alias(t))
            total = -(-total // ALIGN) * ALIGN
            layout.append((path, t.shape, t.dtype, total))
            total += t.numel() * t.element_size()
    return layout, total


def state_bytes(trainer: Any) -> int:
    return _layout({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()})[1]


def install(saver: BackgroundSaver) -> None:
    """Defer the Trainer's model and optimizer writes while a checkpoint is being saved."""
    from transformers import Trainer

    if getattr(Trainer, "_ft_saver", None) is not None:
        Trainer._ft_saver = saver
        return
    Trainer._ft_saver = saver
    save_checkpoint, save_model, save_optimizer = (
        Trainer._save_checkpoint, Trainer._save, Trainer._save_optimizer_and_scheduler,
    )  # fmt: skip

    def _save_checkpoint(self: Any, model: Any, trial: Any) -> None:
        saver = Trainer._ft_saver
        saver.begin(lambda: state_bytes(self) if self.args.should_save else 0)
        try:
            save_checkpoint(self, model, trial)
        finally:
            saver.deferring = False
        if saver.jobs:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            saver.hold(folder / "trainer_state.json")

    def _save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        saver = Trainer._ft_saver
        if not saver.deferring:
            return save_model(self, output_dir, state_dict)
        host = saver.copy("model", state_dict if state_dict is not None else self.model.state_dict())
        saver.jobs.append(lambda: save_model(self, output_dir, dict(host)))  # save_pretrained pops keys

    def _save_optimizer_and_scheduler(self: Any, output_dir: str) -> None:
        saver = Trainer._ft_saver
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and self.args.should_save
        if not (saver.deferring and plain):
            return save_optimizer(self, output_dir)
        optimizer = saver.copy("optimizer", self.optimizer.state_dict())
        scheduler = copy.deepcopy(self.lr_scheduler.state_dict())
        saver.jobs.append(lambda: _write_optimizer(output_dir, optimizer, scheduler))

    Trainer._save_checkpoint = _save_checkpoint
    Trainer._save = _save
    Trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler


def _write_optimizer(output_dir: str, optimizer: Any, scheduler: Any) -> None:
    import torch

    # The names and the pickles the Trainer writes and reads back (trainer.py OPTIMIZER_NAME, SCHEDULER_NAME).
    # Through Python file objects: torch.save(path) opens the file in C++ holding the GIL, so an open
    # that hangs (a volume that stopped answering) would freeze the training thread too.
    with _without_crc32(), open(os.path.join(output_dir, "optimizer.pt"), "wb") as fh:
        torch.save(optimizer, fh)
    with open(os.path.join(output_dir, "scheduler.pt"), "wb") as fh:
        torch.save(scheduler, fh)


@contextlib.contextmanager
def _without_crc32() -> Iterator[None]:
    """torch.save without its zip records' CRC32: the checksum is most of its serialisation time
    (0.53 against 0.18 s/GiB on the 2-core dev machine, benchmarks/save_cost.py), and the write's
    length decides how soon the next save can come without waiting. torch.load does not check it;
    the marker's sizes say that a file is whole. Process-wide, but no other torch.save runs
    meanwhile: the training thread writes only between wait() and start()."""
    import torch.serialization as ts

    if not hasattr(ts, "set_crc32_options"):  # torch before 2.6
        yield
        return
    before = ts.get_crc32_options()
    ts.set_crc32_options(False)
    try:
        yield
    finally:
        ts.set_crc32_options(before)
