from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from ft_appliance.config.plan import Plan, RetryPolicy
from ft_appliance.config.topology import Topology
from ft_appliance.run.command import DEFAULT_ENV, build_launch, build_spare, spare_allowed, torchrun_argv


@pytest.mark.parametrize("nproc", [1, 2, 8])
def test_single_node_command(nproc: int) -> None:
    argv = torchrun_argv(nproc, Topology(), 29555, ["/run.json"], python="/py")
    assert argv == [
        "/py", "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", "29555",
        "--max-restarts", "0",
        "-m", "ft_appliance.worker", "/run.json",
    ]  # fmt: skip


def test_multi_node_command_ranks_nodes_statically_at_the_head() -> None:
    t = Topology(nnodes=2, node_rank=1, master_addr="head", master_port=29611)
    argv = torchrun_argv(8, t, 1, ["/run.json"], python="/py")
    i = argv.index("--nnodes")
    assert argv[i : i + 10] == [
        "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "static",
        "--master-addr", "head", "--master-port", "29611",
    ]  # fmt: skip
    assert argv[-3:] == ["-m", "ft_appliance.worker", "/run.json"]


def test_multi_node_command_uses_c10d_rendezvous() -> None:
    t = Topology(nnodes=2, node_rank=0, master_addr="head", master_port=29400, backend="c10d", rdzv_id="job-7")
    argv = torchrun_argv(8, t, 1, ["/run.json"], python="/py")
    assert argv[argv.index("--nnodes") + 1] == "2"
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
    assert argv[argv.index("--rdzv-endpoint") + 1] == "head:29400"
    assert argv[argv.index("--rdzv-id") + 1] == "job-7"
    assert "--master-addr" not in argv
    assert argv[-3:] == ["-m", "ft_appliance.worker", "/run.json"]


def test_launch_env_defaults_and_user_env_wins(tmp_path: Path) -> None:
    plan = Plan(tmp_path / "c.yaml", {"output_dir": str(tmp_path)}, tmp_path, 2, tmp_path)
    env = {"PYTORCH_CUDA_ALLOC_CONF": "mine", "PATH": "/bin"}
    spec = build_launch(plan, tmp_path / "run.json", tmp_path / "a" / "output.log", 1234, env, supervisor_pid=7)
    assert spec.env["PYTORCH_CUDA_ALLOC_CONF"] == "mine"
    assert spec.env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == DEFAULT_ENV["TORCH_NCCL_AVOID_RECORD_STREAMS"]
    assert spec.env["FT_SUPERVISOR_PID"] == "7" and spec.log_path == tmp_path / "a" / "output.log"
    assert spec.cwd == tmp_path
    assert "--nproc-per-node" in spec.argv and spec.argv[spec.argv.index("--nproc-per-node") + 1] == "2"


def test_spare_waits_for_its_go_file_and_knows_its_supervisor(tmp_path: Path) -> None:
    plan = Plan(tmp_path / "c.yaml", {"output_dir": str(tmp_path)}, tmp_path, 2, tmp_path)
    spec = build_spare(plan, tmp_path / "go.json", tmp_path / "s", 1234, {"PATH": "/bin"}, supervisor_pid=42)
    assert spec.argv[-4:] == ["-m", "ft_appliance.worker", "--spare", str(tmp_path / "go.json")]
    assert spec.env["FT_SUPERVISOR_PID"] == "42"
    # A DeepSpeed run's spare imports deepspeed while it waits.
    ds = Plan(tmp_path / "c.yaml", {"output_dir": str(tmp_path), "deepspeed": "ds_z2.json"}, tmp_path, 2, tmp_path)
    spec = build_spare(ds, tmp_path / "go.json", tmp_path / "s", 1234, {"PATH": "/bin"}, supervisor_pid=42)
    assert spec.argv[-3:] == ["--spare", str(tmp_path / "go.json"), "--deepspeed"]


def test_spare_only_where_a_single_node_can_restart(tmp_path: Path) -> None:
    plan = Plan(tmp_path / "c.yaml", {}, tmp_path, 2, tmp_path)
    assert spare_allowed(plan)
    assert not spare_allowed(replace(plan, retry=RetryPolicy(max_restarts=0)))  # nothing to take over
    assert not spare_allowed(replace(plan, retry=RetryPolicy(spare=False)))  # --no-spare
    assert not spare_allowed(
        replace(plan, topology=Topology(nnodes=2, node_rank=0, master_addr="head"))
    )  # nodes restart together
    assert spare_allowed(replace(plan, nproc=3)) and not spare_allowed(replace(plan, nproc=4))  # host memory


def test_one_process_without_a_process_group_runs_the_worker_itself(tmp_path: Path) -> None:
    from ft_appliance.run.command import needs_torchrun

    plan = Plan(tmp_path / "c.yaml", {"output_dir": str(tmp_path)}, tmp_path, 1, tmp_path)
    spec = build_launch(plan, tmp_path / "run.json", tmp_path / "log", 1234, {}, supervisor_pid=7)
    assert spec.argv[1:] == ["-m", "ft_appliance.worker", str(tmp_path / "run.json")]
    assert not needs_torchrun(plan)
    assert needs_torchrun(replace(plan, nproc=2))
    assert needs_torchrun(replace(plan, args={"deepspeed": "ds_z3_config.json"}))
    assert needs_torchrun(replace(plan, args={"fsdp": "full_shard"}))
    assert needs_torchrun(replace(plan, topology=Topology(nnodes=2, node_rank=0, master_addr="head")))
