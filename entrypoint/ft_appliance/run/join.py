"""The nodes of a multi-node job find their head and stay in touch with it: a small TCP control
channel beside torchrun's rendezvous (the head's port + 1 by default).

- The head listens. A node connects, says which node it is, and hears the job's token. It then reads
  `.ft/job.json` on its own view of the output volume: the same token there proves the two share the
  volume (the checkpoints, the steps and the decisions all live there); the config hash must match
  its own. It answers ok, or refused with the reason.
- The connection stays open for the job's life. When it drops, each side knows at once that the
  other's supervisor is gone: the head does not launch an attempt without every node, and a node
  whose head is gone ends its part and waits for a new head.

Messages are JSON lines. Only liveness and the handshake go through here; every decision is a record
on the shared volume (state/layout.py), so a supervisor that restarts reads the same truth.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import EXIT_ENVIRONMENT, ApplianceError

HANDSHAKE_TIMEOUT_S = 30.0


class JoinFailed(ApplianceError):
    exit_code = EXIT_ENVIRONMENT

    def __init__(self, message: str, exit_code: int = EXIT_ENVIRONMENT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _send(fh, obj: dict) -> None:  # noqa: ANN001
    fh.write((json.dumps(obj) + "\n").encode())
    fh.flush()


def _recv(fh) -> dict:  # noqa: ANN001
    line = fh.readline()
    if not line:
        raise ConnectionError("closed")
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ConnectionError("not an object")
    return obj


@dataclass
class JobServer:
    """The head's side: who has joined, who refused (and why), who left."""

    port: int
    token: str
    nnodes: int
    say: Callable[[str], None]
    joined: dict[int, str] = field(default_factory=dict)
    refused: dict[int, tuple[str, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sock: socket.socket | None = None
    _conns: set[socket.socket] = field(default_factory=set)

    def start(self) -> JobServer:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", self.port))
        except OSError as exc:
            s.close()
            raise JoinFailed(
                f"the head cannot listen on its control port {self.port} ({exc.strerror}): free it, or choose "
                "another with --control-port (FT_CONTROL_PORT) on every node"
            ) from None
        s.listen(64)
        self._sock = s
        threading.Thread(target=self._accept, name="ft-join", daemon=True).start()
        return self

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        node = None
        with conn, conn.makefile("rwb") as fh:
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                hello = _recv(fh)
                node, host = int(hello["node"]), str(hello.get("host", "?"))
                _send(fh, {"job": self.token, "nnodes": self.nnodes})
                verdict = _recv(fh)
            except (OSError, ValueError, KeyError, ConnectionError):
                return
            if "refused" in verdict:
                with self._lock:
                    self.refused[node] = (str(verdict["refused"]), int(verdict.get("code", EXIT_ENVIRONMENT)))
                return
            with self._lock:
                self.joined[node] = host
                self.refused.pop(node, None)
            self.say(f"node {node} ({host}) joined the job")
            conn.settimeout(None)
            while True:  # kept open: EOF is the node's supervisor going away
                try:
                    if not conn.recv(64):
                        break
                except OSError:
                    break
        with self._lock:
            if self.joined.pop(node, None) is not None:
                self.say(f"node {node} left the job (its supervisor is gone)")

    def missing(self) -> list[int]:
        with self._lock:
            return [k for k in range(1, self.nnodes) if k not in self.joined]

    def wait_all(self, timeout_s: float, stopped: Callable[[], None], first: bool) -> None:
        """Until every node has joined; a refusal at the first start ends the job with its reason."""
        deadline = time.monotonic() + timeout_s
        told = False
        while missing := self.missing():
            stopped()
            with self._lock:
                refusals = dict(self.refused)
            for k, (why, code) in refusals.items():
                if first:
                    raise JoinFailed(f"node {k} refused to join: {why}", code)
            if time.monotonic() >= deadline:
                raise JoinFailed(
                    f"node(s) {', '.join(map(str, missing))} of {self.nnodes} did not join within {timeout_s:.0f} s: "
                    f"start them with the same NNODES, MASTER_ADDR and MASTER_PORT, their own NODE_RANK, and the "
                    f"same output volume (they reach this head on port {self.port})"
                )
            if not told:
                told = True
                self.say(f"waiting up to {timeout_s:.0f} s for node(s) {', '.join(map(str, missing))} to join")
            time.sleep(0.2)

    def close(self) -> None:
        """Stop listening and drop every node's connection: they see their head go."""
        s, self._sock = self._sock, None
        if s is not None:
            s.close()
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class JobLink:
    """A node's side: the token it joined and the open connection to its head."""

    token: str
    sock: socket.socket

    def head_alive(self) -> bool:
        try:
            self.sock.setblocking(False)
            try:
                return self.sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                return True
            finally:
                self.sock.setblocking(True)
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


def join(
    addr: str, port: int, node: int, check: Callable[[str, int], tuple[str, int] | None], timeout_s: float,
    stopped: Callable[[], None],
) -> JobLink:  # fmt: skip
    """Connect to the head (retrying until timeout_s: nodes start in any order), hear the token, check
    it with `check(token, nnodes)` (None, or (reason, exit code)), and answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        stopped()
        try:
            sock = socket.create_connection((addr, port), timeout=2.0)
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise JoinFailed(
                    f"cannot reach the head node at {addr}:{port} within {timeout_s:.0f} s ({exc.strerror or exc}): "
                    "check MASTER_ADDR/MASTER_PORT (the head listens on MASTER_PORT + 1) and that the head runs"
                ) from None
            time.sleep(1.0)
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    fh = sock.makefile("rwb")
    try:
        _send(fh, {"node": node, "host": socket.gethostname()})
        hello = _recv(fh)
        token, nnodes = str(hello["job"]), int(hello["nnodes"])
        problem = check(token, nnodes)
        _send(fh, {"refused": problem[0], "code": problem[1]} if problem else {"ok": True})
    except (OSError, ValueError, KeyError, ConnectionError) as exc:
        sock.close()
        raise JoinFailed(f"the head at {addr}:{port} broke off the handshake ({exc}): start again") from None
    fh.close()
    if problem:
        sock.close()
        raise JoinFailed(problem[0], problem[1])
    sock.settimeout(None)
    return JobLink(token, sock)
