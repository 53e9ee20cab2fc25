"""The supervise loop: attempt after attempt (attempt.py), each classified by policy/restarts.py, retried
with exponential backoff (tenacity) within max_restarts and the crash-loop guard.

The caller owns the run (state/lock.py) before it builds a Supervisor: nothing here checks for a
second supervisor, since none can exist.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..config.plan import Plan
from ..errors import ApplianceError, CrashLoop, RetriesExhausted, Stopped, TrainingFailed, VolumeFull
from ..policy.restarts import RESOURCE_ERRORS, Verdict, classify
from ..result import metrics
from ..result.curve import CurveDrawer
from ..state.history import earlier_outcomes, is_finished
from ..state.layout import StateDir, write_record
from ..state.records import AttemptOutcome, RunState
from .attempt import Attempt
from .job import Job
from .report import RunResult, artifacts, describe
from .signals import Shutdown, ShutdownRequested
from .spare import WarmPool
from .status import StatusWriter

Echo = Callable[[str], None]


class AttemptFailed(Exception):
    def __init__(self, outcome: AttemptOutcome, verdict: Verdict) -> None:
        super().__init__(f"attempt {outcome.attempt}: {verdict.value}")
        self.outcome = outcome
        self.verdict = verdict


class Supervisor:
    def __init__(
        self, plan: Plan, echo: Echo, shutdown: Shutdown, env: Mapping[str, str] | None = None,
        metrics_port: int | None = None, verbose: bool = False, job: Job | None = None,
    ) -> None:  # fmt: skip
        self.plan = plan
        self.echo = echo
        self.shutdown = shutdown
        self.env = dict(os.environ if env is None else env)
        self.sd = StateDir(plan.output_dir)
        self.status = StatusWriter(self.sd, self.env, echo)
        self.curve = CurveDrawer(self.sd, lambda m: self.say(f"warning: {m}"))
        self.status.on_checkpoint = lambda _step: self.curve.request()
        self.pool = WarmPool(plan, self.sd, self.env, self.say)
        self.history: list[AttemptOutcome] = []
        self.metrics_port = metrics_port
        self.verbose = verbose
        self.job = job
        """A multi-node job this supervisor heads: restarts and budgets count for all its nodes."""

    def _serve_metrics(self) -> object | None:
        if not self.metrics_port:
            return None
        try:
            server = metrics.serve(self.metrics_port, self.status.registry)
        except OSError as exc:  # a port in use must not cost the run
            self.say(f"warning: cannot serve metrics on port {self.metrics_port} ({exc.strerror}); training carries on")
            return None
        self.say(f"metrics: http://0.0.0.0:{self.metrics_port}/metrics")
        return server

    def say(self, msg: str) -> None:
        self.echo(f"[ft] {msg}")

    def run(self) -> RunResult:
        server = self._serve_metrics()
        try:
            result = self._run()
        except ApplianceError as exc:  # the job's other nodes exit the same way
            if self.job is not None:
                state = RunState.STOPPED if isinstance(exc, Stopped) else RunState.FAILED
                self.job.end(state, exc.exit_code, exc.message)
            raise
        else:
            if self.job is not None:
                self.job.end(RunState.FINISHED, 0, f"finished: {result.step}/{result.max_steps} steps")
            return result
        finally:
            self.curve.finish()  # the curve of however the run ended
            if server is not None:
                server.shutdown()

    def _run(self) -> RunResult:
        self.sd.root.mkdir(parents=True, exist_ok=True)
        self.status.refresh()  # the run's history so far, read once; later polls read only what is new
        retry = self.plan.retry
        retrying = Retrying(
            stop=stop_after_attempt(retry.max_restarts + 1),
            wait=wait_exponential(multiplier=retry.backoff_s, max=retry.backoff_max_s),
            retry=retry_if_exception(lambda e: isinstance(e, AttemptFailed) and e.verdict is Verdict.RETRY),
            before_sleep=self._before_restart,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self.attempt_once()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise VolumeFull(self._full_message()) from None
        except AttemptFailed as exc:
            self.status.write(RunState.FAILED, verdict=exc.verdict.value)
            raise self.failure_error(exc) from None
        except ShutdownRequested as exc:
            self.status.write(RunState.STOPPED)
            raise Stopped("stopped during a restart wait; start again to resume", exc.signum) from None
        finally:
            self.pool.close()
        return self.finished()

    def _sleep(self, seconds: float) -> None:
        """The backoff: a stop here, or from another node of the job, ends it."""
        deadline = time.monotonic() + seconds
        while True:
            if self.job is not None and (signum := self.job.stop_signal()):
                raise ShutdownRequested(signum)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.shutdown.sleep(min(left, 0.5))

    def finished(self) -> RunResult:
        self.status.refresh()
        p = self.status.progress()
        self.status.write(RunState.FINISHED)
        restarts, lost = self.status.restarts()
        out = self.plan.output_dir
        step, max_steps = (p.step, p.max_steps) if p else (0, 0)
        return RunResult(RunState.FINISHED, out, step, max_steps, restarts, lost, p, artifacts(out), self.history)

    def attempt_once(self) -> None:
        if self.history and is_finished(self.plan.output_dir):
            return  # never relaunch a finished run: it would train past the end and overwrite results
        if self.job is not None and self.job.server is not None:  # no attempt without every node
            self.job.server.wait_all(self.plan.timeouts.join_s, self.shutdown.check, first=False)
        number = self.sd.new_attempt()
        outcome = Attempt(
            self.plan, self.sd, number, self.status, self.pool, self.shutdown, self.echo, self.env, self.verbose,
            self.job,
        ).run()  # fmt: skip
        earlier = [o for o in earlier_outcomes(self.sd) if o.attempt < outcome.attempt]
        verdict = classify(outcome, earlier, self.plan.retry.crash_loop_limit)
        outcome = replace(outcome, verdict=verdict.value)
        self.history.append(outcome)
        write_record(self.sd.outcome_file(number), outcome)
        if verdict is Verdict.SUCCESS:
            return
        if verdict is Verdict.STOPPED:
            self.status.write(RunState.STOPPED)
            where = (
                f"after saving checkpoint-{outcome.last_step}"
                if outcome.stopped_cleanly
                else "before a checkpoint could be saved; the next start resumes from the last one"
            )
            signum = self.shutdown.signum or (self.job and self.job.stop_signal()) or signal.SIGTERM
            raise Stopped(f"stopped {where}; start again to resume", signum)
        raise AttemptFailed(outcome, verdict)

    def _before_restart(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        if isinstance(exc, AttemptFailed):
            self.say(
                f"attempt {exc.outcome.attempt} failed ({describe(exc.outcome)}); "
                f"restart {state.attempt_number}/{self.plan.retry.max_restarts} in {wait:.0f} s"
            )
        self.status.write(RunState.RESTARTING, next_restart_in_s=wait)

    def _full_message(self) -> str:
        import shutil

        from ..policy.checkpoints import choose_resume
        from ..state.checkpoints import scan

        free = shutil.disk_usage(self.plan.output_dir).free / 2**20
        chosen = choose_resume(scan(self.plan.output_dir))
        resume = f"resumes from {chosen.path.name}" if chosen else "starts from step 0"
        return (
            f"the output volume of {self.plan.output_dir} is full ({free:.0f} MiB free): free space (or lower "
            f"save_total_limit) and start again; nothing was deleted, and the next start {resume}"
        )

    def failure_error(self, exc: AttemptFailed) -> Exception:
        o = exc.outcome
        log = self.sd.output_log(o.attempt)
        if exc.verdict is Verdict.FATAL:
            hint = (
                " (out of GPU memory: lower per_device_train_batch_size or cutoff_len, or use ZeRO-3/QLoRA)"
                if o.failure and o.failure.is_a(RESOURCE_ERRORS)
                else ""
            )
            return TrainingFailed(
                f"training failed: {describe(o)}{hint}; not retried, since the same "
                f"inputs fail the same way (log: {log})"
            )
        if exc.verdict is Verdict.NO_SPACE:
            return VolumeFull(self._full_message())
        if exc.verdict is Verdict.CRASH_LOOP:
            return CrashLoop(
                f"crash loop: {self.plan.retry.crash_loop_limit} attempts in a row failed at "
                f"step {o.start_step} without progress ({describe(o)}); stopped retrying (log: {log})"
            )
        return RetriesExhausted(
            f"training failed {len(self.history)} times, restarts used up (last: {describe(o)}; log: {log})"
        )
