"""Two nodes on one machine: two supervisors as two process trees on loopback, each with 2 CPU
processes over gloo, with distinct node ranks (LlamaFactory's NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT)
and one shared output folder. Real torchrun, real LlamaFactory, real signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
from ft_appliance.state.layout import MARKER, StateDir

from tests.helpers import last_step, max_abs_diff, read_adapter, run_cli, start_cli, wait_for

pytestmark = pytest.mark.slow

# DDP rebuilds its gradient buckets after the first step of every launch, so the first step after a
# resume sums each gradient over 4 ranks in another order than the uninterrupted run did (about 1e-7
# apart; with 2 ranks the order cannot matter). With find_unused_parameters DDP keeps its first
# buckets (non-reentrant checkpointing goes with it), and resume is exact: what the assertions below compare.
STEPS = [
    "max_steps=60",
    "save_steps=10",
    "logging_steps=5",
    "ddp_find_unused_parameters=true",
    "use_reentrant_gc=false",
]
FAST = ["--nproc", "2", "--backoff", "0.2", "--stop-grace", "60"]


def free_ports() -> int:
    """A port P with P + 1 (the head's control port) free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def node_env(rank: int, port: int) -> dict[str, str]:
    return {"NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


class Nodes:
    def __init__(self, cfg: Path, tmp: Path, port: int, extra: tuple[str, ...] = ()) -> None:
        self.cfg, self.tmp, self.port, self.extra = cfg, tmp, port, extra
        self.procs: dict[int, subprocess.Popen] = {}
        self.starts = 0

    def start(self, rank: int) -> subprocess.Popen:
        self.starts += 1
        log = self.tmp / f"node{rank}-{self.starts}.log"
        p = start_cli("train", str(self.cfg), *FAST, *STEPS, *self.extra, log=log, env=node_env(rank, self.port))
        p.log = log  # type: ignore[attr-defined]
        self.procs[rank] = p
        return p

    def wait(self, rank: int, timeout: float = 400) -> tuple[int, str]:
        p = self.procs[rank]
        rc = p.wait(timeout)
        return rc, p.log.read_text()  # type: ignore[attr-defined]


def tree(p: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(p.pid)
    return [root, *root.children(recursive=True)]


def kill_processes(procs: list[psutil.Process]) -> None:
    """Frozen first, then SIGKILLed: what a host crash does to them."""
    for q in procs:
        q.suspend()
    for q in procs:
        q.kill()
    psutil.wait_procs(procs, timeout=10)


def ft_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("[ft]") or ln.startswith("ft-appliance:")]


@pytest.fixture(scope="module")
def reference(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the same two nodes: world size 4."""
    from tests.helpers import write_config

    tmp = tmp_path_factory.mktemp("reference")
    nodes = Nodes(write_config(demo_root, tmp, "reference"), tmp, free_ports())
    nodes.start(0), nodes.start(1)
    for rank in (0, 1):
        rc, text = nodes.wait(rank)
        assert rc == 0, text[-3000:]
    return tmp / "output" / "reference"


def test_killed_nodes_resume_together_to_the_uninterrupted_weights(
    reference: Path, make_config, tmp_path: Path
) -> None:
    out = tmp_path / "output" / "mn"
    sd = StateDir(out)
    nodes = Nodes(make_config("mn"), tmp_path, free_ports())
    head, node1 = nodes.start(0), nodes.start(1)
    wait_for(lambda: (out / "checkpoint-10" / MARKER).exists() and last_step(out) >= 14, 300, what="step 14")
    # 1. The head's training processes die (its supervisor lives): both nodes restart from checkpoint-10.
    kill_processes(tree(head)[1:])
    wait_for(lambda: sd.run_file(2).exists(), 120, what="attempt 2")
    wait_for(lambda: (out / "checkpoint-30" / MARKER).exists() and last_step(out) >= 33, 300, what="step 33")
    # 2. Node 1 dies whole (a host crash: supervisor and tree), and its scheduler starts it again.
    kill_processes(tree(node1))
    node1 = nodes.start(1)
    wait_for(lambda: sd.run_file(3).exists(), 120, what="attempt 3")
    wait_for(lambda: (out / "checkpoint-40" / MARKER).exists() and last_step(out) >= 43, 300, what="step 43")
    # 3. The head dies whole and is started again: node 1 ends its part, waits, and joins the new head.
    first_head = (nodes.tmp / "node0-1.log").read_text()
    kill_processes(tree(head))
    nodes.start(0)
    rc0, text0 = nodes.wait(0)
    rc1, text1 = nodes.wait(1)
    assert (rc0, rc1) == (0, 0), (text0[-3000:], text1[-3000:])
    lines0 = ft_lines(first_head) + ft_lines(text0)
    assert any("attempt 2: resuming from checkpoint-10" in ln for ln in lines0), lines0
    assert any("attempt 3: resuming from checkpoint-30" in ln for ln in lines0), lines0
    assert any("attempt 4: resuming from checkpoint-40" in ln for ln in lines0), lines0
    assert any("node 1 left the job" in ln for ln in lines0)
    assert sum("node 1 (" in ln and "joined" in ln for ln in lines0) == 3
    assert sd.attempt_numbers() == [1, 2, 3, 4]  # one numbering for the job: node 1 ran the head's attempts
    assert sd.output_log(4, 1).exists() and not (sd.attempts / "5").exists()
    lines1 = ft_lines(text1)
    assert any("the head's supervisor is gone: waiting for a new head" in ln for ln in lines1), lines1
    assert any("finished: 60/60" in ln for ln in lines1)
    assert max_abs_diff(read_adapter(reference), read_adapter(out)) == 0.0
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(sd.root) in " ".join(p.info["cmdline"] or [])]


def test_sigterm_to_one_node_stops_the_job_with_a_checkpoint_then_both_resume(
    reference: Path, make_config, tmp_path: Path
) -> None:
    out = tmp_path / "output" / "mn"
    nodes = Nodes(make_config("mn"), tmp_path, free_ports())
    nodes.start(0)
    node1 = nodes.start(1)
    wait_for(lambda: last_step(out) >= 17, 300, what="step 17")
    node1.send_signal(signal.SIGTERM)
    rc1, text1 = nodes.wait(1)
    rc0, text0 = nodes.wait(0)
    assert (rc0, rc1) == (143, 143), (text0[-3000:], text1[-3000:])
    stopped_at = last_step(out)
    assert (out / f"checkpoint-{stopped_at}" / MARKER).exists()  # the stop step, saved by the whole job
    assert any("node 1 asked the job to stop" in ln for ln in ft_lines(text0))
    assert any(ln.startswith("ft-appliance:") and "stopped" in ln for ln in ft_lines(text0))
    nodes.start(0), nodes.start(1)
    rc0, text0 = nodes.wait(0)
    rc1, text1 = nodes.wait(1)
    assert (rc0, rc1) == (0, 0), (text0[-3000:], text1[-3000:])
    assert any(f"resuming from checkpoint-{stopped_at}" in ln for ln in ft_lines(text0))
    assert max_abs_diff(read_adapter(reference), read_adapter(out)) == 0.0


def test_a_node_that_does_not_share_the_volume_is_refused_on_both_nodes(make_config, tmp_path: Path) -> None:
    port = free_ports()
    head = start_cli("train", str(make_config("mn")), *FAST, log=tmp_path / "head.log", env=node_env(0, port))
    res = run_cli("train", str(make_config("elsewhere")), *FAST, "--join-timeout", "60", env=node_env(1, port))
    assert res.returncode == 8, res.stdout + res.stderr
    (line,) = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("ft-appliance:")]
    assert "does not see the head's output volume" in line and "shared output_dir" in line
    assert head.wait(60) == 8
    text = (tmp_path / "head.log").read_text()
    assert "node 1 refused to join: this node does not see the head's output volume" in text
    assert "Traceback" not in text + res.stderr and not (tmp_path / "output" / "mn" / ".ft" / "attempts").exists()


def test_a_node_with_another_config_is_refused(make_config, tmp_path: Path) -> None:
    port = free_ports()
    cfg = make_config("mn")
    head = start_cli("train", str(cfg), *FAST, log=tmp_path / "head.log", env=node_env(0, port))
    res = run_cli("train", str(cfg), *FAST, "lora_rank=16", env=node_env(1, port))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "config differs from the head's" in res.stderr and head.wait(60) == 3


def test_a_node_whose_head_is_unreachable_says_so_in_one_line(make_config, tmp_path: Path) -> None:
    res = run_cli("train", str(make_config("mn")), *FAST, "--join-timeout", "3", env=node_env(1, free_ports()))
    assert res.returncode == 8
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("ft-appliance:")]
    assert len(lines) == 1 and "cannot reach the head node at 127.0.0.1" in lines[0] and "Traceback" not in res.stderr


def test_two_nodes_through_torchrun_c10d_rendezvous_given_as_options(make_config, tmp_path: Path) -> None:
    """The same job through torchrun's dynamic rendezvous: --rdzv-endpoint and --rdzv-id as options,
    the node count from FT_NNODES, node 0 (the head) by --node-rank."""
    out = tmp_path / "output" / "c10d"
    cfg = make_config("c10d", max_steps=12, save_steps=6)
    endpoint = f"127.0.0.1:{free_ports()}"
    procs = [
        start_cli(
            "train",
            str(cfg),
            "--nproc",
            "1",
            "--node-rank",
            str(k),
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            "job-c10d",
            log=tmp_path / f"c{k}.log",
            env={"FT_NNODES": "2"},
        )  # fmt: skip
        for k in (0, 1)
    ]
    assert [p.wait(400) for p in procs] == [0, 0], (tmp_path / "c0.log").read_text()[-3000:]
    head = (tmp_path / "c0.log").read_text()
    assert f"nodes: node 0 of 2 (--node-rank, FT_NNODES), c10d rendezvous at {endpoint} (--rdzv-endpoint)" in head
    argv = json.loads((StateDir(out).launch_file(1)).read_text())["argv"]
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d" and argv[argv.index("--rdzv-id") + 1] == "job-c10d"
    assert "the head finished the job" in (tmp_path / "c1.log").read_text() and last_step(out) == 12
