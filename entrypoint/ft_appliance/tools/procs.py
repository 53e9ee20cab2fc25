"""Find and kill a run's processes from outside (the soak, the tests, the benchmarks): torchrun and
its workers carry the run's state folder in their command line."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ..state.layout import StateDir, read_record_or_none
from ..state.records import LaunchRecord


def training_processes(output_dir: Path, attempt: int | None = None) -> list[psutil.Process]:
    """torchrun and worker processes of one run (spares included), or of one attempt, found by the
    run file or spare's go file in their command line."""
    sd = StateDir(output_dir)
    needle = str(sd.root)
    if attempt is not None:
        launch = read_record_or_none(sd.launch_file(attempt), LaunchRecord)
        if launch is None:
            return []
        needle = launch.argv[-1]
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if needle in cmd and ".worker" in cmd:  # the real worker module or a test's fake
            found.append(p)
    return found


def worker_ranks(output_dir: Path, attempt: int) -> list[psutil.Process]:
    """The training ranks of one attempt: its processes without torchrun's agent."""
    return [p for p in training_processes(output_dir, attempt) if "torch.distributed.run" not in p.info["cmdline"]]


def spare_processes(output_dir: Path) -> list[psutil.Process]:
    """The run's spare workers (and their torchrun) that no attempt has taken yet."""
    return [p for p in training_processes(output_dir) if "--spare" in p.info["cmdline"]]


def for_each_alive(procs: list[psutil.Process], action: Callable[[psutil.Process], Any]) -> None:
    """action(p) for each process (psutil.Process.suspend, .resume, .kill); one already gone is skipped."""
    for p in procs:
        try:
            action(p)
        except psutil.Error:
            pass


def kill_run(supervisor: subprocess.Popen, output_dir: Path) -> None:
    """What `docker kill` or a host crash does: SIGKILL the supervisor and every training process,
    freezing them first so that nothing moves on between the kills."""
    procs = training_processes(output_dir)
    for_each_alive(procs, psutil.Process.suspend)
    supervisor.kill()
    for_each_alive(procs, psutil.Process.kill)
    supervisor.wait()
    psutil.wait_procs(procs, timeout=10)
