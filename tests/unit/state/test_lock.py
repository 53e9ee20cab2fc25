"""The run lock between real processes: refused while held, taken over (and named) after its holder
died, tested without taking it; the tree lock while a rank holds it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ft_appliance.errors import RunInUse
from ft_appliance.state import lock
from ft_appliance.state.layout import StateDir

HOLD = """
import sys, time
from pathlib import Path
from ft_appliance.state import lock
from ft_appliance.state.layout import StateDir
sd = StateDir(Path(sys.argv[1]))
{"run": lambda: lock.acquire(sd), "node1": lambda: lock.acquire(sd, 1)}.get(sys.argv[2], lambda: lock.hold_tree(sd))()
print("held", flush=True)
time.sleep(60)
"""


def holder(sd: StateDir, what: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(sd.output_dir), what], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    return p


def test_a_held_run_is_refused_with_its_owner_then_taken_over(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "out")
    p = holder(sd, "run")
    try:
        assert lock.holder_pid(sd.lock) == p.pid
        with (
            pytest.raises(RunInUse, match=f"in use by a live ft-appliance run \\(pid {p.pid} on "),
            lock.own(sd, 1, print),
        ):
            pass
    finally:
        p.kill()
        p.wait()
    assert lock.holder_pid(sd.lock) is None  # the kernel dropped it with its holder
    said: list[str] = []
    with lock.own(sd, 1, said.append) as held:
        assert held.previous is not None and held.previous.pid == p.pid
    assert said and f"its last owner, pid {p.pid}" in said[0]
    assert not sd.owner.exists()


def test_the_tree_lock_waits_for_ranks_of_an_earlier_tree(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "out")
    rank = holder(sd, "tree")
    try:
        assert lock.tree_alive(sd)
        with (
            pytest.raises(RunInUse, match="training processes of an earlier run still hold"),
            lock.own(sd, 0.5, lambda _m: None),
        ):
            pass
    finally:
        rank.kill()
        rank.wait()
    assert not lock.tree_alive(sd)


def test_a_node_slot_is_one_supervisors_and_apart_from_the_heads_lock(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "out")
    p = holder(sd, "node1")
    try:
        refused = pytest.raises(RunInUse, match=f"in use as node 1 by a live ft-appliance run \\(pid {p.pid} on ")
        with refused, lock.own(sd, 1, print, node=1):
            pass
        with lock.own(sd, 1, print, node=2), lock.own(sd, 1, print):  # node 2's slot, and the head's lock
            assert sd.owner.exists() and (sd.node_dir(2) / "owner.json").exists()
    finally:
        p.kill()
        p.wait()
