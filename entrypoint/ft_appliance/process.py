"""Start torchrun as its own process tree, stream its output, and stop it without leaving orphans.

torchrun puts every worker in a session of its own, so signalling torchrun's process group does not
reach them. The supervisor therefore signals the workers itself (they save and exit), and when the
grace period runs out it SIGKILLs every process of the tree it recorded, workers first.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import psutil

from .launch import LaunchSpec


class TrainingProcess:
    def __init__(self, spec: LaunchSpec, echo: Callable[[str], None]) -> None:
        spec.attempt_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = spec.attempt_dir / "output.log"
        # Kept open for the life of the attempt; close() flushes and closes it.
        self._log: IO[str] = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
        self.popen = subprocess.Popen(
            spec.argv,
            env=spec.env,
            cwd=spec.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self._known: dict[int, psutil.Process] = {}
        self._echo = echo
        self._switch = threading.Lock()
        self._reader = threading.Thread(target=self._pump, name="torchrun-output", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._switch:
                self._log.write(line)
                self._log.flush()
                self._echo(line.rstrip("\n"))

    def adopt(self, attempt_dir: Path, echo: Callable[[str], None]) -> None:
        """A spare becomes an attempt: its output so far and from now on goes to the attempt's log,
        and is echoed from now on."""
        attempt_dir.mkdir(parents=True, exist_ok=True)
        with self._switch:
            self._log.close()
            earlier = self.log_path.read_text(errors="replace")
            self.log_path = attempt_dir / "output.log"
            self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
            self._log.write(earlier)
            self._log.flush()
            self._echo = echo

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        self._remember_tree()
        return self.popen.poll()

    def _remember_tree(self) -> None:
        """Record descendants while torchrun lives: after it dies, orphans are reparented and
        could no longer be found through it."""
        try:
            root = psutil.Process(self.popen.pid)
            for p in [root, *root.children(recursive=True)]:
                self._known.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def workers(self) -> list[psutil.Process]:
        """torchrun's direct children: the training ranks."""
        try:
            return psutil.Process(self.popen.pid).children(recursive=False)
        except psutil.Error:
            return []

    def _alive(self) -> list[psutil.Process]:
        self._remember_tree()
        alive = []
        for p in self._known.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                continue
        return alive

    def signal_workers(self, sig: int) -> None:
        for p in self.workers():
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def kill_tree(self) -> None:
        """SIGKILL every process of the tree, workers before torchrun, then reap."""
        procs = self._alive()
        for p in sorted(procs, key=lambda p: p.pid == self.popen.pid):
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        self.popen.wait()

    def stop(self, grace_s: float, sig: int = signal.SIGTERM) -> int:
        """Ask the workers to save and exit; SIGKILL what is left when grace_s runs out."""
        deadline = time.monotonic() + grace_s
        self.signal_workers(sig)
        while time.monotonic() < deadline:
            rc = self.wait(min(0.5, deadline - time.monotonic()))
            if rc is not None and not self._alive():
                break
        if self._alive() or self.popen.poll() is None:
            self.kill_tree()
        return self.popen.wait()

    def close(self) -> None:
        """Make sure nothing of the tree outlives us, and flush the log."""
        if self._alive():
            self.kill_tree()
        self._reader.join(timeout=5)
        self._log.close()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_log_tail(path: Path, lines: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []
