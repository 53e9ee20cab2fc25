"""Operator stops (SIGTERM, SIGINT, SIGHUP) for the supervisor.

The handler only records the signal number and writes one byte to a pipe: it takes no lock (a
threading.Event would, and a signal landing while the main thread holds that lock inside wait()
deadlocks the handler). Waits select() on the pipe, so a stop ends any sleep at once.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ShutdownRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class Shutdown:
    def __init__(self) -> None:
        self.signum = 0
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)

    def __call__(self, signum: int, _frame: Any = None) -> None:
        self.signum = self.signum or signum
        try:
            os.write(self._w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: a wake-up is already pending

    def install(self) -> None:
        """Handlers go on the main thread only (Python delivers signals there)."""
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                signal.signal(sig, self)

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as a stop is requested."""
        if self.requested:
            return True
        deadline = time.monotonic() + max(0.0, seconds)
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self._r], [], [], left)
        return True

    def sleep(self, seconds: float) -> None:
        """tenacity's sleep: a stop request during a backoff ends the wait with ShutdownRequested."""
        if self.wait(seconds):
            raise ShutdownRequested(self.signum)

    def check(self) -> None:
        """Between setup steps (preflight, autotune): stop before launching anything more."""
        if self.requested:
            raise ShutdownRequested(self.signum)
