"""One attempt: set aside torn checkpoints, resume explicitly from the newest complete one, launch
(or hand the run file to the spare), watch it (progress, beats, hang watchdog, operator stop), and
read back how it ended from the workers' records.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config.plan import Plan
from ..policy.checkpoints import Candidate, choose_resume, to_set_aside
from ..policy.console import message_key, shown
from ..policy.progress import LINE_EVERY_S, format_progress, line_due
from ..policy.timeouts import attempt_timeout, data_key
from ..policy.watch import Limits, decide
from ..state import checkpoints
from ..state.checkpoints import step_of
from ..state.layout import BadRecord, StateDir, append_record, read_record, read_record_or_none, write_record
from ..state.records import (
    AttemptOutcome,
    BeatRecord,
    Completion,
    DataReady,
    Event,
    GoFile,
    LaunchRecord,
    NodeEnd,
    RunFile,
    RunState,
    StopRecord,
    WorkerFailure,
)
from .command import build_launch
from .job import Job
from .process import TrainingProcess, free_port
from .signals import Shutdown
from .spare import WarmPool
from .status import StatusWriter

# Less free space than this on the output volume when an attempt failed: the volume is what failed.
FULL_BELOW_BYTES = 16 * 2**20


class WorkerConsole:
    """What of the training processes' output reaches the console (policy/console.py), each message
    once; with verbose, everything. The attempt's log file gets every line either way."""

    def __init__(self, echo: Callable[[str], None], verbose: bool) -> None:
        self.echo = echo
        self.verbose = verbose
        self.seen: set[str] = set()

    def __call__(self, line: str) -> None:
        if self.verbose:
            self.echo(line)
            return
        if not shown(line) or (key := message_key(line)) in self.seen:
            return
        if len(self.seen) < 10_000:
            self.seen.add(key)
        self.echo(line)


def volume_full(output_dir: os.PathLike) -> bool:
    try:
        return shutil.disk_usage(output_dir).free < FULL_BELOW_BYTES
    except OSError:
        return False


@dataclass
class Attempt:
    plan: Plan
    sd: StateDir
    number: int
    status: StatusWriter
    pool: WarmPool
    shutdown: Shutdown
    echo: Callable[[str], None]
    env: Mapping[str, str]
    verbose: bool = False
    job: Job | None = None
    """A multi-node job: the head writes the run file, every node launches its part of it."""

    def say(self, msg: str) -> None:
        self.echo(f"[ft] {msg}")

    @property
    def node(self) -> int:
        return self.job.node if self.job else 0

    def run(self) -> AttemptOutcome:
        """The head's (or a single node's) attempt: it chooses the checkpoint and writes the run file."""
        chosen = self.choose_checkpoint()
        start_step = chosen.step if chosen is not None else 0
        self.sd.stopped.unlink(missing_ok=True)
        return self._watched(self.launch(chosen), start_step)

    def run_part(self, run: RunFile) -> AttemptOutcome:
        """Node K's part of the head's attempt: the head chose the checkpoint; this node launches."""
        self.status.attempt = self.number
        spec = build_launch(
            self.plan, self.sd.run_file(self.number), self.sd.output_log(self.number, self.node), 0, self.env,
            os.getpid(),
        )  # fmt: skip
        self.say(f"attempt {self.number}: node {self.node} launches {self.plan.nproc} training process(es)")
        self.say(f"full log: {spec.log_path}")
        return self._watched(
            TrainingProcess(spec, WorkerConsole(self.echo, self.verbose)), step_of(run.resume_from) or 0
        )

    def _watched(self, proc: TrainingProcess, start_step: int) -> AttemptOutcome:
        try:
            hung, stop_sig = self.monitor(proc)
        finally:
            proc.close()
        if self.job is not None:
            end = NodeEnd(
                self.node, self.number, proc.returncode if proc.returncode is not None else -1, hung, time.time()
            )
            write_record(self.sd.node_end(self.number, self.node), end)
            if self.job.server is not None:
                self._wait_for_nodes()
        return self.outcome(proc.returncode, start_step, hung, stop_sig)

    def _wait_for_nodes(self) -> None:
        """The head decides only once every connected node's part has ended too."""
        assert self.job is not None
        deadline = time.monotonic() + self.plan.timeouts.stop_grace_s + 30
        while time.monotonic() < deadline:
            ended = {e.node for e in self.job.node_ends(self.number)}
            if not [k for k in self.job.joined() if k not in ended]:
                return
            time.sleep(0.2)
        self.say("warning: a node's part of the attempt did not end in time; deciding without it")

    def choose_checkpoint(self) -> Candidate | None:
        out = self.plan.output_dir
        for doomed in sorted(out.glob(".deleting-checkpoint-*")):  # a rotation a kill interrupted
            shutil.rmtree(doomed, ignore_errors=True)
            self.say(f"finished deleting {doomed.name[len('.deleting-') :]} (rotated out by save_total_limit)")
        found = checkpoints.scan(out)
        for bad in to_set_aside(found):
            moved = checkpoints.set_aside(bad, out)
            self.say(f"set aside {bad.path.name}: {bad.reason} -> {moved.relative_to(out)}")
        chosen = choose_resume(found)
        if chosen is not None:
            self.say(f"attempt {self.number}: resuming from {chosen.path.name} (step {chosen.step})")
        else:
            moved, where = checkpoints.set_aside_leftovers(out)
            if where is not None:
                self.say(
                    f"no resumable checkpoint: set aside what an earlier attempt left ({', '.join(moved)}) "
                    f"-> {where.relative_to(out)}; training again from scratch"
                )
            self.say(f"attempt {self.number}: starting from step 0")
        return chosen

    def launch(self, chosen: Candidate | None) -> TrainingProcess:
        args = dict(self.plan.args)
        if chosen is not None:
            args["resume_from_checkpoint"] = str(chosen.path)
        keep = args.pop("save_total_limit", None)  # the worker rotates, after marking (RunFile)
        args["ddp_timeout"], note = attempt_timeout(args, self._data_cached(args), self.plan.timeouts.startup_s)
        if note:
            self.say(note)
        run_file = self.sd.run_file(self.number)
        run = RunFile(
            args, str(self.sd.root), self.number, list(self.plan.tweaks), int(keep) if keep else None,
            self.job.token if self.job else None, self.plan.autotune, self.plan.background_saves,
        )  # fmt: skip
        write_record(run_file, run)
        self.status.attempt = self.number
        spare = self.pool.take()
        log = self.sd.output_log(self.number)
        console = WorkerConsole(self.echo, self.verbose)
        if spare is not None:
            argv, proc = spare.argv, spare.proc
            proc.adopt(log, console)
            write_record(spare.go_file, GoFile(str(run_file)))
            self.say("launch: on the spare workers, importing since the last attempt")
        else:
            spec = build_launch(self.plan, run_file, log, free_port(), self.env, os.getpid())
            argv, proc = spec.argv, TrainingProcess(spec, console)
            how = "under torchrun" if spec.torchrun else "as one process (no process group needed)"
            self.say(f"launch: {self.plan.nproc} training process(es) {how}")
        self.say(f"full log: {log}" + ("" if self.verbose else " (--verbose streams it here)"))
        if self.verbose:
            self.say("command: " + " ".join(argv))
        cwd = str(self.plan.workdir)
        write_record(self.sd.launch_file(self.number), LaunchRecord(argv, cwd, str(spare.go_file) if spare else None))
        append_record(self.sd.events, Event("launch", self.number, time.time(), {"spare": spare is not None}))
        self.status.write(RunState.TRAINING, resumed_from=chosen.step if chosen else 0)
        return proc

    def monitor(self, proc: TrainingProcess) -> tuple[bool, int]:
        """Wait for the attempt to end; returns (hung, stop signal or 0)."""
        t = self.plan.timeouts
        limits = Limits(t.hang_s, t.startup_s)
        launched = last_progress = time.monotonic()
        last_step: int | None = None
        beat_seq: int | None = None
        last_line, last_text = 0.0, ""
        while proc.poll() is None:
            if self.shutdown.requested:
                self.say(
                    f"stop requested (signal {self.shutdown.signum}): saving a checkpoint, up to {t.stop_grace_s:.0f} s"
                )
                if self.job is not None:  # the other nodes stop with this one (their ranks vote the same step)
                    self.job.request_stop(self.shutdown.signum, self.number)
                self.status.write(RunState.STOPPING)
                proc.stop(t.stop_grace_s, signal.SIGTERM)
                return False, self.shutdown.signum
            if self.job is not None and self._job_ends_part(proc):
                return False, 0
            now = time.monotonic()
            _, new_logs = self.status.refresh()
            step = self.status.last_step_of(self.number)
            if step is not None and step != last_step:
                if last_step is None and self.node == 0:  # the head decides what is cached
                    self._mark_data_ready()
                last_step, last_progress = step, now
                self.pool.maybe_start(self.number)  # after the first step: its imports do not slow this start
            beat = read_record_or_none(self.sd.beat_file(self.number), BeatRecord)
            if beat is not None and beat.seq != beat_seq:
                beat_seq, last_progress = beat.seq, now
            watch = decide(now, launched, last_progress, last_step is not None, limits)
            if watch.hung:
                self.say(
                    f"hang: no progress for {watch.waited_s:.0f} s waiting for {watch.waiting_for} "
                    f"(limit {watch.limit_s:.0f} s); killing the training processes"
                )
                proc.kill_tree()
                return True, 0
            if last_step is not None and (new_logs or now - last_line > LINE_EVERY_S):
                text = self._progress_text()
                if line_due(text, last_text, now - last_line):
                    self.say(text)
                    last_line, last_text = now, text
                self.status.write(RunState.TRAINING)
            self.status.heartbeat()
            self.shutdown.wait(0.5)
        return False, 0

    def _data_cached(self, args: Mapping[str, Any]) -> bool:
        ready = read_record_or_none(self.sd.data_ready, DataReady)
        return ready is not None and ready.key == data_key(args)

    def _mark_data_ready(self) -> None:
        """The first step: tokenisation is over and its result is in the cache."""
        key = data_key(self.plan.args)
        ready = read_record_or_none(self.sd.data_ready, DataReady)
        if ready is None or ready.key != key:
            try:
                write_record(self.sd.data_ready, DataReady(key, self.number, time.time()))
            except OSError:
                pass  # a full volume: the next attempt only waits longer at its barrier

    def _job_ends_part(self, proc: TrainingProcess) -> bool:
        """Another node asked the job to stop (save, then exit), or its part of this attempt failed
        (the collectives are broken: end this part now, for the head's restart)."""
        assert self.job is not None
        others = [r for r in self.job.stop_requests() if r.node != self.node]
        if others:
            self.say(f"node {others[0].node} asked the job to stop: saving a checkpoint")
            self.status.write(RunState.STOPPING)
            proc.stop(self.plan.timeouts.stop_grace_s, signal.SIGTERM)
            return True
        link = self.job.link
        if link is not None and not link.head_alive() and not self.sd.job_end.exists():
            self.say("the head's supervisor is gone: ending this node's part of the attempt")
            proc.kill_tree()
            return True
        failed = [e for e in self.job.node_ends(self.number) if e.node != self.node and e.exit_code != 0]
        if failed:
            e = failed[0]
            self.say(
                f"node {e.node}'s part of attempt {self.number} ended (exit {e.exit_code}): ending this node's too"
            )
            proc.kill_tree()
            return True
        return False

    def _progress_text(self) -> str:
        p = self.status.progress()
        return format_progress(p) if p is not None else ""

    def outcome(self, rc: int | None, start_step: int, hung: bool, stop_sig: int) -> AttemptOutcome:
        self.status.refresh()  # the steps written while the tree stopped
        failures = sorted(self._failures(), key=lambda f: f.time)
        stopped = read_record_or_none(self.sd.stopped, StopRecord)
        completed = read_record_or_none(self.sd.completed, Completion)
        ends = self.job.node_ends(self.number) if self.job else []
        return AttemptOutcome(
            attempt=self.number,
            exit_code=rc if rc is not None else -1,
            start_step=start_step,
            last_step=self.status.last_step_of(self.number),
            failure=failures[0] if failures else None,
            hung=hung or any(e.hung for e in ends),
            stop_requested=bool(stop_sig) or bool(self.job and self.job.stop_requests()),
            stopped_cleanly=bool(stopped and stopped.attempt == self.number and stopped.checkpoint),
            completed=bool(completed and completed.attempt == self.number),
            disk_full=rc != 0 and volume_full(self.plan.output_dir),
        )

    def _failures(self) -> list[WorkerFailure]:
        found = []
        for path in self.sd.failure_files(self.number):
            try:
                rec = read_record(path, WorkerFailure)
            except BadRecord as exc:
                # A rank killed while writing it: the failure is unknown, so it is retried (bounded).
                self.say(f"warning: {exc}; treating the failure as unknown")
                rec = WorkerFailure("UnknownFailure", str(exc), "setup", time=path.stat().st_mtime)
            if rec is not None:
                found.append(rec)
        return found
