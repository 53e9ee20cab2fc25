"""The shared option sets of the commands, each folded into a frozen dataclass: `check` takes the
preflight options, `train` and `demo` add the supervision options. Every option has an FT_* mirror,
shown in --help."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .config.plan import RetryPolicy, Timeouts
from .config.topology import Topology, resolve

# The node-layout options: option name -> (fact in config/topology.py, FT_* mirror).
TOPOLOGY_OPTIONS = {
    "nnodes": ("nnodes", "FT_NNODES"),
    "node_rank": ("node_rank", "FT_NODE_RANK"),
    "master_addr": ("master_addr", "FT_MASTER_ADDR"),
    "master_port": ("master_port", "FT_MASTER_PORT"),
    "rdzv_endpoint": ("rdzv_endpoint", "FT_RDZV_ENDPOINT"),
    "rdzv_id": ("rdzv_id", "FT_RDZV_ID"),
}


@dataclass(frozen=True)
class PreflightOptions:
    nproc: int | None = None
    cpu: bool = False
    workdir: Path | None = None
    nnodes: str | None = None
    node_rank: str | None = None
    master_addr: str | None = None
    master_port: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    topology_sources: tuple[tuple[str, str], ...] = ()
    """(option name, "--option" or its FT_* variable) for the node-layout options that were given."""
    no_profile: bool = False
    fp8_base: bool = False
    keep_effective_batch: bool = False
    allow_config_change: bool = False
    inventory: Path | None = None
    json_mode: bool = False

    def topology(self, env: Mapping[str, str]) -> Topology:
        """Options first, then the launchers' and schedulers' variables (config/topology.py)."""
        where = dict(self.topology_sources)
        explicit = {
            TOPOLOGY_OPTIONS[name][0]: (str(getattr(self, name)), where.get(name, "--" + name.replace("_", "-")))
            for name in TOPOLOGY_OPTIONS
            if getattr(self, name) is not None
        }
        return resolve(explicit, env)


@dataclass(frozen=True)
class RunOptions(PreflightOptions):
    max_restarts: int = 3
    backoff: float = 2.0
    crash_loop_limit: int = 3
    stop_grace: float = 120.0
    hang_timeout: float = 1800.0
    startup_timeout: float = 3600.0
    no_spare: bool = False
    no_autotune: bool = False
    sync_saves: bool = False
    metrics_port: int | None = None
    verbose: bool = False
    control_port: int | None = None
    join_timeout: float = 600.0

    def retry(self) -> RetryPolicy:
        # The backoff doubles from --backoff up to a minute (or --backoff itself when larger).
        return RetryPolicy(
            max_restarts=self.max_restarts,
            backoff_s=self.backoff,
            backoff_max_s=max(self.backoff, 60.0),
            crash_loop_limit=self.crash_loop_limit,
            spare=not self.no_spare,
        )

    def timeouts(self) -> Timeouts:
        return Timeouts(
            stop_grace_s=self.stop_grace, hang_s=self.hang_timeout, startup_s=self.startup_timeout,
            join_s=self.join_timeout,
        )  # fmt: skip


def _opt(*names: str, envvar: str | list[str], **kw: Any) -> Callable[[Callable], Callable]:
    return click.option(*names, envvar=envvar, show_envvar=True, **kw)


PREFLIGHT = [
    _opt(
        "--nproc",
        "--gpus",
        "nproc",
        type=click.IntRange(min=1),
        envvar=["FT_NPROC", "FT_GPUS"],
        help="Training processes (GPUs) on this node [default: every visible GPU].",
    ),
    _opt(
        "--cpu",
        is_flag=True,
        envvar="FT_CPU",
        help="Train on CPU processes even where GPUs are visible (--nproc of them; 2 for the demo, else 1).",
    ),
    _opt(
        "--workdir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="FT_WORKDIR",
        help="Working directory of the workers (relative paths in the YAML) [default: current directory].",
    ),
    _opt(
        "--nnodes",
        envvar="FT_NNODES",
        help="Nodes in the job [default: NNODES, PET_NNODES, SLURM_NNODES, SKYPILOT_NUM_NODES, else 1].",
    ),
    _opt(
        "--node-rank",
        envvar="FT_NODE_RANK",
        help="This node's rank, 0 on the head [default: NODE_RANK, PET_NODE_RANK, JOB_COMPLETION_INDEX, "
        "SLURM_NODEID, SKYPILOT_NODE_RANK].",
    ),
    _opt(
        "--master-addr",
        envvar="FT_MASTER_ADDR",
        help="The head node's address [default: MASTER_ADDR, PET_MASTER_ADDR, the first host of "
        "SLURM_JOB_NODELIST or SKYPILOT_NODE_IPS].",
    ),
    _opt(
        "--master-port",
        envvar="FT_MASTER_PORT",
        help="The head's rendezvous port [default: MASTER_PORT, PET_MASTER_PORT, 29500].",
    ),
    _opt(
        "--rdzv-endpoint",
        envvar="FT_RDZV_ENDPOINT",
        help="HOST:PORT of a c10d rendezvous (torchrun's dynamic one) instead of the static one at the head.",
    ),
    _opt(
        "--rdzv-id",
        envvar="FT_RDZV_ID",
        help="Rendezvous id shared by the nodes of one job [default: SLURM_JOB_ID, else ft-appliance].",
    ),
    _opt(
        "--no-profile",
        is_flag=True,
        envvar="FT_NO_PROFILE",
        help="Do not apply the default performance profile (Liger, neat packing, no needless "
        "gradient checkpointing); train exactly as the YAML says.",
    ),
    _opt(
        "--fp8-base",
        is_flag=True,
        envvar="FT_FP8_BASE",
        help="The FP8 profile (Hopper and Ada, compute capability 8.9+): a bf16 LoRA run's frozen base "
        "matmuls in float8, the LoRA path and the loss in bf16. Opt-in: it rounds the base's inputs.",
    ),
    _opt(
        "--keep-effective-batch",
        is_flag=True,
        envvar="FT_KEEP_EFFECTIVE_BATCH",
        help="When the GPU count differs from the run's start, adjust gradient_accumulation_steps "
        "so per_device x accumulation x processes stays the same.",
    ),
    _opt(
        "--allow-config-change",
        is_flag=True,
        envvar="FT_ALLOW_CONFIG_CHANGE",
        help="Resume even though settings changed since the run's checkpoint (a changed model, method or "
        "adapter shape then fails to load; a new learning rate or scheduler does not take effect).",
    ),
    _opt(
        "--inventory",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        envvar="FT_GPU_INVENTORY",
        help="Judge against a recorded GPU inventory (JSON from `check --json`) instead of NVML.",
    ),
    _opt(
        "--json",
        "json_mode",
        is_flag=True,
        envvar="FT_JSON",
        help="Print the result as JSON on stdout (logs go to stderr).",
    ),
]

SUPERVISION = [
    _opt(
        "--max-restarts",
        type=click.IntRange(min=0),
        default=3,
        show_default=True,
        envvar="FT_MAX_RESTARTS",
        help="Restarts after crashes.",
    ),
    _opt(
        "--backoff",
        type=click.FloatRange(min=0),
        default=2.0,
        show_default=True,
        envvar="FT_BACKOFF_S",
        help="First restart wait in seconds (doubles, up to a minute).",
    ),
    _opt(
        "--crash-loop-limit",
        type=click.IntRange(min=1),
        default=3,
        show_default=True,
        envvar="FT_CRASH_LOOP_LIMIT",
        help="Failed attempts in a row at the same step that count as a crash loop.",
    ),
    _opt(
        "--stop-grace",
        type=click.FloatRange(min=0),
        default=120.0,
        show_default=True,
        envvar="FT_STOP_GRACE_S",
        help="Seconds to save a checkpoint after SIGTERM before training is killed.",
    ),
    _opt(
        "--hang-timeout",
        type=click.FloatRange(min=1),
        default=1800.0,
        show_default=True,
        envvar="FT_HANG_TIMEOUT_S",
        help="Seconds without a training step, or a beat from evaluation or a save, before the run counts as hung.",
    ),
    _opt(
        "--startup-timeout",
        type=click.FloatRange(min=1),
        default=3600.0,
        show_default=True,
        envvar="FT_STARTUP_TIMEOUT_S",
        help="Seconds allowed from launch to the first step.",
    ),
    _opt(
        "--join-timeout",
        type=click.FloatRange(min=1),
        default=600.0,
        show_default=True,
        envvar="FT_JOIN_TIMEOUT_S",
        help="Multi-node: seconds the head waits for every node to join (before each attempt), and a node for a head.",
    ),
    _opt(
        "--control-port",
        type=click.IntRange(min=1, max=65535),
        envvar="FT_CONTROL_PORT",
        help="Multi-node: the head's port for the nodes' supervisors [default: the rendezvous port + 1].",
    ),
    _opt(
        "--no-spare",
        is_flag=True,
        envvar="FT_NO_SPARE",
        help="Do not keep spare workers with the stack imported (one more process per GPU, idle) to "
        "take over after a crash; a restart then imports everything again.",
    ),
    _opt(
        "--no-autotune",
        is_flag=True,
        envvar="FT_NO_AUTOTUNE",
        help="Do not time larger micro-batches at the first step (GPU runs with the profile only).",
    ),
    _opt(
        "--sync-saves",
        is_flag=True,
        envvar="FT_SYNC_SAVES",
        help="Write full fine-tuning checkpoints in the step instead of from host copies in the background.",
    ),
    _opt(
        "--metrics-port",
        type=click.IntRange(min=1, max=65535),
        envvar="FT_METRICS_PORT",
        help="Serve Prometheus metrics on this port at /metrics [default: off; the textfile "
        "output_dir/.ft/metrics.prom is always written].",
    ),
    _opt(
        "--verbose",
        "-v",
        is_flag=True,
        envvar="FT_VERBOSE",
        help="Stream everything the training processes print (LlamaFactory's INFO lines included); by "
        "default only their warnings and errors reach the console, and the rest goes to the attempt's log.",
    ),
]


def _topology_sources(values: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Where each given node-layout option came from: the command line or its FT_* variable."""
    ctx = click.get_current_context()
    out = []
    for name, (_, var) in TOPOLOGY_OPTIONS.items():
        if values.get(name) is not None:
            env = ctx.get_parameter_source(name) is click.core.ParameterSource.ENVIRONMENT
            out.append((name, var if env else "--" + name.replace("_", "-")))
    return tuple(out)


def _folded(cls: type, options: list[Callable]) -> Callable[[Callable], Callable]:
    """Adds the options to a command and hands them to it as one `opts` dataclass."""
    names = {f.name for f in dataclasses.fields(cls)}

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def command(**kw: Any) -> Any:
            values = {k: kw.pop(k) for k in list(kw) if k in names}
            if "topology_sources" in names:
                values["topology_sources"] = _topology_sources(values)
            opts = cls(**values)
            return f(opts=opts, **kw)

        for opt in reversed(options):
            command = opt(command)
        return command

    return decorate


preflight_options = _folded(PreflightOptions, PREFLIGHT)
run_options = _folded(RunOptions, PREFLIGHT + SUPERVISION)
