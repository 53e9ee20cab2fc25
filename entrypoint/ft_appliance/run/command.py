"""Pure: a Plan and an attempt number in, the command to run out: torchrun, or the worker itself for
one process that needs no process group.

torchrun is started directly (`python -m torch.distributed.run`), not through `llamafactory-cli`,
which re-splits its command line, turns every failure into exit code 1 and forwards no signal.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config.plan import Plan
from ..config.topology import Topology

WORKER_MODULE = "ft_appliance.worker"
# Tests swap in a small fake worker that speaks the same state protocol (tests/fakes/worker.py).
WORKER_MODULE_ENV = "FT_WORKER_MODULE"

# What `llamafactory-cli train` sets for distributed runs (its OPTIM_TORCH default), so that a run
# through the appliance is as fast as one through the CLI. The user's environment wins.
DEFAULT_ENV = {
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    """Where torchrun's output goes (attempts/N/output.log, or the spare's folder until adopted)."""
    torchrun: bool = True
    """False: argv is the one worker itself (its process is the rank, with no agent above it)."""


def torchrun_argv(
    nproc: int,
    topology: Topology,
    master_port: int,
    worker_args: list[str],
    python: str = sys.executable,
    worker_module: str = WORKER_MODULE,
) -> list[str]:
    argv = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    t = topology
    if t.multi_node and t.backend == "c10d":
        # torchrun's dynamic rendezvous ranks the nodes; the appliance's head is still node_rank 0.
        argv += ["--nnodes", str(t.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", t.endpoint]
        argv += ["--rdzv-id", t.rdzv_id]
    elif t.multi_node:
        # Static rendezvous at the head: global ranks follow node ranks, so rank 0 is on the head.
        # The backend is named: torchrun would otherwise take a PET_RDZV_BACKEND a scheduler injected.
        argv += ["--nnodes", str(t.nnodes), "--node-rank", str(t.node_rank), "--rdzv-backend", "static"]
        argv += ["--master-addr", t.master_addr, "--master-port", str(t.master_port)]
    else:
        # Single node: loopback rendezvous. A bare torchrun looks itself up by hostname, which
        # times out in containers without a network.
        argv += ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    # Restarts are the supervisor's job: it picks a trusted checkpoint before each relaunch.
    argv += ["--max-restarts", "0", "-m", worker_module, *worker_args]
    return argv


def needs_torchrun(plan: Plan) -> bool:
    """One process on one node runs as plain `python -m worker`: under torchrun LlamaFactory counts even
    one process as distributed and refuses layer-wise GaLore and APOLLO, the single-GPU memory savers,
    and the agent is one process more to start and stop. DeepSpeed and FSDP set up a process group
    from torchrun's environment, so they keep it."""
    args = plan.args
    return plan.nproc > 1 or plan.topology.multi_node or bool(args.get("deepspeed") or args.get("fsdp"))


def launch_argv(plan: Plan, master_port: int, worker_args: list[str], module: str) -> list[str]:
    if needs_torchrun(plan):
        return torchrun_argv(plan.nproc, plan.topology, master_port, worker_args, worker_module=module)
    return [sys.executable, "-m", module, *worker_args]


def _env(base_env: Mapping[str, str], supervisor_pid: int) -> dict[str, str]:
    # The workers watch their supervisor too (besides the death signal through torchrun).
    return {**DEFAULT_ENV, **base_env, "FT_SUPERVISOR_PID": str(supervisor_pid)}


def build_launch(
    plan: Plan, run_file: Path, log_path: Path, master_port: int, base_env: Mapping[str, str], supervisor_pid: int
) -> LaunchSpec:
    module = base_env.get(WORKER_MODULE_ENV) or WORKER_MODULE
    argv = launch_argv(plan, master_port, [str(run_file)], module)
    env = _env(base_env, supervisor_pid)
    return LaunchSpec(argv=argv, env=env, cwd=plan.workdir, log_path=log_path, torchrun=needs_torchrun(plan))


def spare_allowed(plan: Plan) -> bool:
    """A spare needs a restart to serve and a rendezvous of its own: single node only, since the
    nodes of a multi-node job restart together through their shared rendezvous. Off from 4 processes
    on: each idle spare rank holds about 0.5 GB of host memory with CPU torch, and what it holds with
    CUDA torch is not measured yet."""
    return plan.retry.spare and plan.retry.max_restarts > 0 and not plan.topology.multi_node and plan.nproc < 4


def build_spare(
    plan: Plan, go_file: Path, log_path: Path, master_port: int, base_env: Mapping[str, str], supervisor_pid: int
) -> LaunchSpec:
    """Workers (under torchrun, as the attempt's would be) that import the stack and wait for go_file,
    to become the next attempt."""
    module = base_env.get(WORKER_MODULE_ENV) or WORKER_MODULE
    extra = ["--deepspeed"] if plan.args.get("deepspeed") else []  # the spare imports it while it waits
    argv = launch_argv(plan, master_port, ["--spare", str(go_file), *extra], module)
    env = _env(base_env, supervisor_pid)
    return LaunchSpec(argv=argv, env=env, cwd=plan.workdir, log_path=log_path, torchrun=needs_torchrun(plan))
