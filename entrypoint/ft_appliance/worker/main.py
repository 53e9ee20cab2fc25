"""The program torchrun starts on every rank: LlamaFactory's training entry point plus the appliance's
callbacks (checkpoint markers, progress, beats, graceful stop).

`python -m ft_appliance.worker RUN_FILE` trains the attempt described by RUN_FILE (a RunFile).
`python -m ft_appliance.worker --spare GO_FILE [--deepspeed]` is a spare: it imports the stack (most of
a restart's time; deepspeed too for a DeepSpeed run), then waits until the supervisor writes GO_FILE
(a GoFile) and runs that attempt.
A worker talks to the supervisor only through the state folder's records and its exit code.
"""

from __future__ import annotations

import ctypes
import errno as errnos
import functools
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..state import lock
from ..state.layout import BadRecord, StateDir, append_record, read_record, ready_file, write_record
from ..state.records import Completion, Event, GoFile, RunFile, StopRecord, WorkerFailure
from . import ahead
from .beat import Beat, pid_alive
from .context import StopFlag, StopRequested, WorkerContext

# Exit code of a worker that stopped on request after saving (EX_TEMPFAIL: try again later).
WORKER_EXIT_STOPPED = 75
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL when torchrun dies: together with torchrun's own death signal, no rank outlives the
    supervisor. A parent already gone (re-parented to init) means exit now."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the beat thread's parent check is the fallback
    if parent == 1 or os.getppid() != parent:
        os._exit(137)


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


def write_failure(sd: StateDir, attempt: int, exc: BaseException, phase: str) -> None:
    text = str(exc).strip()
    record = WorkerFailure(
        type=type(exc).__name__,
        message=text.splitlines()[0][:500] if text else "",
        phase=phase,
        rank=_rank(),
        kinds=tuple(c.__name__ for c in type(exc).__mro__),
        errno=exc.errno if isinstance(exc, OSError) and isinstance(exc.errno, int) else None,
        attempt=attempt,
        time=time.time(),
        traceback="".join(traceback.format_exception(exc))[-4000:],
    )
    try:
        write_record(sd.failure_file(attempt, _rank()), record)
    except OSError as err:
        if err.errno != errnos.ENOSPC:
            raise


def wait_for_go(go_file: Path, supervisor_pid: int, stop: StopFlag, poll_s: float = 0.05) -> Path | None:
    """A spare's wait: the run file named in go_file, or None when the supervisor is gone or a stop
    signal came first."""
    while not go_file.exists():
        if stop.signum or (supervisor_pid > 0 and not pid_alive(supervisor_pid)):
            return None
        time.sleep(poll_s)
    go = read_record(go_file, GoFile)
    return Path(go.run_file) if go else None


def _stopped_early(ctx: WorkerContext) -> int:
    """A stop before training began: nothing new to save."""
    if ctx.rank == 0 and not ctx.sd.stopped.exists():
        write_record(ctx.sd.stopped, StopRecord(ctx.attempt, None, None, time.time()))
    return WORKER_EXIT_STOPPED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop = StopFlag()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    die_with_parent()
    supervisor = int(os.environ.get("FT_SUPERVISOR_PID", "0"))
    started = time.time()
    spare = argv[0] == "--spare"
    if spare:
        run_path = _wait_as_spare(Path(argv[1]), supervisor, stop, deepspeed="--deepspeed" in argv[2:])
        if run_path is None:
            return WORKER_EXIT_STOPPED
    else:
        run_path = Path(argv[0])
    if ahead.cuda_ahead_enabled(os.environ):  # from here on this process trains: its GPU is its own
        ahead.open_cuda_context_in_background()
    try:
        run = read_record(run_path, RunFile)
    except BadRecord as exc:
        print(f"[ft-appliance worker] {exc}", file=sys.stderr, flush=True)
        return 2
    assert run is not None, f"{run_path} is missing"
    sd = StateDir(Path(run.state_dir).parent)
    lock.hold_tree(sd)  # kept until this process exits: a new supervisor waits for every rank to go
    beat = Beat(sd.beat_file(run.attempt) if _rank() == 0 else None, run.attempt, supervisor).start()
    ctx = WorkerContext(sd, run.attempt, _rank(), stop, beat, tuple(run.tweaks), run.keep_checkpoints)
    return _train(ctx, run, started, spare)


def _wait_as_spare(go_file: Path, supervisor: int, stop: StopFlag, deepspeed: bool) -> Path | None:
    started = time.time()
    _import_stack()
    ahead.prepare(deepspeed)
    ready_file(go_file, _rank()).write_text(f"{time.time() - started:.1f}\n")  # seconds to ready
    return wait_for_go(go_file, supervisor, stop)


@functools.cache  # a spare imports before its wait; the attempt it becomes must not register twice
def _import_stack() -> Any:
    import gc

    allow_cpu_device_tags()
    from llamafactory.train.tuner import run_exp  # the stack: most of a start's time

    from .model_lookup import install

    install()  # load_model's Auto-class choice without importing every model's configuration
    # The stack's half a million objects live as long as the process: frozen, they leave the collector's
    # view, so the Trainer's gc.collect() at train start (0.7 s on the H200 machine) and every full
    # collection after it scan only what the run allocates.
    gc.freeze()
    return run_exp


def _train(ctx: WorkerContext, run: RunFile, started: float, spare: bool) -> int:
    try:
        run_exp = _import_stack()
        if ctx.stop.signum:  # stopped while importing: leave before loading the model
            return _stopped_early(ctx)
        if ctx.rank == 0:  # where startup time goes (docs/benchmarks.md)
            data = {"main_start": started, "imported": time.time(), "spare": spare}
            append_record(ctx.sd.events, Event("worker_imports", run.attempt, time.time(), data))
        from .callbacks import build_callbacks  # imports transformers: after the stop check
        from .deepspeed_import import skip_engine_lookup, uses_deepspeed
        from .setup_clock import SetupClock

        SetupClock(ctx.setup_seconds).install()
        if not spare:  # a spare did this while it waited
            ahead.warm_in_background()
        if not uses_deepspeed(run.args):
            skip_engine_lookup()

        if run.autotune is not None:
            from . import autotune

            autotune.install(autotune.Regrouper(run.autotune, ctx))
        if run.background_saves:
            ctx.saver = _background_saves(ctx.rank)
        run_exp(args=dict(run.args), callbacks=build_callbacks(ctx))
        if ctx.saver is not None:
            ctx.saver.wait()
    except StopRequested as exc:
        print(f"[ft-appliance worker rank {ctx.rank}] {exc}", flush=True)
        return _stopped_early(ctx)
    except BaseException as exc:  # recorded for the supervisor's retry decision, then re-raised
        if ctx.saver is not None:
            ctx.saver.settle()
        write_failure(ctx.sd, run.attempt, exc, "train" if ctx.trained else "setup")
        raise
    ctx.beat.enter("done")
    if ctx.rank == 0:
        write_record(ctx.sd.completed, Completion(run.attempt, time.time()))
    return 0


def _background_saves(rank: int) -> Any:
    from . import saves

    saver = saves.BackgroundSaver(lambda line: print(f"[ft-appliance worker rank {rank}] {line}", flush=True))
    saves.install(saver)
    return saver


def exit_now(code: int) -> None:
    """Leave without interpreter teardown: after training, gloo's threads sometimes abort the process
    at exit ("terminate called without an active exception", SIGABRT), turning a finished run into
    a failed rank. Everything worth keeping is already on disk and flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
