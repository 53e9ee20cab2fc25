"""A small fake worker for fast supervisor tests: a real process under a real torchrun that speaks the
appliance's state protocol (run file, step/log records, beats, markers, stop and failure records,
the tree lock and the death signal) with the real worker's own pieces, but trains nothing.

    FT_WORKER_MODULE=tests.fakes.worker FT_FAKE='{"step_s": 0.05, ...}' ft-appliance train CFG --nproc 1

FT_FAKE keys (all optional):
  step_s     seconds per step (0.05)          import_s   seconds "importing" before step 1 (0)
  save_s     seconds per checkpoint save (0)  eval_at    step after which an evaluation runs
  eval_s     seconds the evaluation lasts     hang_at    step at which rank 0 stops, silent, forever
  crash_at   step at which rank 0 raises      fault_attempts  attempts that crash or hang (default: all)
  bad_failure_record  write a torn failure record instead of a whole one when crashing
  ignore_term  ignore SIGTERM (a rank stuck in a collective)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from ft_appliance.state import checkpoints, lock
from ft_appliance.state.layout import StateDir, append_record, read_record, write_record
from ft_appliance.state.records import Completion, LogRecord, RunFile, StepRecord, StopRecord
from ft_appliance.worker.beat import Beat
from ft_appliance.worker.context import StopFlag
from ft_appliance.worker.main import WORKER_EXIT_STOPPED, die_with_parent, exit_now, wait_for_go, write_failure


def save(out: Path, step: int, seconds: float, beat: Beat) -> None:
    beat.enter("save", step)
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    time.sleep(seconds)
    (ckpt / "adapter_model.bin").write_bytes(b"x" * 64)
    checkpoints.write_marker(ckpt, step=step, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    beat.enter("train", step)


def main() -> int:
    fake = json.loads(os.environ.get("FT_FAKE", "{}"))
    stop = StopFlag()
    signal.signal(signal.SIGTERM, signal.SIG_IGN if fake.get("ignore_term") else stop)
    signal.signal(signal.SIGINT, stop)
    die_with_parent()
    run_path = Path(sys.argv[1])
    if sys.argv[1] == "--spare":  # no stack to import: wait for the attempt at once
        found = wait_for_go(Path(sys.argv[2]), int(os.environ["FT_SUPERVISOR_PID"]), stop)
        if found is None:
            return WORKER_EXIT_STOPPED
        run_path = found
    run = read_record(run_path, RunFile)
    assert run is not None
    sd = StateDir(Path(run.state_dir).parent)
    lock.hold_tree(sd)
    rank = int(os.environ.get("RANK", "0"))
    beat = Beat(sd.beat_file(run.attempt) if rank == 0 else None, run.attempt, int(os.environ["FT_SUPERVISOR_PID"]))
    beat.start()
    try:
        return train(fake, run, sd, rank, stop, beat)
    except RuntimeError as exc:
        if fake.get("bad_failure_record"):
            sd.failure_file(run.attempt, rank).write_text('{"attempt": 1, "ra')
        else:
            write_failure(sd, run.attempt, exc, "train")
        return 1


def train(fake: dict, run: RunFile, sd: StateDir, rank: int, stop: StopFlag, beat: Beat) -> int:
    out = Path(run.args["output_dir"])
    max_steps, save_steps = int(run.args["max_steps"]), int(run.args.get("save_steps", 10))
    step = checkpoints.step_of(run.resume_from) or 0
    time.sleep(fake.get("import_s", 0))
    if stop.signum:
        return WORKER_EXIT_STOPPED
    beat.enter("train", step)
    faulty = run.attempt in fake.get("fault_attempts", [run.attempt])
    first = True
    while step < max_steps:
        if stop.signum:
            save(out, step, fake.get("save_s", 0), beat)
            write_record(sd.stopped, StopRecord(run.attempt, step, str(out / f"checkpoint-{step}"), time.time()))
            return WORKER_EXIT_STOPPED
        time.sleep(fake.get("step_s", 0.05))
        step += 1
        if rank == 0 and faulty and step == fake.get("hang_at"):
            while True:
                time.sleep(60)
        if rank == 0 and faulty and step == fake.get("crash_at"):
            raise RuntimeError(f"fake crash at step {step}")
        if rank == 0:
            seconds = fake.get("step_s", 0.05)
            append_record(sd.steps, StepRecord(run.attempt, step, max_steps, 100, seconds, time.time(), first))
            append_record(sd.log, LogRecord(run.attempt, step, time.time(), loss=1.0 / step))
        first = False
        if step == fake.get("eval_at"):
            beat.enter("evaluate", step)
            time.sleep(fake.get("eval_s", 0))
            beat.enter("train", step)
        if step % save_steps == 0 or step == max_steps:
            save(out, step, fake.get("save_s", 0), beat)
    if rank == 0:
        write_record(sd.completed, Completion(run.attempt, time.time()))
    return 0


if __name__ == "__main__":
    exit_now(main())
