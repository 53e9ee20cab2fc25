"""One owner per job: a multi-node job's head and its other nodes, and what they share on the volume.

The head (node 0) owns the run as a single node would (state/lock.py): it chooses the checkpoint,
numbers the attempts, counts the restart budget and the crash-loop guard for the whole job, and
writes the job's end. Every other node holds only its own slot, joins the head (join.py), launches
its part of each attempt the head writes, and exits the way the head's JobEnd says.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config.topology import Topology
from ..errors import EXIT_CONFIG, EXIT_ENVIRONMENT
from ..state.layout import StateDir, read_record_or_none, write_record
from ..state.records import JobEnd, JobRecord, NodeEnd, RunState, StopRequest
from .join import JobLink, JobServer, join

# NFS caches attributes for a few seconds: a node reads the head's fresh job.json for this long.
SEE_JOB_FILE_S = 10.0


def config_hash(args: dict[str, Any]) -> str:
    """The same YAML and overrides give the same hash on every node (before profile and autotune)."""
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Job:
    token: str
    topology: Topology
    sd: StateDir
    server: JobServer | None = None
    link: JobLink | None = None

    @property
    def node(self) -> int:
        return self.topology.node_rank

    def joined(self) -> list[int]:
        """The other nodes whose supervisors are connected now (the head's view)."""
        if self.server is None:
            return []
        missing = set(self.server.missing())
        return [k for k in range(1, self.topology.nnodes) if k not in missing]

    def stop_requests(self) -> list[StopRequest]:
        found = [read_record_or_none(p, StopRequest) for p in self.sd.stop_requests()]
        return [r for r in found if r is not None and r.job == self.token]

    def stop_signal(self) -> int | None:
        """The signal of the first stop any node of the job was asked for, or None."""
        asked = self.stop_requests()
        return asked[0].signum if asked else None

    def request_stop(self, signum: int, attempt: int | None) -> None:
        write_record(self.sd.stop_request(self.node), StopRequest(self.token, self.node, signum, attempt, time.time()))

    def node_ends(self, attempt: int) -> list[NodeEnd]:
        ends = [read_record_or_none(p, NodeEnd) for p in self.sd.node_ends(attempt)]
        return [e for e in ends if e is not None]

    def end(self, state: RunState, exit_code: int, message: str) -> None:
        write_record(self.sd.job_end, JobEnd(self.token, state, exit_code, message, time.time()))

    def close(self) -> None:
        for part in (self.server, self.link):
            if part is not None:
                part.close()


def control_port(topology: Topology, explicit: int | None) -> int:
    return explicit or topology.master_port + 1


def lead(
    sd: StateDir, topology: Topology, digest: str, port: int, join_s: float, say: Callable[[str], None],
    stopped: Callable[[], None],
) -> Job:  # fmt: skip
    """The head: a fresh token in job.json, then listen until every node has joined (or refused)."""
    token = secrets.token_hex(8)
    write_record(sd.job, JobRecord(token, topology.nnodes, digest, socket.gethostname(), time.time()))
    server = JobServer(port, token, topology.nnodes, say).start()
    job = Job(token, topology, sd, server=server)
    try:
        server.wait_all(join_s, stopped, first=True)
    except BaseException:
        job.close()
        raise
    say(f"all {topology.nnodes} nodes joined job {token} (control port {port})")
    return job


def follow(
    sd: StateDir, topology: Topology, digest: str, port: int, join_s: float, say: Callable[[str], None],
    stopped: Callable[[], None],
) -> Job:  # fmt: skip
    """Node K: join the head and prove the volume is shared (the head's token is in job.json here)."""
    say(f"node {topology.node_rank}: joining the head at {topology.master_addr}:{port}")

    def check(token: str, nnodes: int) -> tuple[str, int] | None:
        if nnodes != topology.nnodes:
            return (
                f"the head runs a job of {nnodes} nodes and this node was given {topology.nnodes}: "
                "give every node the same NNODES",
                EXIT_CONFIG,
            )
        return shared_volume_problem(sd, token, digest)

    link = join(topology.master_addr, port, topology.node_rank, check, join_s, stopped)
    say(f"node {topology.node_rank}: joined job {link.token}; the head's output volume is shared with this node")
    return Job(link.token, topology, sd, link=link)


def shared_volume_problem(sd: StateDir, token: str, digest: str) -> tuple[str, int] | None:
    deadline = time.monotonic() + SEE_JOB_FILE_S
    while True:
        rec = read_record_or_none(sd.job, JobRecord)
        if (rec is not None and rec.token == token) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if rec is None or rec.token != token:
        here = "holds another job's token" if rec is not None else "does not exist"
        return (
            f"this node does not see the head's output volume: {sd.job} {here} here. Every node must mount "
            "the same shared output_dir (NFS, Lustre, a ReadWriteMany volume): with node-local folders a "
            "job's checkpoints, steps and restarts cannot be shared",
            EXIT_ENVIRONMENT,
        )
    if rec.config_hash != digest:
        return (
            f"this node's config differs from the head's (hash {digest} here, {rec.config_hash} on the head): "
            "give every node the same YAML and the same key=value overrides",
            EXIT_CONFIG,
        )
    return None
