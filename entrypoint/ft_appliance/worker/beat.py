"""A rank's watchdog thread.

On global rank 0 it writes a beat (attempts/N/beat.json) once a second while the main loop is busy
outside a training step: loading and tokenising before the first step, evaluating, saving, the final
save. The supervisor counts those as progress, so only a real hang is killed. During training steps
it stays silent: the step records are the heartbeat then, and a stuck step must stay visible.

On every rank it also checks that torchrun and the supervisor are still there, a fallback to the
death signal set in main(): a rank never trains on for a supervisor that is gone.
"""

from __future__ import annotations

import os
import threading
import time

from ..state.layout import write_record
from ..state.records import BeatRecord

QUIET_PHASES = frozenset({"train"})


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Beat:
    def __init__(self, path: os.PathLike | None, attempt: int, supervisor_pid: int, interval_s: float = 1.0) -> None:
        self.path = path
        """None on ranks other than global rank 0: they only watch their parents."""
        self.attempt = attempt
        self.supervisor_pid = supervisor_pid
        self.interval_s = interval_s
        self.parent = os.getppid()
        self.phase = "setup"
        self.step: int | None = None
        self.seq = 0
        self._thread = threading.Thread(target=self._run, name="ft-beat", daemon=True)

    def start(self) -> Beat:
        self._thread.start()
        return self

    def enter(self, phase: str, step: int | None = None) -> None:
        """Plain attribute writes: the thread reads them; no lock needed for a single reader."""
        self.phase, self.step = phase, step

    def _run(self) -> None:
        while True:
            if os.getppid() != self.parent or (self.supervisor_pid > 0 and not pid_alive(self.supervisor_pid)):
                os._exit(137)  # orphaned: the run's owner is gone, so is this rank's reason to be
            if self.path is not None and self.phase not in QUIET_PHASES:
                self.seq += 1
                try:
                    write_record(self.path, BeatRecord(self.attempt, self.seq, self.phase, time.time(), self.step))
                except OSError:
                    pass  # a full volume: the save itself reports it
            time.sleep(self.interval_s)
