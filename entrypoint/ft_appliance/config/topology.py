"""Pure: which node of how many this is, and where the job's rendezvous is, from the options and the
variables that launchers and schedulers already inject. No I/O: an environment mapping in, a Topology
with the source of every fact out, tested by tables.

Precedence, per fact: an explicit option, then its FT_* mirror, then the conventions below. The
conventions must agree where they overlap (two schedulers' variables naming different node counts
are refused, never guessed between):

    LlamaFactory    NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
    Kubeflow        PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT (Trainer v2's torch runtime)
    Kubernetes      JOB_COMPLETION_INDEX (an indexed Job: the pod's index is its node rank)
    Slurm           SLURM_NNODES, SLURM_NODEID, the first host of SLURM_JOB_NODELIST, SLURM_JOB_ID
    SkyPilot        SKYPILOT_NUM_NODES, SKYPILOT_NODE_RANK, the first line of SKYPILOT_NODE_IPS
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_PORT = 29500
FACTS = ("nnodes", "node_rank", "master_addr", "master_port", "rdzv_id")


@dataclass(frozen=True)
class Topology:
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    backend: str = "static"
    """static: torchrun ranks the nodes by node_rank; c10d: its dynamic rendezvous at the endpoint."""
    rdzv_id: str = "ft-appliance"
    sources: tuple[tuple[str, str], ...] = ()
    """(fact, where it came from) for the banner."""

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def head(self) -> bool:
        """The node whose supervisor owns the run: it chooses checkpoints and decides restarts."""
        return self.node_rank == 0

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    def describe(self) -> str:
        where = dict(self.sources)
        facts = [
            f"node {self.node_rank} of {self.nnodes}" + _from(where, "node_rank", "nnodes"),
            f"{self.backend} rendezvous at {self.endpoint}" + _from(where, "master_addr", "master_port"),
        ]
        return ", ".join(facts)


def _from(where: Mapping[str, str], *facts: str) -> str:
    found = sorted({where[f] for f in facts if f in where})
    return f" ({', '.join(found)})" if found else ""


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[03-05,9],cpu1` -> `gpu03` (what `scontrol show
    hostnames | head -1` prints)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(nodelist)
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _conventions(env: Mapping[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Every fact each convention gives: fact -> [(value, variable)]."""
    found: dict[str, list[tuple[str, str]]] = {f: [] for f in FACTS}

    def put(fact: str, var: str, value: str | None = None) -> None:
        raw = env.get(var) if value is None else value
        if raw is not None and raw.strip():
            found[fact].append((raw.strip(), var))

    for prefix in ("", "PET_"):
        put("nnodes", f"{prefix}NNODES")
        put("node_rank", f"{prefix}NODE_RANK")
        put("master_addr", f"{prefix}MASTER_ADDR")
        put("master_port", f"{prefix}MASTER_PORT")
    put("node_rank", "JOB_COMPLETION_INDEX")
    put("nnodes", "SLURM_NNODES")
    put("node_rank", "SLURM_NODEID")
    if env.get("SLURM_JOB_NODELIST"):
        put("master_addr", "SLURM_JOB_NODELIST", first_slurm_host(env["SLURM_JOB_NODELIST"]))
    put("rdzv_id", "SLURM_JOB_ID")
    put("nnodes", "SKYPILOT_NUM_NODES")
    put("node_rank", "SKYPILOT_NODE_RANK")
    if env.get("SKYPILOT_NODE_IPS", "").strip():
        put("master_addr", "SKYPILOT_NODE_IPS", env["SKYPILOT_NODE_IPS"].split()[0])
    return found


def _agreed(fact: str, values: list[tuple[str, str]]) -> tuple[str, str] | None:
    if not values:
        return None
    distinct = {v for v, _ in values}
    if len(distinct) > 1:
        named = ", ".join(f"{var}={v}" for v, var in values)
        raise ConfigError(
            f"the environment gives two values for the {fact.replace('_', ' ')} ({named}): unset one, or pass "
            f"--{fact.replace('_', '-')} to choose"
        )
    return values[0][0], "+".join(var for _, var in values)


def _int(fact: str, raw: str, where: str) -> int:
    if not re.fullmatch(r"\d+", raw):
        hint = " (elastic node counts are not supported: the supervisor restarts the job at a fixed size)"
        raise ConfigError(
            f"{fact.replace('_', ' ')} {raw!r} from {where} is not a whole number"
            + (hint if fact == "nnodes" and ":" in raw else "")
        )
    return int(raw)


def resolve(explicit: Mapping[str, tuple[str, str]], env: Mapping[str, str]) -> Topology:
    """explicit: fact -> (value, "--option" or "FT_VAR"), for the options given; rdzv_endpoint
    (host:port) is one of them and means c10d."""
    conventions = _conventions(env)
    chosen: dict[str, tuple[str, str]] = {}
    endpoint = explicit.get("rdzv_endpoint")
    if endpoint is not None:
        host, sep, port = endpoint[0].rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"rendezvous endpoint {endpoint[0]!r} from {endpoint[1]} is not HOST:PORT")
        chosen["master_addr"], chosen["master_port"] = (host, endpoint[1]), (port, endpoint[1])
    for fact in FACTS:
        if fact in explicit:
            chosen[fact] = explicit[fact]
        elif fact not in chosen and (agreed := _agreed(fact, conventions[fact])) is not None:
            chosen[fact] = agreed
    return _build(chosen, c10d=endpoint is not None)


def _build(chosen: Mapping[str, tuple[str, str]], c10d: bool) -> Topology:
    nnodes = _int("nnodes", *chosen["nnodes"]) if "nnodes" in chosen else 1
    if nnodes < 1:
        raise ConfigError(f"node count {nnodes} from {chosen['nnodes'][1]} is not positive")
    if nnodes == 1:
        return Topology(sources=tuple((f, w) for f, (_, w) in chosen.items() if f == "nnodes"))
    if "node_rank" not in chosen:
        raise ConfigError(
            f"{nnodes} nodes, but this node's rank is unknown: set NODE_RANK (0 on the head node), or pass --node-rank"
        )
    rank = _int("node_rank", *chosen["node_rank"])
    if rank >= nnodes:
        raise ConfigError(f"node rank {rank} from {chosen['node_rank'][1]} is not below the node count {nnodes}")
    if "master_addr" not in chosen:
        raise ConfigError(
            f"{nnodes} nodes, but no head address: set MASTER_ADDR to the head node's address, or pass --master-addr"
        )
    port = _int("master_port", *chosen["master_port"]) if "master_port" in chosen else DEFAULT_PORT
    return Topology(
        nnodes=nnodes,
        node_rank=rank,
        master_addr=chosen["master_addr"][0],
        master_port=port,
        backend="c10d" if c10d else "static",
        rdzv_id=chosen["rdzv_id"][0] if "rdzv_id" in chosen else "ft-appliance",
        sources=tuple((f, w) for f, (_, w) in chosen.items()),
    )
