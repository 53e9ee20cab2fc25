"""Node K > 0 of a multi-node job: it owns nothing but its slot. It launches its part of each attempt
the head writes, ends it when another node's part fails or the job is asked to stop, and exits the
way the head's JobEnd says. When the head's supervisor goes away it waits for a new head.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

from ..config.plan import Plan
from ..errors import ApplianceError, Stopped
from ..state.layout import StateDir, read_record_or_none
from ..state.records import JobEnd, RunFile, RunState
from .attempt import Attempt
from .job import Job
from .report import RunResult, artifacts
from .signals import Shutdown
from .spare import WarmPool
from .status import StatusWriter

Echo = Callable[[str], None]


class HeadEnded(ApplianceError):
    """The head ended the job with an error: this node exits with the head's code and reason."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Follower:
    def __init__(
        self, plan: Plan, join: Callable[[], Job], echo: Echo, shutdown: Shutdown, env: Mapping[str, str] | None = None,
        verbose: bool = False,
    ) -> None:  # fmt: skip
        self.plan = plan
        self.join = join
        self.echo = echo
        self.shutdown = shutdown
        self.env = dict(os.environ if env is None else env)
        self.sd = StateDir(plan.output_dir)
        self.status = StatusWriter(self.sd, self.env, echo, shared=False)
        self.verbose = verbose
        self.node = plan.topology.node_rank

    def say(self, msg: str) -> None:
        self.echo(f"[ft] {msg}")

    def run(self) -> RunResult:
        self.status.refresh()
        job = self.join()
        try:
            done = 0
            while True:
                nxt = self._next(job, done)
                if isinstance(nxt, JobEnd):
                    return self._ended(nxt)
                if nxt is None:
                    job.close()
                    self.say("the head's supervisor is gone: waiting for a new head to rejoin the job")
                    job, done = self.join(), 0
                    continue
                number, run = nxt
                pool = WarmPool(self.plan, self.sd, self.env, self.say)  # never started: no spare across nodes
                Attempt(
                    self.plan, self.sd, number, self.status, pool, self.shutdown, self.echo, self.env, self.verbose, job
                ).run_part(run)  # fmt: skip
                done = number
        finally:
            job.close()

    def _next(self, job: Job, done: int) -> tuple[int, RunFile] | JobEnd | None:
        """The head's next attempt for this node, its end of the job, or None when the head is gone."""
        while True:
            if self.shutdown.requested:
                job.request_stop(self.shutdown.signum, None)
                raise Stopped(
                    "stopped: the job stops with this node; start every node again to resume", self.shutdown.signum
                )
            end = read_record_or_none(self.sd.job_end, JobEnd)
            if end is not None and end.job == job.token:
                return end
            for n in reversed(self.sd.attempt_numbers()):
                if n <= done:
                    break
                run = read_record_or_none(self.sd.run_file(n), RunFile)
                over = self.sd.node_end(n, 0).exists() or self.sd.node_end(n, self.node).exists()
                if run is not None and run.job == job.token and not over:
                    return n, run
            if job.link is not None and not job.link.head_alive():
                return None
            self.status.heartbeat()
            self.shutdown.wait(0.2)

    def _ended(self, end: JobEnd) -> RunResult:
        if end.state is RunState.STOPPED:
            raise Stopped(f"the head stopped the job: {end.message}", max(end.exit_code - 128, 1))
        if end.state is not RunState.FINISHED:
            raise HeadEnded(f"the head ended the job: {end.message}", end.exit_code)
        self.status.refresh()
        p = self.status.progress()
        restarts, lost = self.status.restarts()
        step, max_steps = (p.step, p.max_steps) if p else (0, 0)
        self.say(f"the head finished the job ({end.message}) {time.time() - end.time:.0f} s ago")
        out = self.plan.output_dir
        return RunResult(RunState.FINISHED, out, step, max_steps, restarts, lost, p, artifacts(out), [])
