"""Which node of how many, from options and the conventions of LlamaFactory, Kubeflow, Kubernetes,
Slurm and SkyPilot: a table of environments and what each resolves to (or the line it is refused with)."""

from __future__ import annotations

import pytest
from ft_appliance.config.topology import Topology, first_slurm_host, resolve
from ft_appliance.errors import ConfigError

LF = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29611"}
PET = {"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}
SLURM = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "4242"}
SKY = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "10.1.0.5\n10.1.0.6\n"}
INDEXED = {"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "MASTER_ADDR": "ft-0.ft"}


@pytest.mark.parametrize(
    ("explicit", "env", "want"),
    [
        ({}, {}, (1, 0, "127.0.0.1", 29500, "static", "ft-appliance")),
        ({}, {"NODE_RANK": "0", "MASTER_ADDR": "x"}, (1, 0, "127.0.0.1", 29500, "static", "ft-appliance")),
        ({}, LF, (2, 1, "10.0.0.1", 29611, "static", "ft-appliance")),
        ({}, PET, (4, 3, "job-node-0-0.job", 29400, "static", "ft-appliance")),
        ({}, SLURM, (3, 2, "gpu07", 29500, "static", "4242")),
        ({}, SKY, (2, 0, "10.1.0.5", 29500, "static", "ft-appliance")),
        ({}, INDEXED, (2, 1, "ft-0.ft", 29500, "static", "ft-appliance")),
        # conventions that agree may overlap (Slurm running a LlamaFactory-style script)
        ({}, {**SLURM, "NNODES": "3", "NODE_RANK": "2"}, (3, 2, "gpu07", 29500, "static", "4242")),
        # explicit options win over every variable
        ({"node_rank": ("0", "--node-rank")}, LF, (2, 0, "10.0.0.1", 29611, "static", "ft-appliance")),
        ({"nnodes": ("2", "FT_NNODES"), "node_rank": ("1", "FT_NODE_RANK"), "master_addr": ("h", "FT_MASTER_ADDR")},
         {}, (2, 1, "h", 29500, "static", "ft-appliance")),
        # c10d: the endpoint is the rendezvous, the id names the job
        ({"rdzv_endpoint": ("head:29400", "--rdzv-endpoint"), "rdzv_id": ("job7", "--rdzv-id")},
         {"NNODES": "2", "NODE_RANK": "1"}, (2, 1, "head", 29400, "c10d", "job7")),
    ],
)  # fmt: skip
def test_resolves(explicit: dict, env: dict, want: tuple) -> None:
    t = resolve(explicit, env)
    assert (t.nnodes, t.node_rank, t.master_addr, t.master_port, t.backend, t.rdzv_id) == want


@pytest.mark.parametrize(
    ("explicit", "env", "needle"),
    [
        ({}, {"NNODES": "2", "SLURM_NNODES": "4"}, "two values for the nnodes (NNODES=2, SLURM_NNODES=4)"),
        ({}, {"NNODES": "2", "MASTER_ADDR": "h"}, "this node's rank is unknown: set NODE_RANK"),
        ({}, {"NNODES": "2", "NODE_RANK": "0"}, "no head address: set MASTER_ADDR"),
        ({}, {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "rank 2 from NODE_RANK is not below"),
        ({"nnodes": ("1:4", "--nnodes")}, {}, "elastic node counts are not supported"),
        ({}, {"NNODES": "two"}, "nnodes 'two' from NNODES is not a whole number"),
        ({"rdzv_endpoint": ("head", "FT_RDZV_ENDPOINT")}, {}, "'head' from FT_RDZV_ENDPOINT is not HOST:PORT"),
    ],
)  # fmt: skip
def test_refuses_in_one_line(explicit: dict, env: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve(explicit, env)
    assert needle in err.value.message and "\n" not in err.value.message


def test_the_banner_says_where_each_fact_came_from() -> None:
    t = resolve({"node_rank": ("1", "--node-rank")}, {**LF, "NODE_RANK": "0"})
    assert (
        t.describe()
        == "node 1 of 2 (--node-rank, NNODES), static rendezvous at 10.0.0.1:29611 (MASTER_ADDR, MASTER_PORT)"
    )
    assert Topology().head and not Topology().multi_node


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu07", "gpu07"), ("gpu[07-09]", "gpu07"), ("gpu[3,5-6],cpu1", "gpu3"), ("a1,a2", "a1"), ("n[10-11]", "n10")],
)
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first
