"""One owner per run: POSIX advisory locks on files in the run's state folder.

- `.ft/lock`: the supervisor holds a write lock for as long as it runs. A second start fails at once
  and names the holder from `.ft/owner.json`. The kernel drops the lock when its holder dies, however
  it dies, so a lock left by a dead supervisor is simply taken (and the takeover logged).
- `.ft/tree.lock`: every training rank holds a read lock while it lives. A new supervisor waits until
  it can take the write lock (no rank of an earlier tree is alive, in this container or another one)
  before it sets anything aside or launches.

POSIX (fcntl) locks rather than flock: they are what NFS and other network file systems implement
across clients, and what flock is emulated with there. Two consequences are respected below: a lock
belongs to the process (not inherited by children), and closing *any* descriptor of the file in the
holding process drops it, so the holder never opens these files a second time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunInUse
from .layout import StateDir, read_record_or_none, write_record
from .records import Owner

_BUSY = (errno.EACCES, errno.EAGAIN)
# A file system without POSIX locks (some FUSE and object-store mounts) answers with one of these.
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
# struct flock on Linux x86_64/aarch64: short l_type, short l_whence, (pad), off_t l_start, off_t l_len,
# pid_t l_pid, (pad)
_FLOCK = "hhxxxxqqixxxx"


class LockBusy(Exception):
    def __init__(self, owner: Owner | None) -> None:
        super().__init__("locked")
        self.owner = owner


def _paths(sd: StateDir, node: int | None) -> tuple[Path, Path]:
    """The lock and owner files: the run's, or (node K > 0 of a multi-node job) that node's slot."""
    if node is None:
        return sd.lock, sd.owner
    return sd.node_dir(node) / "lock", sd.node_dir(node) / "owner.json"


@dataclass
class RunLock:
    fd: int
    owner_path: Path
    previous: Owner | None
    """The owner record a dead holder left behind (None when the last holder released cleanly)."""
    enforced: bool = True
    """False on a file system without POSIX locks: ownership is then not enforced."""

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.owner_path.unlink(missing_ok=True)
        except OSError:
            pass  # a full or read-only volume: the lock itself still goes with the descriptor
        os.close(self.fd)  # drops the lock
        self.fd = -1


def acquire(sd: StateDir, node: int | None = None) -> RunLock:
    """The run's lock (or node K's slot), or LockBusy naming whoever holds it."""
    lock_path, owner_path = _paths(sd, node)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return RunLock(fd, owner_path, read_record_or_none(owner_path, Owner), enforced=False)
        os.close(fd)
        if exc.errno in _BUSY:
            raise LockBusy(read_record_or_none(owner_path, Owner)) from None
        raise
    previous = read_record_or_none(owner_path, Owner)
    try:
        write_record(owner_path, Owner(os.getpid(), socket.gethostname(), time.time(), str(sd.output_dir)))
    except BaseException:
        os.close(fd)
        raise
    return RunLock(fd, owner_path, previous)


def holder_pid(path: os.PathLike | str) -> int | None:
    """The pid holding a write lock on path (as this pid namespace sees it, 0 when it cannot), or None
    when nobody does. Tests without taking the lock, so a reader never disturbs a starting owner."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _w, _s, _l, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK else pid


def hold_tree(sd: StateDir) -> int:
    """A training rank's read lock on tree.lock; kept (never closed) for the life of the process."""
    sd.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(sd.tree_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    return fd


def tree_alive(sd: StateDir) -> bool:
    """Whether any rank of any tree of this run still holds tree.lock. Call only from a process that
    never holds tree.lock itself (the supervisor), since closing the probe's descriptor would drop it."""
    try:
        fd = os.open(sd.tree_lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _BUSY:
            return True
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    finally:
        os.close(fd)
    return False


def wait_tree_gone(sd: StateDir, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while tree_alive(sd):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def in_use_message(sd: StateDir, owner: Owner | None, node: int | None = None) -> str:
    who = f"pid {owner.pid} on {owner.host} since {_when(owner.since)}" if owner else "another process"
    as_node = f" as node {node}" if node is not None else ""
    return (
        f"{sd.output_dir} is in use{as_node} by a live ft-appliance run ({who}): let it finish, stop it "
        f"(docker stop, or kill -TERM {owner.pid if owner else 'PID'}), or choose another output_dir"
    )


@contextlib.contextmanager
def own(sd: StateDir, wait_s: float, say: Callable[[str], None], node: int | None = None) -> Iterator[RunLock]:
    """Hold the run for the duration of the block: refuse a live owner at once, take over from a
    dead one (logged), and wait for the ranks of an earlier tree before anything is touched.
    node: K > 0 of a multi-node job holds only its own slot; the head (plain own) waits for the trees."""
    try:
        held = acquire(sd, node)
    except LockBusy as busy:
        raise RunInUse(in_use_message(sd, busy.owner, node)) from None
    try:
        p = held.previous
        if not held.enforced:
            say(
                f"warning: the file system of {sd.output_dir} has no POSIX locks: nothing stops a second "
                "run on this output_dir; make sure only one runs (README: Ownership)"
            )
        elif p is not None:
            what = f"node {node}'s part of {sd.output_dir}" if node is not None else str(sd.output_dir)
            say(f"took over {what}: its last owner, pid {p.pid} on {p.host} (since {_when(p.since)}), is gone")
        if node is None and tree_alive(sd):
            say(f"waiting up to {wait_s:.0f} s for training processes of an earlier supervisor to exit")
            if not wait_tree_gone(sd, wait_s):
                raise RunInUse(
                    f"training processes of an earlier run still hold {sd.tree_lock} after {wait_s:.0f} s: "
                    f"stop them (fuser -v {sd.tree_lock} lists them on their host), then start again"
                )
        yield held
    finally:
        held.release()
