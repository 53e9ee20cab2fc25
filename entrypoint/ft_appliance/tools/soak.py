"""Crash-resume soak: random SIGKILLs of the whole tree (some during checkpoint saves) and SIGTERMs
against one run, then a comparison with an uninterrupted run of the same config and seed.

It drives `ft-appliance train` as separate processes, exactly as a container restart would, and
checks after every event that the next start chose the newest complete checkpoint.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from ..policy.checkpoints import choose_resume, to_set_aside
from ..state import checkpoints
from ..state.files import last_jsonl, read_json
from ..state.history import is_finished
from ..state.layout import StateDir, read_record_or_none
from ..state.records import RunFile
from .procs import for_each_alive, kill_run, training_processes, worker_ranks

# What the soak inflicts: whole-tree SIGKILLs (some timed into a save, and with save_total_limit into a
# rotation), SIGTERMs, SIGKILL of the supervisor alone, a second start on the live run, and a restart
# with a changed config, a SIGSTOPped rank (a hang, which the supervisor itself must kill and resume),
# and a volume that fills up (exit 8 in one line; the next start after space is freed resumes).
# GRACEFUL ones end in a SIGTERM and must lose no step.
FAULTS = (
    "SIGKILL", "SIGKILL-save", "SIGTERM", "SIGKILL-supervisor", "second-start", "config-change", "hang", "disk-full",
)  # fmt: skip
GRACEFUL = ("SIGTERM", "second-start", "hang")
HANG_TIMEOUT_S = 10
FULL_EXIT_WAIT_S = 240


@dataclass
class SoakEvent:
    number: int
    kind: str
    """One of FAULTS."""
    at_step: int
    resumed_from: int | None = None
    expected_resume: int | None = None
    steps_lost: int | None = None
    torn_set_aside: list[str] = field(default_factory=list)
    seconds_to_first_step: float | None = None
    exit_code: int | None = None


@dataclass
class SoakReport:
    events: list[SoakEvent]
    final_step: int
    max_steps: int
    save_steps: int
    max_abs_diff: float | None
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _last_step(output_dir: Path) -> tuple[int, int | None]:
    last = last_jsonl(StateDir(output_dir).steps)
    return (int(last["step"]), last.get("attempt")) if last else (0, None)


def _attempt_count(output_dir: Path) -> int:
    return len(StateDir(output_dir).attempt_numbers())


def _resume_of(output_dir: Path, attempt: int) -> int | None:
    run = read_record_or_none(StateDir(output_dir).run_file(attempt), RunFile)
    return checkpoints.step_of(run.resume_from) if run else None


@contextmanager
def small_volume(path: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of `mib` MiB at `path` for the soaked run, so that the soak can fill it (needs root);
    unmounted at the end, which drops the soaked run's files (the reference run stays)."""
    if os.geteuid() != 0:
        raise PermissionError("the disk-full fault mounts a small tmpfs for the soaked run, which needs root")
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)]
    res = subprocess.run(mount, capture_output=True, text=True)
    if res.returncode != 0:
        raise OSError(f"cannot mount a {mib} MiB tmpfs at {path}: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(volume: Path) -> Path:
    """Write a ballast file until the volume is full (another job, logs, a dataset cache); returns it."""
    ballast = volume / "ballast"
    with open(ballast, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 2**20)
                fh.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return ballast


class SoakRunner:
    def __init__(
        self, config: Path, workdir: Path, nproc: int, seed: int, echo: Callable[[str], None],
        volume: Path | None = None,
    ) -> None:  # fmt: skip
        """volume: where the soaked run lives when it must be fillable (a small file system of its own)."""
        self.config = config
        self.args = yaml.safe_load(config.read_text())
        self.workdir = workdir
        self.nproc = nproc
        self.rng = random.Random(seed)
        self.echo = echo
        self.max_steps = int(self.args["max_steps"])
        self.save_steps = int(self.args.get("save_steps", 500))
        self.volume = volume
        self.out = (volume or workdir) / "soak-run"
        self.log = workdir / "soak-run.log"
        self.failures: list[str] = []
        self.killed_at = 0.0

    def _config_for(self, name: str, **extra: Any) -> Path:
        folder = self.out if name == "soak-run" else self.workdir / name
        args = {**self.args, **extra, "output_dir": str(folder)}
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(args, sort_keys=False))
        return path

    def _start(self, cfg: Path, log: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "ft_appliance", "train", str(cfg), "--nproc", str(self.nproc), "--backoff", "0.5"]
        cmd += ["--hang-timeout", str(HANG_TIMEOUT_S), "--max-restarts", "1000"]  # the soak ends runs, not budgets
        with open(log, "a") as fh:
            return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def reference(self) -> Path:
        cfg = self._config_for("soak-reference")
        out = self.workdir / "soak-reference"
        if not is_finished(out):
            self.echo(f"reference run: {self.max_steps} steps, uninterrupted")
            rc = self._start(cfg, self.workdir / "soak-reference.log").wait()
            if rc != 0:
                raise RuntimeError(f"reference run failed with exit code {rc}: see {self.workdir}/soak-reference.log")
        return out

    def _wait_step(self, out: Path, sup: subprocess.Popen, target: int, attempt: int) -> bool:
        while sup.poll() is None:
            step, att = _last_step(out)
            if att == attempt and step >= target:
                return True
            time.sleep(0.01)
        return False

    def _wait_save_start(self, out: Path, sup: subprocess.Popen, after: int) -> int | None:
        """Block until a checkpoint directory newer than `after` appears; returns its step."""
        nxt = (after // self.save_steps + 1) * self.save_steps
        if nxt >= self.max_steps:
            return None
        path = out / f"checkpoint-{nxt}"
        while sup.poll() is None:
            if path.exists():
                return nxt
            time.sleep(0.005)  # short: the save it waits for lasts well under a second on the demo
        return None

    def run(self, faults: dict[str, int], save_total_limit: int | None = None) -> SoakReport:
        """faults: how many of each kind (FAULTS); save_total_limit puts kills inside rotations."""
        ref = self.reference()
        self.failures = []
        self.cfg = cfg = self._config_for(
            "soak-run", **({"save_total_limit": save_total_limit} if save_total_limit else {})
        )
        kinds = [k for k, n in faults.items() for _ in range(n)]
        self.rng.shuffle(kinds)
        kinds = [("SIGKILL-save" if k == "SIGKILL" and self.rng.random() < 0.4 else k) for k in kinds]
        events: list[SoakEvent] = []
        pending: SoakEvent | None = None
        for number, kind in enumerate([*kinds, "finish"], start=1):
            attempt = _attempt_count(self.out) + 1  # counted before the start: the new supervisor creates it
            sup = self._start(cfg, self.log)
            run_file = StateDir(self.out).run_file(attempt)
            while not run_file.exists() and sup.poll() is None:  # written once the checkpoint is chosen
                time.sleep(0.01)
            if pending is not None:
                self._judge_resume(pending, sup, attempt)
                pending = None
            if kind == "finish":
                rc = sup.wait()
                if rc != 0:
                    self.failures.append(f"final start exited {rc}: see {self.log}")
                break
            event = self._inject(number, kind, sup, attempt, left=len(kinds) - number + 1)
            if event is None:
                break
            if event.kind != "skipped":
                events.append(event)
                pending = event
        return self._final(ref, events)

    def _judge_resume(self, pending: SoakEvent, sup: subprocess.Popen, attempt: int) -> None:
        pending.resumed_from = _resume_of(self.out, attempt)
        if pending.resumed_from != pending.expected_resume:
            self.failures.append(
                f"event {pending.number}: resumed from {pending.resumed_from}, "
                f"expected the newest complete checkpoint {pending.expected_resume}"
            )
        pending.steps_lost = max(0, pending.at_step - (pending.resumed_from or 0))
        if pending.kind not in GRACEFUL and pending.steps_lost > self.save_steps:
            self.failures.append(f"event {pending.number}: lost {pending.steps_lost} steps (> save_steps)")
        if pending.kind in GRACEFUL and pending.steps_lost != 0:
            self.failures.append(f"event {pending.number}: {pending.kind} lost {pending.steps_lost} steps")
        if self._wait_step(self.out, sup, (pending.resumed_from or 0) + 1, attempt):
            pending.seconds_to_first_step = round(time.monotonic() - self.killed_at, 1)

    def _inject(self, number: int, kind: str, sup: subprocess.Popen, attempt: int, left: int) -> SoakEvent | None:
        """One fault; None when the run ended before it could land (a failure is recorded).
        left: the faults still to inject, this one included; each gets at most its share of the
        remaining steps, so that every one of them lands before the run finishes."""
        out = self.out
        current, _ = _last_step(out)
        room = self.max_steps - current
        if room < 3:
            self.echo(f"event {number} ({kind}) skipped: the run is almost done")
            return SoakEvent(number, "skipped", current)
        if kind == "SIGKILL-save" and self._wait_save_start(out, sup, current) is None:
            kind = "SIGKILL"
        if kind != "SIGKILL-save":
            share = (room - 2) // left
            target = current + self.rng.randint(1, max(1, min(share, 2 * self.save_steps)))
            if not self._wait_step(out, sup, target, attempt):
                self.failures.append(f"event {number}: the run ended before step {target}: see {self.log}")
                return None
        event = SoakEvent(number, kind, _last_step(out)[0])
        self.killed_at = time.monotonic()
        self._fault(event, sup, attempt)
        if leftovers := training_processes(out):
            self.failures.append(f"event {number}: {len(leftovers)} training processes left behind")
        found = checkpoints.scan(out)
        event.torn_set_aside = [c.path.name for c in to_set_aside(found)]
        chosen = choose_resume(found)
        event.expected_resume = chosen.step if chosen else None
        self.echo(
            f"event {number}: {kind} at step {event.at_step}; newest complete checkpoint "
            f"{event.expected_resume}; torn {event.torn_set_aside or 'none'}"
        )
        return event

    def _fault(self, event: SoakEvent, sup: subprocess.Popen, attempt: int) -> None:
        """Inflict one fault on the live run and check its own expected outcome."""
        out, n, kind = self.out, event.number, event.kind
        if kind == "hang":
            self._hang(n, sup, attempt)
        if kind == "disk-full":
            self._disk_full(event, sup)
            return
        if kind == "second-start":  # refused in one line while the run trains on, then a graceful stop
            self._expect(n, self._cli("train", str(self.cfg)), 10, "is in use by a live ft-appliance run")
        if kind in GRACEFUL:
            sup.send_signal(signal.SIGTERM)
            event.exit_code = sup.wait(300)
            if event.exit_code != 143:
                self.failures.append(f"event {n}: {kind}: exit code {event.exit_code} after SIGTERM, expected 143")
            event.at_step, _ = _last_step(out)
            return
        if kind == "SIGKILL-supervisor":  # the OOM killer, kill -9 of the entrypoint: its tree must follow
            sup.kill()
            sup.wait()
            deadline = time.monotonic() + 10
            while training_processes(out) and time.monotonic() < deadline:
                time.sleep(0.1)
        else:
            kill_run(sup, out)
        event.exit_code = -9
        if kind == "config-change":  # a restart with another adapter shape: refused, nothing launched
            before = _attempt_count(out)
            rank = int(self.args.get("lora_rank", 8)) * 2
            self._expect(n, self._cli("train", str(self.cfg), f"lora_rank={rank}"), 3, "lora_rank changed from")
            if _attempt_count(out) != before:
                self.failures.append(f"event {n}: the changed config launched an attempt")

    def _hang(self, n: int, sup: subprocess.Popen, attempt: int) -> None:
        """Freeze one rank: the supervisor must call it a hang, kill the tree, and resume the newest
        complete checkpoint in an attempt of its own, which trains."""
        ranks = worker_ranks(self.out, attempt)
        for_each_alive(ranks[:1], psutil.Process.suspend)
        chosen = choose_resume(checkpoints.scan(self.out))
        expected = chosen.step if chosen else None
        deadline = time.monotonic() + HANG_TIMEOUT_S + 120
        while not StateDir(self.out).run_file(attempt + 1).exists() and time.monotonic() < deadline:
            if sup.poll() is not None:
                break
            time.sleep(0.2)
        resumed = _resume_of(self.out, attempt + 1)
        if resumed != expected:
            self.failures.append(f"event {n}: after the hang the supervisor resumed {resumed}, expected {expected}")
        if not self._wait_step(self.out, sup, (resumed or 0) + 1, attempt + 1):
            self.failures.append(f"event {n}: no step after the hang's restart: see {self.log}")

    def _disk_full(self, event: SoakEvent, sup: subprocess.Popen) -> None:
        """Fill the run's volume: the supervisor must end in one line and exit 8, deleting nothing;
        then the space comes back for the next start."""
        assert self.volume is not None, "disk-full needs the soaked run on a volume of its own"
        offset = self.log.stat().st_size
        ballast = fill(self.volume)
        try:
            event.exit_code = sup.wait(FULL_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            event.exit_code = None
            kill_run(sup, self.out)
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        lines = [ln for ln in text.splitlines() if ln.startswith("ft-appliance: ")]
        if event.exit_code != 8 or len(lines) != 1 or "is full" not in lines[0]:
            self.failures.append(f"event {event.number}: disk-full: exit {event.exit_code}, lines {lines[-3:]}")
        if "Traceback" in "".join(ln for ln in text.splitlines() if ln.startswith("[ft]")):
            self.failures.append(f"event {event.number}: disk-full: a traceback among the supervisor's lines")
        ballast.unlink()
        event.at_step, _ = _last_step(self.out)

    def _cli(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "ft_appliance", *args, "--nproc", str(self.nproc)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    def _expect(self, n: int, res: subprocess.CompletedProcess, code: int, needle: str) -> None:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        if res.returncode != code or len(lines) != 1 or needle not in lines[0]:
            got = f"{res.returncode}: {res.stderr[-300:]}"
            self.failures.append(f"event {n}: expected exit {code} and one line with {needle!r}, got {got}")

    def _final(self, ref: Path, events: list[SoakEvent]) -> SoakReport:
        final = read_json(self.out / "trainer_state.json") or {}
        final_step = int(final.get("global_step", 0))
        if final_step != self.max_steps:
            self.failures.append(f"finished at step {final_step}, expected {self.max_steps}")
        diff = _adapter_diff(ref, self.out)
        if diff is None:
            self.failures.append("no final adapter to compare")
        elif diff != 0.0:
            self.failures.append(f"final adapter differs from the uninterrupted run by up to {diff:g}")
        return SoakReport(events, final_step, self.max_steps, self.save_steps, diff, self.failures)


def _adapter_diff(a: Path, b: Path) -> float | None:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (a / "adapter_model.safetensors").exists() else "model.safetensors"
    if not (a / name).exists() or not (b / name).exists():
        return None
    ta, tb = load_file(str(a / name)), load_file(str(b / name))
    if ta.keys() != tb.keys():
        return float("inf")
    return max((float((ta[k].double() - tb[k].double()).abs().max()) for k in ta), default=0.0)


def format_table(report: SoakReport) -> list[str]:
    head = f"{'#':>2}  {'event':<12} {'at step':>7} {'resumed':>7} {'lost':>4} {'to 1st step':>11}  torn set aside"
    lines = [head, "-" * len(head)]
    for e in report.events:
        lines.append(
            f"{e.number:>2}  {e.kind:<12} {e.at_step:>7} {e.resumed_from if e.resumed_from is not None else 0:>7} "
            f"{e.steps_lost if e.steps_lost is not None else '-':>4} "
            f"{(f'{e.seconds_to_first_step:.1f} s') if e.seconds_to_first_step is not None else '-':>11}  "
            f"{', '.join(e.torn_set_aside) or '-'}"
        )
    lines.append(
        f"final step {report.final_step}/{report.max_steps} (save every {report.save_steps}); "
        f"max |adapter - uninterrupted| = {report.max_abs_diff}"
    )
    lines.append("PASS" if report.ok else "FAIL: " + "; ".join(report.failures))
    return lines
