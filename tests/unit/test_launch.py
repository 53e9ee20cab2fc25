from __future__ import annotations

from pathlib import Path

import pytest
from ft_appliance.config import Plan, Rendezvous
from ft_appliance.launch import DEFAULT_ENV, build_launch, torchrun_argv


@pytest.mark.parametrize("nproc", [1, 2, 8])
def test_single_node_command(nproc: int) -> None:
    argv = torchrun_argv(nproc, Rendezvous(), 29555, ["/run.json"], python="/py")
    assert argv == [
        "/py", "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", "29555",
        "--max-restarts", "0",
        "-m", "ft_appliance.worker", "/run.json",
    ]  # fmt: skip


def test_multi_node_command_uses_c10d_rendezvous() -> None:
    argv = torchrun_argv(8, Rendezvous("2", 0, "head:29400", "job-7"), 1, ["/run.json"], python="/py")
    assert argv[argv.index("--nnodes") + 1] == "2"
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
    assert argv[argv.index("--rdzv-endpoint") + 1] == "head:29400"
    assert argv[argv.index("--rdzv-id") + 1] == "job-7"
    assert "--master-addr" not in argv
    assert argv[-3:] == ["-m", "ft_appliance.worker", "/run.json"]


def test_launch_env_defaults_and_user_env_wins(tmp_path: Path) -> None:
    plan = Plan(tmp_path / "c.yaml", {"output_dir": str(tmp_path)}, tmp_path, 2, tmp_path)
    spec = build_launch(
        plan, 3, tmp_path / "run.json", tmp_path / "a", 1234, {"PYTORCH_CUDA_ALLOC_CONF": "mine", "PATH": "/bin"}
    )
    assert spec.env["PYTORCH_CUDA_ALLOC_CONF"] == "mine"
    assert spec.env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == DEFAULT_ENV["TORCH_NCCL_AVOID_RECORD_STREAMS"]
    assert spec.env["FT_ATTEMPT"] == "3"
    assert spec.cwd == tmp_path
    assert "--nproc-per-node" in spec.argv and spec.argv[spec.argv.index("--nproc-per-node") + 1] == "2"
