"""The multi-node recipes in docker/recipes/: each validated against its schema where one exists here
(Kubernetes' own, strict; compose's through docker-compose; the sbatch script through shellcheck), and
each rendered: the variables its scheduler injects, plus the recipe's own, resolve to the node layout
the recipe means (config/topology.py, the code every node runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from ft_appliance.config.topology import resolve
from ft_appliance.errors import EXIT_CODES, EXIT_ENVIRONMENT, EXIT_OTHER

from tests.helpers import REPO

RECIPES = REPO / "docker" / "recipes"
K8S_VERSION = "1.33"


def docs(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def layout(env: dict[str, str]) -> tuple[int, int, str, int]:
    t = resolve({}, env)
    return t.nnodes, t.node_rank, t.master_addr, t.master_port


def test_indexed_job_validates_and_each_pod_is_its_index() -> None:
    found = docs(RECIPES / "k8s" / "indexed-job.yaml")
    for doc in found.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    job, svc, pvc = found["Job"], found["Service"], found["PersistentVolumeClaim"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    n = job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == n
    assert pod["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # a shared volume, or the nodes refuse
    head = f"{job['metadata']['name']}-0.{svc['metadata']['name']}"  # the head pod's DNS name
    for index in range(n):
        assert layout({**env_of(container), "JOB_COMPLETION_INDEX": str(index)}) == (n, index, head, 29500)
    ports = sorted(p["port"] for p in svc["spec"]["ports"])
    assert ports == [29500, 29501]  # the rendezvous, and the appliance's control channel (+1)


def test_indexed_job_retries_only_what_a_retry_can_fix() -> None:
    job = docs(RECIPES / "k8s" / "indexed-job.yaml")["Job"]
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    final = set(rule["onExitCodes"]["values"])
    retryable = {EXIT_OTHER, EXIT_ENVIRONMENT} | {c for c in EXIT_CODES if c > 128}
    assert rule["action"] == "FailIndex" and final == set(EXIT_CODES) - retryable - {0}


def test_trainjob_runs_the_appliance_on_the_runtimes_nodes() -> None:
    found = docs(RECIPES / "k8s" / "trainjob.yaml")
    runtime, job = found["ClusterTrainingRuntime"], found["TrainJob"]
    assert runtime["apiVersion"] == job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"  # Trainer v2's API
    ref = job["spec"]["runtimeRef"]
    assert (ref["apiGroup"], ref["kind"], ref["name"]) == (
        "trainer.kubeflow.org",
        "ClusterTrainingRuntime",
        "ft-appliance",
    )
    assert ref["name"] == runtime["metadata"]["name"]
    n = job["spec"]["trainer"]["numNodes"]
    assert runtime["spec"]["mlPolicy"]["numNodes"] == n and "torch" in runtime["spec"]["mlPolicy"]
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = replicated["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert replicated["name"] == container["name"] == "node" and container["command"] == ["ft-appliance", "train"]
    # The pod spec is plain Kubernetes: validated by its schema, inside a Pod.
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod},
                                 K8S_VERSION, strict=True)  # fmt: skip
    # What the Trainer's torch policy injects into node i's pod: PET_* (its head is node-0-0).
    for i in range(n):
        pet = {"PET_NNODES": str(n), "PET_NODE_RANK": str(i), "PET_MASTER_ADDR": "ft-train-node-0-0.ft-train",
               "PET_MASTER_PORT": "29400", "PET_NPROC_PER_NODE": "8"}  # fmt: skip
        assert layout(pet) == (n, i, "ft-train-node-0-0.ft-train", 29400)


def test_compose_recipe_validates_and_renders_one_node_per_server() -> None:
    path = RECIPES / "compose.two-nodes.yaml"
    spec = yaml.safe_load(path.read_text())
    (svc,) = spec["services"].values()
    assert svc["network_mode"] == "host" and spec["volumes"]["ft-shared"]["driver_opts"]["type"] == "nfs"
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (CI installs it)")

    def config(env: dict[str, str]) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR")}
        return subprocess.run(
            [compose, "-f", str(path), "config"], capture_output=True, text=True, env={**base, **env}, timeout=60
        )

    for rank in (0, 1):  # the compose file as compose itself reads it, variables substituted
        res = config({"NODE_RANK": str(rank), "MASTER_ADDR": "10.0.0.1", "FT_NFS_SERVER": "nfs.local"})
        assert res.returncode == 0, res.stderr
        (svc,) = yaml.safe_load(res.stdout)["services"].values()
        assert layout({k: str(v) for k, v in svc["environment"].items()}) == (2, rank, "10.0.0.1", 29500)
    res = config({"MASTER_ADDR": "10.0.0.1", "FT_NFS_SERVER": "nfs.local"})
    assert res.returncode != 0 and "set NODE_RANK" in res.stderr  # a forgotten rank is compose's own error


def test_slurm_script_is_clean_shell_and_each_task_resolves_its_node() -> None:
    script = RECIPES / "slurm.sbatch"
    shellcheck = Path(sys.executable).parent / "shellcheck"
    res = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    env = {"PATH": os.environ["PATH"], "FT_DATA": "/shared/ft", "FT_DRY_RUN": "1", **slurm}
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith("srun --ntasks-per-node=1") and "--network host" in line and "/shared/ft:/data" in line
    for var in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"):
        assert f"-e {var}" in line  # passed into the container, where the appliance reads them
    for node in (0, 1):  # srun sets SLURM_NODEID per task
        t = resolve({}, {**slurm, "SLURM_NODEID": str(node)})
        assert (t.nnodes, t.node_rank, t.master_addr, t.rdzv_id) == (2, node, "gpu07", "4242")
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**env, "FT_DATA": ""}, timeout=60)
    assert res.returncode != 0 and "set FT_DATA" in res.stderr
