"""Start torchrun as its own process tree, stream its output, and stop it without leaving orphans.

The tree dies with its supervisor: torchrun is started with PR_SET_PDEATHSIG=SIGKILL, and each
worker sets the same against torchrun (worker/main.py), so a supervisor killed by anything (the OOM
killer, `kill -9`, a crash) takes torchrun and then every rank with it, inside Docker or not.

torchrun puts every worker in a session of its own, so signalling torchrun's process group does not
reach them. A stop therefore signals the workers themselves (they save and exit), re-signalling any
that torchrun starts during the grace period (a stop right after launch), and SIGKILLs every process
of the tree it recorded when the one deadline runs out, workers first.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import psutil

from .command import LaunchSpec

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # resolved before fork: the child must not load libraries


def _die_with(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would kill us
            os._exit(1)

    return preexec


class TrainingProcess:
    def __init__(self, spec: LaunchSpec, echo: Callable[[str], None]) -> None:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = spec.log_path
        # Kept open for the life of the tree; the output thread closes it at the end of the output.
        self._log: IO[str] = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
        self.popen = subprocess.Popen(
            spec.argv,
            env=spec.env,
            cwd=spec.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),  # noqa: PLW1509 - only prctl and getppid run in the child
            text=True,
            errors="replace",
            bufsize=1,
        )
        self._known: dict[int, psutil.Process] = {}
        self.torchrun = spec.torchrun
        self._echo = echo
        self._switch = threading.Lock()
        self._reader = threading.Thread(target=self._pump, name="torchrun-output", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._switch:
                try:
                    self._log.write(line)
                    self._log.flush()
                except (OSError, ValueError):
                    pass  # a full volume (or a log closed under it): the console still gets the line
                self._echo(line.rstrip("\n"))
        with self._switch, contextlib.suppress(OSError):
            self._log.close()

    def adopt(self, log_path: Path, echo: Callable[[str], None]) -> None:
        """A spare becomes an attempt: its output so far and from now on goes to the attempt's log,
        and is echoed from now on."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._switch:
            self._log.close()
            earlier = self.log_path.read_text(errors="replace")
            self.log_path = log_path
            self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
            self._log.write(earlier)
            self._log.flush()
            self._echo = echo

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

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
        """The training ranks: torchrun's direct children, or the one worker launched without it."""
        try:
            root = psutil.Process(self.popen.pid)
            return root.children(recursive=False) if self.torchrun else [root]
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

    def kill_tree(self) -> None:
        """SIGKILL every process of the tree, workers before torchrun, then reap."""
        procs = self._alive()
        for p in sorted(procs, key=lambda p: p.pid == self.popen.pid):
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def stop(self, grace_s: float, sig: int = signal.SIGTERM) -> int | None:
        """Ask the workers to save and exit, within one deadline; SIGKILL what is left after it."""
        deadline = time.monotonic() + grace_s
        signalled: set[int] = set()
        while time.monotonic() < deadline:
            for p in self.workers():
                if p.pid not in signalled:  # workers torchrun starts after the stop get it too
                    signalled.add(p.pid)
                    with contextlib.suppress(psutil.Error):
                        p.send_signal(sig)
            if self.popen.poll() is not None and not self._alive():
                break
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if self._alive() or self.popen.poll() is None:
            self.kill_tree()
        return self.popen.poll()

    def close(self) -> None:
        """Nothing of the tree outlives this; the output thread gets a moment to write the last
        lines (a grandchild that escaped could hold the pipe open, so it is not waited for)."""
        if self._alive():
            self.kill_tree()
        self._reader.join(timeout=5)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
