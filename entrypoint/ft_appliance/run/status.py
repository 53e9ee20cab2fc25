"""The supervisor's view of its run: progress read incrementally from the workers' records,
status.json for `status` and the soak, the metrics textfile made from that same record, and the
heartbeat (.ft/heartbeat.json, and FT_HEARTBEAT_FILE for the container's HEALTHCHECK).

Every write here is guarded: a full or failing volume is reported once and training carries on (the
workers' own save reports the real failure), instead of a status file killing the supervisor.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..policy.autotune import describe
from ..policy.progress import ProgressTracker, restart_history
from ..result import metrics
from ..state.checkpoints import step_of
from ..state.files import JsonlTail
from ..state.layout import StateDir, parse_records, read_record_or_none, write_record
from ..state.records import (
    AutotuneDecision,
    Event,
    Heartbeat,
    LogRecord,
    Progress,
    Record,
    RunFile,
    RunState,
    StatusRecord,
    StepRecord,
)

HEARTBEAT_EVERY_S = 5.0


def autotune_line(data: Mapping[str, Any]) -> str:
    try:
        return describe(AutotuneDecision.from_dict(dict(data)), str(data.get("source", "")))
    except ValueError as exc:
        return f"autotune: unreadable event ({exc})"


class StatusWriter:
    def __init__(self, sd: StateDir, env: Mapping[str, str], echo: Callable[[str], None], shared: bool = True) -> None:
        """shared=False: another node of a multi-node job, which reads the run's records but leaves the
        run's own files (status, heartbeat, metrics) to the head; its FT_HEARTBEAT_FILE is its own."""
        self.sd = sd
        self.echo = echo
        self.shared = shared
        beat = env.get("FT_HEARTBEAT_FILE")
        self.heartbeat_paths = [*([sd.heartbeat] if shared else []), *([Path(beat)] if beat else [])]
        textfile = env.get("FT_METRICS_TEXTFILE")  # a node exporter's textfile directory, say
        self.metrics_paths = [*([sd.metrics] if shared else []), *([Path(textfile)] if textfile else [])]
        self.last: StatusRecord | None = None
        """The record last written: what the metrics endpoint serves."""
        self.registry = metrics.registry_for(lambda: self.last)
        self.tracker = ProgressTracker()
        self._steps = JsonlTail(sd.steps)
        self._logs = JsonlTail(sd.log)
        self._events = JsonlTail(sd.events)
        self.last_checkpoint: tuple[int, float] | None = None
        self.on_checkpoint: Callable[[int], None] | None = None
        self._resumed: dict[int, int] = {}
        self.state = RunState.STARTING
        self.attempt: int | None = None
        self._beat_at = 0.0
        self._failed_writes: set[str] = set()

    def refresh(self) -> tuple[int, int]:
        """Read what the workers appended since the last call: (new step records, new log records)."""
        steps = parse_records(self._steps.read_new(), StepRecord)
        logs = parse_records(self._logs.read_new(), LogRecord)
        self.tracker.add_steps(steps)
        self.tracker.add_logs(logs)
        events = parse_records(self._events.read_new(), Event)
        for e in events:
            # A decision read from the cache was printed before the launch; a measured one is news.
            if e.event == "autotune" and e.data.get("source") != "cache":
                self.echo(f"[ft] {autotune_line(e.data)}")
        saves = [e for e in events if e.event == "save" and "step" in e.data]
        if saves:
            self.last_checkpoint = (int(saves[-1].data["step"]), saves[-1].time)
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.last_checkpoint[0])
        return len(steps), len(logs)

    def progress(self) -> Progress | None:
        return self.tracker.progress()

    def last_step_of(self, attempt: int) -> int | None:
        return self.tracker.last_step_by_attempt.get(attempt)

    def restarts(self) -> tuple[int, list[int]]:
        """From the files, so that a restart by a new container counts like one of this supervisor's."""
        attempts = self.sd.attempt_numbers()
        for n in attempts:
            if n not in self._resumed:
                run = read_record_or_none(self.sd.run_file(n), RunFile)
                if run is not None:  # an attempt still choosing its checkpoint is asked again later
                    self._resumed[n] = step_of(run.resume_from) or 0
        return restart_history(attempts, self.tracker.last_step_by_attempt, self._resumed)

    def write(self, state: RunState, **extra: Any) -> None:
        self.state = state
        restarts, lost = self.restarts()
        record = StatusRecord(
            state=state,
            output_dir=str(self.sd.output_dir),
            pid=os.getpid(),
            host=socket.gethostname(),
            attempt=self.attempt,
            restarts=restarts,
            steps_lost=lost,
            progress=self.progress(),
            updated=time.time(),
            last_checkpoint=self.last_checkpoint[0] if self.last_checkpoint else None,
            last_checkpoint_time=self.last_checkpoint[1] if self.last_checkpoint else None,
            **extra,
        )
        self.last = record
        if self.shared:
            self._guarded(self.sd.status, record)
        for path in self.metrics_paths:
            self._guarded_io(path, lambda p: metrics.write_textfile(p, self.registry))
        self.heartbeat(force=True)

    def heartbeat(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._beat_at < HEARTBEAT_EVERY_S:
            return
        self._beat_at = now
        beat = Heartbeat(self.state, now, self.tracker.step, str(self.sd.output_dir), os.getpid())
        for path in self.heartbeat_paths:
            self._guarded(path, beat)

    def _guarded(self, path: Path, record: Record) -> None:
        self._guarded_io(path, lambda p: write_record(p, record))

    def _guarded_io(self, path: Path, write: Callable[[Path], None]) -> None:
        try:
            write(path)
        except OSError as exc:
            if path.name not in self._failed_writes:
                self._failed_writes.add(path.name)
                self.echo(f"[ft] warning: cannot write {path} ({exc.strerror or exc}); training carries on")
