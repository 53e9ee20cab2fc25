"""The program torchrun starts on every rank: LlamaFactory's training entry point plus the appliance's
callback (checkpoint markers, progress, graceful stop).

Runs as `python -m ft_appliance.worker RUN_FILE`, where RUN_FILE is the JSON written by the
supervisor: {"args": {...LlamaFactory args...}, "state_dir": ..., "attempt": N}.
It talks to the supervisor only through files in state_dir and its exit code.

`python -m ft_appliance.worker --spare GO_FILE` is a spare: it imports the stack (most of a
restart's time), then waits until the supervisor writes GO_FILE ({"run_file": RUN_FILE}) and runs
that attempt. It leaves on its own if the supervisor (FT_SUPERVISOR_PID) goes away first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from . import statefiles

# Exit code of a worker that stopped on request after saving (EX_TEMPFAIL: try again later).
WORKER_EXIT_STOPPED = 75


class StopRequested(Exception):
    """Raised inside the Trainer once the stop checkpoint is on disk; unwinds training cleanly."""


class StopFlag:
    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signum = signum


def allow_cpu_device_tags() -> None:
    """Let torch.load restore storages tagged `cpu:N`.

    accelerate gives every CPU process the device `cpu:0`, the Trainer loads optimizer.pt with that
    as map_location, and torch's CPU deserializer accepts only `cpu`, so multi-process CPU resume
    fails upstream ("don't know how to restore data location ... (tagged with cpu:0)").
    """
    import torch.serialization

    def tag(_obj: Any) -> None:
        return None

    def restore(obj: Any, location: str) -> Any:
        return obj if location.startswith("cpu:") else None

    torch.serialization.register_package(11, tag, restore)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def build_callback(state_dir: Path, attempt: int, stop: StopFlag, tweaks: tuple[str, ...] = ()) -> Any:
    """The appliance's TrainerCallback (defined here so transformers is imported only in workers)."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    rank = _rank()

    class ApplianceCallback(TrainerCallback):
        def __init__(self) -> None:
            self.tokens = _TokenCount()
            self.stopping = False
            self.first_step = True
            self.save_started = time.monotonic()
            self.step_started = time.monotonic()
            self._vote_group: Any = None
            self.trace = _StepTrace.from_env(rank)

        # --- tokens: count real (non-padding) tokens ourselves; the Trainer's counter includes
        # padding under packing and overflows under neat_packing.
        def _count_tokens(self, _module: Any, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            if mask is not None and hasattr(mask, "dim") and mask.dim() == 2:
                self.tokens.add((mask > 0).sum())
            elif mask is not None and hasattr(mask, "dim") and mask.dim() == 4:
                # neat_packing's block-diagonal mask: a real token attends to itself, padding to nothing.
                diag = torch.diagonal(mask[:, 0], dim1=-2, dim2=-1)
                self.tokens.add((diag if diag.dtype == torch.bool else diag == 0).sum())
            elif ids is not None and hasattr(ids, "numel"):
                self.tokens.add(ids.numel())

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if model is not None:
                model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
                self._apply_tweaks(model)
            if stop.signum:
                raise StopRequested(f"stop requested before step {state.global_step + 1}")
            self.step_started = time.monotonic()
            if rank == 0:
                statefiles.append_jsonl(
                    state_dir / statefiles.EVENTS,
                    {
                        "event": "train_begin",
                        "attempt": attempt,
                        "step": state.global_step,
                        "max_steps": state.max_steps,
                        "time": time.time(),
                    },
                )

        def _apply_tweaks(self, model: Any) -> None:
            # After loading: LlamaFactory has no keys for these (profile.Profile.tweaks).
            from . import attention, lora
            from .profile import BLOCKDIAG_ATTENTION, LORA_ADD_IN_GEMM, LORA_INPUTS

            done: dict[str, Any] = {}
            if BLOCKDIAG_ATTENTION in tweaks:
                if attention.flex_available():
                    attention.register()
                    done[BLOCKDIAG_ATTENTION] = f"{attention.use_blockdiag(model)} -> {attention.NAME}"
                else:
                    done[BLOCKDIAG_ATTENTION] = "skipped: FlexAttention unavailable, SDPA kept"
            if LORA_INPUTS in tweaks:
                done[LORA_INPUTS] = f"{lora.keep_lora_inputs_in_compute_dtype(model)} LoRA layers"
            if LORA_ADD_IN_GEMM in tweaks:
                done[LORA_ADD_IN_GEMM] = f"{lora.add_lora_in_gemm(model)} LoRA layers"
            if rank == 0 and done:
                for name, what in done.items():
                    print(f"[ft-appliance worker] {name}: {what}", flush=True)
                statefiles.append_jsonl(
                    state_dir / statefiles.EVENTS, {"event": "tweaks", "attempt": attempt, **done, "time": time.time()}
                )

        def _all_reduce(self, values: list[float]) -> list[float]:
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return values
            if self._vote_group is None:
                # On the CPU: a vote through NCCL would queue behind the step's kernels and wait for all
                # of them. Every rank reaches the first step end, so the collective creation is safe.
                self._vote_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            t = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(t, group=self._vote_group)
            return t.tolist()

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.trace:
                self.trace.maybe_start(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.trace:
                self.trace.maybe_stop(state.global_step)
            # One small all-reduce per step: every rank agrees on a stop at the same step boundary.
            stop_votes, tokens = self._all_reduce([1.0 if stop.signum else 0.0, float(self.tokens.take())])
            now = time.monotonic()
            if rank == 0:
                mem = {"mem_reserved": torch.cuda.max_memory_reserved()} if torch.cuda.is_available() else {}
                statefiles.append_jsonl(
                    state_dir / statefiles.STEPS,
                    {
                        **mem,
                        "attempt": attempt,
                        "step": state.global_step,
                        "max_steps": state.max_steps,
                        "tokens": int(tokens),
                        "seconds": round(now - self.step_started, 4),
                        "time": time.time(),
                        "first": self.first_step,
                    },
                )
            self.first_step = False
            self.step_started = now
            if stop_votes > 0 and not self.stopping:
                self.stopping = True
                control.should_save = True
                control.should_training_stop = True
            self.save_started = time.monotonic()
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if rank == 0 and logs:
                record = {"attempt": attempt, "step": state.global_step, "time": time.time()}
                record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
                statefiles.append_jsonl(state_dir / statefiles.LOG, record)

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # Every rank has finished writing its part of the checkpoint once all pass the barrier.
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if rank == 0 and ckpt.is_dir():
                statefiles.write_marker(ckpt, step=state.global_step, world_size=args.world_size)
                statefiles.append_jsonl(
                    state_dir / statefiles.EVENTS,
                    {
                        "event": "save",
                        "attempt": attempt,
                        "step": state.global_step,
                        "seconds": round(time.monotonic() - self.save_started, 3),
                        "time": time.time(),
                    },
                )
            if self.stopping:
                if rank == 0:
                    statefiles.write_json(
                        state_dir / statefiles.STOPPED,
                        {"attempt": attempt, "step": state.global_step, "checkpoint": str(ckpt), "time": time.time()},
                    )
                if dist.is_available() and dist.is_initialized():
                    dist.barrier()
                raise StopRequested(f"stopped after saving {ckpt}")
            return control

    return ApplianceCallback()


class _TokenCount:
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


class _StepTrace:
    """FT_TRACE_STEPS=DIR[:FIRST[:COUNT]]: torch.profiler over COUNT optimizer steps from FIRST (default
    8 and 2) on rank 0, for benchmarks/: where a step's time goes, including time the GPU waits."""

    def __init__(self, out: Path, first: int, count: int) -> None:
        self.out, self.first, self.count = out, first, count
        self.prof: Any = None
        self.started = 0.0

    @classmethod
    def from_env(cls, rank: int) -> _StepTrace | None:
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
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            self.started = time.monotonic()

    def maybe_stop(self, step: int) -> None:
        if self.prof is None or step != self.first + self.count:
            return
        import torch

        if torch.cuda.is_available():
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
        self.prof = None


def _write_failure(state_dir: Path, attempt: int, exc: BaseException, phase: str) -> None:
    record = {
        "attempt": attempt,
        "rank": _rank(),
        "type": type(exc).__name__,
        "kinds": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc).strip().splitlines()[0][:500] if str(exc).strip() else "",
        "phase": phase,
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
        "time": time.time(),
    }
    statefiles.write_json(state_dir / "attempts" / str(attempt) / f"failure-rank{_rank()}.json", record)


def wait_for_go(go_file: Path, supervisor_pid: int, stop: StopFlag, poll_s: float = 0.05) -> Path | None:
    """A spare's wait: the run file named in go_file, or None when the supervisor is gone or a stop
    signal came first."""
    while not go_file.exists():
        if stop.signum or (supervisor_pid > 0 and not psutil.pid_exists(supervisor_pid)):
            return None
        time.sleep(poll_s)
    return Path(json.loads(go_file.read_text())["run_file"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop = StopFlag()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)

    started = time.time()
    allow_cpu_device_tags()
    from llamafactory.train.tuner import run_exp  # the stack: most of a start's time

    imported = time.time()
    if argv[0] == "--spare":
        go_file = Path(argv[1])
        (go_file.parent / f"ready-rank{_rank()}").write_text(f"{imported - started:.1f}\n")  # import seconds
        found = wait_for_go(go_file, int(os.environ.get("FT_SUPERVISOR_PID", "0")), stop)
        if found is None:
            return WORKER_EXIT_STOPPED
        run_path = found
    else:
        run_path = Path(argv[0])
    run = json.loads(run_path.read_text())
    state_dir = Path(run["state_dir"])
    attempt = int(run["attempt"])
    args: dict[str, Any] = run["args"]
    callback = build_callback(state_dir, attempt, stop, tuple(run.get("tweaks") or ()))

    if _rank() == 0:  # where startup time goes (docs/benchmarks.md)
        statefiles.append_jsonl(
            state_dir / statefiles.EVENTS,
            {
                "event": "worker_imports",
                "attempt": attempt,
                "process_start": psutil.Process().create_time(),
                "main_start": started,
                "imported": imported,
                "spare": argv[0] == "--spare",
                "time": time.time(),
            },
        )

    try:
        run_exp(args=args, callbacks=[callback])
    except StopRequested as exc:
        print(f"[ft-appliance worker rank {_rank()}] {exc}", flush=True)
        if _rank() == 0 and not (state_dir / statefiles.STOPPED).exists():
            statefiles.write_json(
                state_dir / statefiles.STOPPED, {"attempt": attempt, "step": None, "time": time.time()}
            )
        return WORKER_EXIT_STOPPED
    except BaseException as exc:  # recorded for the supervisor's retry decision, then re-raised
        phase = "train" if (state_dir / statefiles.STEPS).exists() and _started(state_dir, attempt) else "setup"
        _write_failure(state_dir, attempt, exc, phase)
        raise
    if _rank() == 0:
        statefiles.write_json(state_dir / statefiles.COMPLETED, {"attempt": attempt, "time": time.time()})
    return 0


def _exit_now(code: int) -> None:
    """Leave without interpreter teardown: after training, gloo's threads sometimes abort the process
    at exit ("terminate called without an active exception", SIGABRT), turning a finished run into
    a failed rank. Everything worth keeping is already on disk and flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _started(state_dir: Path, attempt: int) -> bool:
    last = statefiles.last_jsonl(state_dir / statefiles.STEPS)
    return bool(last and last.get("attempt") == attempt)


if __name__ == "__main__":
    _exit_now(main())
