"""The supervise loop: pick a trusted checkpoint, launch torchrun, watch it, decide, repeat.

Each attempt: set aside torn checkpoints -> resume explicitly from the newest complete one ->
launch -> monitor (progress, hang watchdog, operator stop) -> classify the outcome (policy.py) ->
done, or retry with exponential backoff (tenacity), bounded by max_restarts and the crash-loop guard.

Once an attempt trains, a spare set of workers imports the stack and waits (worker.wait_for_go); a
restart hands it the next attempt's run file instead of launching and importing everything again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from . import checkpoints, policy, statefiles
from .config import Plan
from .errors import CrashLoop, RetriesExhausted, Stopped, TrainingFailed
from .launch import LaunchSpec, build_launch, build_spare, spare_allowed
from .policy import AttemptOutcome, Verdict, WorkerFailure
from .process import TrainingProcess, free_port
from .status import Progress, format_progress, progress, steps_lost

Echo = Callable[[str], None]


class ShutdownRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class Shutdown:
    """Signal handlers only record the signal; the loop acts on it at its next poll."""

    def __init__(self) -> None:
        self.signum = 0
        self._event = threading.Event()

    def __call__(self, signum: int, _frame: Any = None) -> None:
        self.signum = self.signum or signum
        self._event.set()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def sleep(self, seconds: float) -> None:
        """tenacity's sleep: a stop request during backoff ends the wait at once."""
        if self._event.wait(seconds):
            raise ShutdownRequested(self.signum)


class AttemptFailed(Exception):
    def __init__(self, outcome: AttemptOutcome, verdict: Verdict) -> None:
        super().__init__(f"attempt {outcome.attempt}: {verdict.value}")
        self.outcome = outcome
        self.verdict = verdict


@dataclass
class Spare:
    proc: TrainingProcess
    spec: LaunchSpec
    go_file: Path


@dataclass
class RunResult:
    state: str
    """"finished" or "already_finished"."""
    output_dir: Path
    step: int = 0
    max_steps: int = 0
    restarts: int = 0
    steps_lost: list[int] = field(default_factory=list)
    progress: Progress | None = None
    artifacts: list[str] = field(default_factory=list)
    attempts: list[AttemptOutcome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        return d


ARTIFACT_NAMES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "all_results.json",
    "train_results.json",
    "trainer_log.jsonl",
)


def is_finished(output_dir: Path) -> bool:
    """Finished by the appliance (marker), or by plain LlamaFactory (its final results file)."""
    if (statefiles.state_dir(output_dir) / statefiles.COMPLETED).exists():
        return True
    results = statefiles.read_json(output_dir / "all_results.json")
    return isinstance(results, dict) and "train_runtime" in results


def artifacts(output_dir: Path) -> list[str]:
    return [str(output_dir / n) for n in ARTIFACT_NAMES if (output_dir / n).exists()]


def _next_number(folder: Path) -> int:
    numbers = [int(p.name) for p in folder.glob("*") if p.name.isdigit()]
    return max(numbers, default=0) + 1


def _next_attempt_number(sd: Path) -> int:
    return _next_number(sd / "attempts")


class Supervisor:
    def __init__(self, plan: Plan, echo: Echo, shutdown: Shutdown, env: dict[str, str] | None = None) -> None:
        self.plan = plan
        self.echo = echo
        self.shutdown = shutdown
        self.env = dict(os.environ if env is None else env)
        self.out = plan.output_dir
        self.sd = statefiles.state_dir(plan.output_dir)
        self.history: list[AttemptOutcome] = []
        self.spare: Spare | None = None
        self.spare_for = 0
        """The attempt that last started a spare: one spare per attempt, even if it dies."""

    # --- status -------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        self.echo(f"[ft] {msg}")

    def write_status(self, state: str, **extra: Any) -> None:
        p = self.current_progress()
        restarts, lost = restart_history(self.sd)
        self.beat(state, p.step if p else None)
        statefiles.write_json(
            self.sd / statefiles.STATUS,
            {
                "state": state,
                "output_dir": str(self.out),
                "pid": os.getpid(),
                "attempt": self.history[-1].attempt if self.history else None,
                "restarts": restarts,
                "steps_lost": lost,
                "progress": p.to_dict() if p else None,
                "updated": time.time(),
                **extra,
            },
        )

    def beat(self, state: str | None = None, step: int | None = None) -> None:
        """The container's heartbeat (FT_HEARTBEAT_FILE): the supervisor is alive and in `state`."""
        if state is not None:
            self._beat_state = state
        if step is not None:
            self._beat_step = step
        path = self.env.get("FT_HEARTBEAT_FILE")
        if not path:
            return
        now = time.time()
        if state is None and now - getattr(self, "_beat_at", 0.0) < 5:
            return
        self._beat_at = now
        try:
            statefiles.write_json(
                Path(path),
                {
                    "state": getattr(self, "_beat_state", "starting"),
                    "step": getattr(self, "_beat_step", None),
                    "output_dir": str(self.out),
                    "pid": os.getpid(),
                    "time": now,
                },
            )
        except OSError:
            pass

    def current_progress(self) -> Progress | None:
        return progress(
            statefiles.read_jsonl(self.sd / statefiles.STEPS), statefiles.read_jsonl(self.sd / statefiles.LOG)
        )

    # --- one attempt ----------------------------------------------------------------------------
    def choose_checkpoint(self) -> checkpoints.Candidate | None:
        found = checkpoints.scan(self.out)
        for bad in policy.to_set_aside(found):
            moved = checkpoints.set_aside(bad, self.out)
            self.say(f"set aside {bad.path.name}: {bad.reason} -> {moved.relative_to(self.out)}")
        chosen = policy.choose_resume(found)
        return chosen

    def run_attempt(self) -> AttemptOutcome:
        number = _next_attempt_number(self.sd)
        attempt_dir = self.sd / "attempts" / str(number)
        attempt_dir.mkdir(parents=True, exist_ok=True)
        chosen = self.choose_checkpoint()
        args = dict(self.plan.args)
        if chosen is not None:
            args["resume_from_checkpoint"] = str(chosen.path)
            self.say(f"attempt {number}: resuming from {chosen.path.name} (step {chosen.step})")
        else:
            self.say(f"attempt {number}: starting from step 0")
        start_step = chosen.step if chosen is not None else 0
        (self.sd / statefiles.STOPPED).unlink(missing_ok=True)
        run_file = attempt_dir / "run.json"
        statefiles.write_json(
            run_file, {"args": args, "state_dir": str(self.sd), "attempt": number, "tweaks": list(self.plan.tweaks)}
        )
        spare = self.take_spare()
        spec = spare.spec if spare else build_launch(self.plan, number, run_file, attempt_dir, free_port(), self.env)
        statefiles.write_json(
            attempt_dir / "launch.json",
            {"argv": spec.argv, "cwd": str(spec.cwd), "spare": str(spare.go_file) if spare else None},
        )
        self.say(
            ("launch: on the spare workers, importing since the last attempt: " if spare else "launch: ")
            + " ".join(spec.argv)
        )
        self.write_status("training", resumed_from=start_step)

        statefiles.append_jsonl(
            self.sd / statefiles.EVENTS,
            {
                "event": "launch",
                "attempt": number,
                "spare": bool(spare),
                "time": time.time(),
                "cli_start": _process_start(),
            },
        )
        if spare:
            proc = spare.proc
            proc.adopt(attempt_dir, self.echo)
            statefiles.write_json(spare.go_file, {"run_file": str(run_file)})
        else:
            proc = TrainingProcess(spec, self.echo)
        try:
            hung, stop_sig = self.monitor(proc, number)
        finally:
            proc.close()
        return self.outcome(number, proc.popen.returncode, start_step, hung, stop_sig)

    def monitor(self, proc: TrainingProcess, number: int) -> tuple[bool, int]:
        """Wait for the attempt to end; returns (hung, stop signal or 0)."""
        t = self.plan.timeouts
        launched = time.monotonic()
        last_step_seen: int | None = None
        last_step_at = launched
        seen_logs = 0
        last_line_at = 0.0
        steps_path = self.sd / statefiles.STEPS
        while proc.poll() is None:
            if self.shutdown.requested:
                self.say(
                    f"stop requested (signal {self.shutdown.signum}): saving a checkpoint, up to {t.stop_grace_s:.0f} s"
                )
                self.write_status("stopping")
                proc.stop(t.stop_grace_s, signal.SIGTERM)
                return False, self.shutdown.signum
            last = statefiles.last_jsonl(steps_path)
            now = time.monotonic()
            if last and last.get("attempt") == number and last.get("step") != last_step_seen:
                last_step_seen = last.get("step")
                last_step_at = now
                self.start_spare(number)  # after the first step: its imports do not slow this start
            limit, what = (t.hang_s, "a step") if last_step_seen is not None else (t.startup_s, "the first step")
            if now - last_step_at > limit:
                self.say(
                    f"hang: no progress for {now - last_step_at:.0f} s waiting for {what} "
                    f"(limit {limit:.0f} s); killing the training processes"
                )
                proc.kill_tree()
                return True, 0
            log_size = _size(self.sd / statefiles.LOG)
            if log_size != seen_logs or (last_step_seen is not None and now - last_line_at > 30):
                seen_logs = log_size
                p = self.current_progress()
                if p is not None and last_step_seen is not None:
                    self.say(format_progress(p))
                    last_line_at = now
                    self.write_status("training")
            self.beat(step=last_step_seen)
            proc.wait(0.5)
        return False, 0

    def outcome(self, number: int, rc: int | None, start_step: int, hung: bool, stop_sig: int) -> AttemptOutcome:
        attempt_dir = self.sd / "attempts" / str(number)
        steps = [r for r in statefiles.read_jsonl(self.sd / statefiles.STEPS) if r.get("attempt") == number]
        failures = []
        for path in sorted(attempt_dir.glob("failure-rank*.json")):
            rec = statefiles.read_json(path)
            if rec:
                failures.append(rec)
        failures.sort(key=lambda r: r.get("time", 0))
        first = failures[0] if failures else None
        stopped = statefiles.read_json(self.sd / statefiles.STOPPED)
        completed = statefiles.read_json(self.sd / statefiles.COMPLETED)
        return AttemptOutcome(
            attempt=number,
            exit_code=rc if rc is not None else -1,
            start_step=start_step,
            last_step=int(steps[-1]["step"]) if steps else None,
            failure=WorkerFailure(
                first["type"], first["message"], first["phase"], first.get("rank", 0), tuple(first.get("kinds", ()))
            )
            if first
            else None,
            hung=hung,
            stop_requested=bool(stop_sig),
            stopped_cleanly=bool(stopped and stopped.get("attempt") == number),
            completed=bool(completed and completed.get("attempt") == number),
        )

    # --- the spare --------------------------------------------------------------------------------
    def start_spare(self, attempt: int) -> None:
        if self.spare is not None or self.spare_for >= attempt or not spare_allowed(self.plan):
            return
        self.spare_for = attempt
        spare_dir = self.sd / "spares" / str(_next_number(self.sd / "spares"))
        go_file = spare_dir / "go.json"
        spec = build_spare(self.plan, go_file, spare_dir, free_port(), self.env, os.getpid())
        # Quiet until adopted: its import warnings belong to the attempt it becomes, not this one.
        self.spare = Spare(TrainingProcess(spec, lambda _line: None), spec, go_file)

    def take_spare(self) -> Spare | None:
        spare, self.spare = self.spare, None
        if spare is not None and spare.proc.poll() is not None:
            self.say(f"spare workers exited (code {spare.proc.popen.returncode}); launching afresh")
            spare.proc.close()
            return None
        return spare

    def discard_spare(self) -> None:
        if self.spare is not None:
            self.spare.proc.close()
            self.spare = None

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        if is_finished(self.out):
            self.say(
                f"{self.out} holds a finished run: nothing to do (results kept as they are; "
                f"to train again, choose a new output_dir)"
            )
            return RunResult("already_finished", self.out, artifacts=artifacts(self.out))
        self.sd.mkdir(parents=True, exist_ok=True)
        for note in self.plan.notes:
            self.say(note)
        retrying = Retrying(
            stop=stop_after_attempt(self.plan.retry.max_restarts + 1),
            wait=wait_exponential(multiplier=self.plan.retry.backoff_s, max=self.plan.retry.backoff_max_s),
            retry=retry_if_exception(lambda e: isinstance(e, AttemptFailed) and e.verdict is Verdict.RETRY),
            before_sleep=self._before_restart,
            sleep=self.shutdown.sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self.attempt_once()
        except AttemptFailed as exc:
            self.write_status("failed", verdict=exc.verdict.value)
            raise self.failure_error(exc) from None
        except ShutdownRequested as exc:
            self.write_status("stopped")
            raise Stopped("stopped during a restart wait; start again to resume", exc.signum) from None
        finally:
            self.discard_spare()
        p = self.current_progress()
        self.write_status("finished")
        restarts, lost = restart_history(self.sd)
        return RunResult(
            "finished",
            self.out,
            step=p.step if p else 0,
            max_steps=p.max_steps if p else 0,
            restarts=restarts,
            steps_lost=lost,
            progress=p,
            artifacts=artifacts(self.out),
            attempts=self.history,
        )

    def earlier_outcomes(self) -> list[AttemptOutcome]:
        """Attempts of this run by earlier supervisors (container restarts) and by this one, in order:
        a crash loop is a crash loop whichever process saw its attempts."""
        found = []
        for path in (self.sd / "attempts").glob("*/outcome.json"):
            data = statefiles.read_json(path)
            try:
                found.append(policy.outcome_from_dict(data))
            except (KeyError, TypeError, ValueError):
                continue
        return sorted(found, key=lambda o: o.attempt)

    def attempt_once(self) -> None:
        if self.history and is_finished(self.out):
            return  # never relaunch a finished run: it would train past the end and overwrite results
        outcome = self.run_attempt()
        earlier = [o for o in self.earlier_outcomes() if o.attempt < outcome.attempt]
        verdict = policy.classify(outcome, earlier, self.plan.retry.crash_loop_limit)
        self.history.append(outcome)
        statefiles.write_json(
            self.sd / "attempts" / str(outcome.attempt) / "outcome.json", {**asdict(outcome), "verdict": verdict.value}
        )
        if verdict is Verdict.SUCCESS:
            return
        if verdict is Verdict.STOPPED:
            self.write_status("stopped")
            where = (
                f"after saving checkpoint-{outcome.last_step}"
                if outcome.stopped_cleanly
                else "before a checkpoint could be saved; the next start resumes from the last one"
            )
            raise Stopped(f"stopped {where}; start again to resume", self.shutdown.signum)
        raise AttemptFailed(outcome, verdict)

    def _before_restart(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        if isinstance(exc, AttemptFailed):
            self.say(
                f"attempt {exc.outcome.attempt} failed ({describe(exc.outcome)}); "
                f"restart {state.attempt_number}/{self.plan.retry.max_restarts} in {wait:.0f} s"
            )
        self.write_status("restarting", next_restart_in_s=wait)

    def failure_error(self, exc: AttemptFailed) -> Exception:
        o = exc.outcome
        log = self.sd / "attempts" / str(o.attempt) / "output.log"
        if exc.verdict is Verdict.FATAL:
            hint = (
                " (out of GPU memory: lower per_device_train_batch_size or cutoff_len, or use ZeRO-3/QLoRA)"
                if o.failure and o.failure.type in policy.RESOURCE_ERRORS
                else ""
            )
            return TrainingFailed(
                f"training failed: {describe(o)}{hint}; not retried, since the same "
                f"inputs fail the same way (log: {log})"
            )
        if exc.verdict is Verdict.CRASH_LOOP:
            return CrashLoop(
                f"crash loop: {self.plan.retry.crash_loop_limit} attempts in a row failed at "
                f"step {o.start_step} without progress ({describe(o)}); stopped retrying (log: {log})"
            )
        return RetriesExhausted(
            f"training failed {len(self.history)} times, restarts used up (last: {describe(o)}; log: {log})"
        )


def restart_history(sd: Path) -> tuple[int, list[int]]:
    """Restarts of this run and the steps each one lost, from the files: counted the same whether the
    restart was this supervisor's or a new container's."""
    attempts = sorted(int(p.name) for p in (sd / "attempts").glob("*") if p.name.isdigit())
    last_step: dict[int, int] = {}
    for rec in statefiles.read_jsonl(sd / statefiles.STEPS):
        last_step[int(rec.get("attempt", 0))] = int(rec["step"])
    lost = []
    for prev, cur in zip(attempts, attempts[1:], strict=False):
        run = statefiles.read_json(sd / "attempts" / str(cur) / "run.json") or {}
        ckpt = Path(str(run.get("args", {}).get("resume_from_checkpoint") or ""))
        m = checkpoints.CHECKPOINT_RE.match(ckpt.name)
        lost.append(steps_lost(last_step.get(prev), int(m.group(1)) if m else 0))
    return max(0, len(attempts) - 1), lost


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _process_start() -> float | None:
    import psutil

    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return None


def describe(o: AttemptOutcome) -> str:
    if o.hung:
        return f"hung after step {o.last_step}" if o.last_step is not None else "hung before the first step"
    where = f"after step {o.last_step}" if o.last_step is not None else "before the first step"
    if o.failure:
        return f"{o.failure.type}: {o.failure.message} on rank {o.failure.rank}, {where}"
    if o.exit_code < 0:
        return f"killed by signal {-o.exit_code}, {where}"
    return f"exit code {o.exit_code}, {where}"


def summary_lines(result: RunResult) -> list[str]:
    if result.state == "already_finished":
        return [f"already finished: {result.output_dir}", *[f"  {a}" for a in result.artifacts]]
    p = result.progress
    lines = [f"finished: {result.step}/{result.max_steps} steps in {result.output_dir}"]
    if p is not None:
        first = f"{p.first_loss:.4f}" if p.first_loss is not None else "-"
        last = f"{p.loss:.4f}" if p.loss is not None else "-"
        lines.append(
            f"  loss {first} -> {last}; {p.tokens:,} tokens at {p.tokens_per_s:,.0f} tok/s "
            f"({p.seconds_per_step:.2f} s/step)"
        )
    lines.append(
        f"  restarts {result.restarts}; steps lost {sum(result.steps_lost)} {result.steps_lost or ''}".rstrip()
    )
    lines += [f"  {a}" for a in result.artifacts]
    return lines


def load_status(output_dir: Path) -> dict[str, Any] | None:
    return statefiles.read_json(statefiles.state_dir(output_dir) / statefiles.STATUS)
