"""The image against a real Docker engine: built from the project's Dockerfile (CPU variant, local base,
local wheelhouse, no network), then run as users run it. Skipped only where no engine can be reached."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, last_step, wait_for
from tests.helpers import steps as steps_in

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "ft-appliance:test"
RUN = ["docker", "run", "--network", "none"]


def sh(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res


def engine_reason() -> str | None:
    if not shutil.which("docker"):
        return "no docker client (apt-get install docker.io)"
    res = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if res.returncode != 0:
        why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "docker info failed"
        return f"no Docker engine reachable ({why})"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    reason = engine_reason()
    if reason:
        pytest.skip(reason)
    sh(str(REPO / "docker" / "build-test-image.sh"), IMAGE, timeout=1800)
    return IMAGE


@pytest.fixture
def volume(image: str):
    name = f"ft-test-{uuid.uuid4().hex[:8]}"
    sh("docker", "volume", "create", name)
    yield name
    subprocess.run(["docker", "rm", "-f", *container_names(name)], capture_output=True)
    subprocess.run(["docker", "volume", "rm", "-f", name], capture_output=True)


def container_names(volume: str) -> list[str]:
    res = subprocess.run(["docker", "ps", "-aq", "--filter", f"volume={volume}"], capture_output=True, text=True)
    return res.stdout.split()


def mountpoint(volume: str) -> Path:
    return Path(sh("docker", "volume", "inspect", volume, "--format", "{{.Mountpoint}}").stdout.strip())


def demo_layout(volume: str, max_steps: int, save_steps: int, name: str) -> tuple[str, Path]:
    """Build the demo model and data in the volume (trains the 5-step demo once), then write a longer
    config next to it. Returns (config path inside the container, output dir on the host)."""
    sh(*RUN, "-v", f"{volume}:/data", IMAGE, "demo", "/data", "--max-steps", "5", "--save-steps", "5", timeout=300)
    host = mountpoint(volume)
    cfg = yaml.safe_load((host / "configs" / "train.yaml").read_text())
    cfg.update(max_steps=max_steps, save_steps=save_steps, logging_steps=5, output_dir=f"/data/output/{name}")
    (host / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return f"/data/configs/{name}.yaml", host / "output" / name


def test_empty_volume_is_laid_out_and_no_training_starts(volume: str) -> None:
    res = sh(*RUN, "-v", f"{volume}:/data", IMAGE, check=False)
    assert res.returncode == 3
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no config at /data/configs/train.yaml: laid out configs/" in lines[0]
    host = mountpoint(volume)
    for name in (
        "configs",
        "datasets",
        "models",
        "output",
        "README.txt",
        "configs/train.example.yaml",
        "configs/deepspeed/ds_z3_config.json",
    ):
        assert (host / name).exists(), name
        assert (host / name).stat().st_uid == 1000  # the container's user, not root
    assert "models/" in (host / "README.txt").read_text()


# Every module a worker imports, checked the way Python checks it: a .pyc beside the source whose
# header matches the source's mtime and size. The image runs as a user who cannot write /opt/venv, so
# a missing or stale .pyc would be compiled again at every start (8 of 13 import seconds on a GPU
# machine whose environment had no bytecode; docs/benchmarks.md).
BYTECODE_CHECK = """
import importlib.util, json, os, struct, sys
import ft_appliance.worker
from llamafactory.train.tuner import run_exp

def stale(path):
    try:
        with open(importlib.util.cache_from_source(path), "rb") as fh:
            flags, mtime, size = struct.unpack("<4xIII", fh.read(16))
    except OSError:
        return True
    st = os.stat(path)
    return flags == 0 and (mtime, size) != (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)

files = {getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}
files = sorted(f for f in files if f.endswith(".py") and os.path.isabs(f))
print(json.dumps({"modules": len(files), "without_bytecode": [f for f in files if stale(f)]}))
"""


def test_the_stack_starts_from_bytecode_without_compiling_sources(image: str) -> None:
    res = sh(*RUN, "--rm", "--entrypoint", "python", image, "-c", BYTECODE_CHECK, timeout=300)
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["modules"] > 1000  # torch, transformers, llamafactory and the rest were imported
    assert found["without_bytecode"] == []


# A new volume's first check: the schema the image's build baked (FT_BAKED_CACHE), not LlamaFactory's
# import (4.6 s in this image without it; docs/benchmarks.md).
BAKED_CHECK = """
import json, sys
from ft_appliance.preflight.gate import schema_and_templates
schema, templates = schema_and_templates()
imported = "llamafactory.hparams" in sys.modules
print(json.dumps({"imported": imported, "fields": len(schema), "templates": len(templates)}))
"""


def test_a_new_volumes_first_check_reads_the_baked_schema(image: str) -> None:
    res = sh(*RUN, "--rm", "-e", "HF_HOME=/tmp/new-volume", "--entrypoint", "python", image, "-c", BAKED_CHECK)
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["imported"] is False
    assert found["fields"] > 200 and found["templates"] > 10


def test_no_gpu_visible_says_add_gpus_all(volume: str) -> None:
    cfg, _ = demo_layout(volume, 10, 5, "nogpu")
    res = sh(*RUN, "-v", f"{volume}:/data", IMAGE, "train", cfg, check=False)
    assert res.returncode == 4
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no GPU visible: run the container with --gpus all" in lines[0]


def test_read_only_volume_is_refused_before_training(volume: str) -> None:
    cfg, _ = demo_layout(volume, 10, 5, "ro")
    res = sh(*RUN, "-v", f"{volume}:/data:ro", IMAGE, "train", cfg, "--nproc", "2", check=False)
    assert res.returncode == 8, res.stderr
    assert "is not writable by this user" in res.stderr


def test_full_output_volume_is_refused_before_training(volume: str) -> None:
    cfg, _ = demo_layout(volume, 10, 5, "full")
    # A 1 MiB output volume, writable by the container's user: not room for one checkpoint.
    tiny = "type=tmpfs,destination=/data/output/full,tmpfs-size=1048576,tmpfs-mode=1777"
    res = sh(*RUN, "-v", f"{volume}:/data", "--mount", tiny, IMAGE, "train", cfg, "--nproc", "2", check=False)
    assert res.returncode == 8, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "free on the output volume but one checkpoint needs about" in lines[0]


def test_demo_trains_in_the_container_and_files_belong_to_its_user(volume: str) -> None:
    res = sh(
        *RUN, "-v", f"{volume}:/data", IMAGE, "demo", "/data", "--max-steps", "10", "--save-steps", "5", timeout=300
    )
    assert "finished: 10/10 steps in /data/output/demo-lora" in res.stdout
    out = mountpoint(volume) / "output" / "demo-lora"
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    owners = {p.stat().st_uid for p in out.rglob("*")}
    assert owners == {1000}


def _detached(volume: str, name: str, *args: str) -> None:
    sh(*RUN, "-d", "--name", name, "-v", f"{volume}:/data", IMAGE, *args)


def _exit_code(name: str) -> int:
    return int(sh("docker", "inspect", name, "--format", "{{.State.ExitCode}}").stdout)


def _resumed_from(out: Path, attempt: int) -> str | None:
    from ft_appliance.state.layout import StateDir, read_record
    from ft_appliance.state.records import RunFile

    run = read_record(StateDir(out).run_file(attempt), RunFile)
    return Path(run.resume_from).name if run and run.resume_from else None


def test_docker_kill_then_start_resumes_from_newest_complete(volume: str) -> None:
    cfg, out = demo_layout(volume, 150, 10, "kill")
    name = f"{volume}-kill"
    _detached(volume, name, "train", cfg, "--nproc", "2")
    wait_for(lambda: last_step(out) >= 25, 180, what="step 25")
    sh("docker", "kill", name)
    killed_at = last_step(out)
    sh("docker", "start", "-a", name, timeout=600)
    assert _exit_code(name) == 0
    marked = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/.ft-complete.json"))
    resumed = _resumed_from(out, 2)
    assert resumed is not None and int(resumed.split("-")[1]) in marked
    assert killed_at - int(resumed.split("-")[1]) <= 10 + 1
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 150


def test_docker_stop_saves_a_checkpoint_with_zero_lost_steps(volume: str) -> None:
    cfg, out = demo_layout(volume, 120, 100, "stop")
    name = f"{volume}-stop"
    _detached(volume, name, "train", cfg, "--nproc", "2")
    wait_for(lambda: last_step(out) >= 13, 180, what="step 13")
    health = sh("docker", "exec", name, "ft-appliance", "health")  # what the image's HEALTHCHECK runs
    assert "training step" in health.stdout
    sh("docker", "stop", "-t", "60", name, timeout=120)
    assert _exit_code(name) == 143
    stopped = json.loads((out / ".ft" / "stopped.json").read_text())
    s = stopped["step"]
    assert (out / f"checkpoint-{s}" / ".ft-complete.json").exists() and last_step(out) == s
    sh("docker", "start", "-a", name, timeout=600)
    assert _exit_code(name) == 0
    assert _resumed_from(out, 2) == f"checkpoint-{s}"
    assert [r["step"] for r in steps_in(out) if r["attempt"] == 2][0] == s + 1


def test_a_second_container_on_a_live_run_is_refused_and_the_first_trains_on(volume: str) -> None:
    """Two containers on one volume (a `docker run` beside a compose service): both entrypoints run
    under the same small pid, on different hosts; the kernel's lock on the shared volume decides."""
    cfg, out = demo_layout(volume, 400, 50, "owned")
    name = f"{volume}-owner"
    _detached(volume, name, "train", cfg, "--nproc", "2")
    wait_for(lambda: last_step(out) >= 5, 180, what="step 5")
    res = sh(*RUN, "--rm", "-v", f"{volume}:/data", IMAGE, "train", cfg, "--nproc", "2", check=False)
    assert res.returncode == 10, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "/data/output/owned is in use by a live ft-appliance run (pid" in lines[0]
    before = last_step(out)
    wait_for(lambda: last_step(out) > before + 5, 120, what="the first run training on")
    sh("docker", "stop", "-t", "60", name, timeout=120)
    assert _exit_code(name) == 143
    numbers = [r["step"] for r in steps_in(out)]
    assert numbers == list(range(1, len(numbers) + 1))  # one writer


def _compose_file(tmp_path: Path, volume: str, cfg: str) -> Path:
    """The shipped compose.yaml with only what cannot run here changed: no GPU reservation (no NVIDIA
    toolkit), the test image, no network, the test's volume, a CPU process count."""
    spec = yaml.safe_load((REPO / "compose.yaml").read_text())
    svc = spec["services"]["ft-appliance"]
    svc.pop("deploy")
    svc.pop("build")
    svc["image"] = IMAGE
    svc["network_mode"] = "none"
    svc["ipc"] = "private"
    svc["volumes"] = [f"{volume}:/data"]
    svc["env_file"] = [str(REPO / "docker" / "ft.env.example")]
    svc["command"] = ["train", cfg, "--nproc", "2"]
    # This sandbox may not raise memlock beyond its own hard limit (a GPU server can): keep the key,
    # capped at what the engine here can grant.
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    if hard != resource.RLIM_INFINITY:
        svc["ulimits"]["memlock"] = hard
    spec["volumes"] = {volume: {"external": True}}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose is not installed")
def test_compose_restart_policy_recovers_from_a_killed_container(volume: str, tmp_path: Path) -> None:
    cfg, out = demo_layout(volume, 150, 10, "compose")
    compose = ["docker-compose", "-p", volume.replace("-", ""), "-f", str(_compose_file(tmp_path, volume, cfg))]
    sh(*compose, "up", "-d", timeout=120)
    try:
        cid = sh(*compose, "ps", "-q", "ft-appliance").stdout.strip()
        wait_for(lambda: last_step(out) >= 25, 180, what="step 25")
        # The container's main process dies (a host OOM kill, a crash): Docker's restart policy brings it back.
        pid = int(sh("docker", "inspect", cid, "--format", "{{.State.Pid}}").stdout)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            state = json.loads(sh("docker", "inspect", cid, "--format", "{{json .State}}").stdout)
            if state["Status"] == "exited" and state["ExitCode"] == 0:
                break
            time.sleep(1)
        restarts = int(sh("docker", "inspect", cid, "--format", "{{.RestartCount}}").stdout)
        assert restarts >= 1
        assert state["ExitCode"] == 0
        assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 150
        assert _resumed_from(out, 2) is not None
    finally:
        subprocess.run([*compose, "down"], capture_output=True, timeout=120)


def test_two_containers_with_host_networking_train_as_two_nodes_and_survive_a_docker_kill(volume: str) -> None:
    """The multi-node path in the image: two containers on one volume, each a node (LlamaFactory's
    NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT), their rendezvous and control channel on loopback."""
    cfg, out = demo_layout(volume, 120, 10, "nodes")
    port = 29000 + int(volume[-4:], 16) % 3000
    names = [f"{volume}-node{k}" for k in (0, 1)]
    for k, name in enumerate(names):
        env = ["-e", "NNODES=2", "-e", f"NODE_RANK={k}", "-e", "MASTER_ADDR=127.0.0.1", "-e", f"MASTER_PORT={port}"]
        sh("docker", "run", "--network", "host", "-d", "--name", name, *env, "-v", f"{volume}:/data", IMAGE,
           "train", cfg, "--nproc", "1", "--backoff", "0.2")  # fmt: skip
    wait_for(lambda: (out / "checkpoint-20" / ".ft-complete.json").exists() and last_step(out) >= 23, 300,
             what="step 23")  # fmt: skip
    sh("docker", "kill", names[1])  # a node's container dies; its restart policy would start it again
    sh("docker", "start", names[1])
    for name in names:
        assert int(sh("docker", "wait", name, timeout=600).stdout) == 0, sh("docker", "logs", name).stderr[-3000:]
    head = sh("docker", "logs", names[0]).stdout
    assert "nodes: node 0 of 2 (NNODES, NODE_RANK), static rendezvous at 127.0.0.1" in head
    assert "attempt 2: resuming from checkpoint-" in head and "finished: 120/120 steps" in head
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 120
