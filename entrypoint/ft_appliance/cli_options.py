"""The shared option sets of the commands, each folded into a frozen dataclass: `check` takes the
preflight options, `train` and `demo` add the supervision options. Every option has an FT_* mirror,
shown in --help."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .config.plan import Rendezvous, RetryPolicy, Timeouts


@dataclass(frozen=True)
class PreflightOptions:
    nproc: int | None = None
    cpu: bool = False
    workdir: Path | None = None
    nnodes: str = "1"
    rdzv_endpoint: str | None = None
    rdzv_id: str = "ft-appliance"
    no_profile: bool = False
    keep_effective_batch: bool = False
    allow_config_change: bool = False
    inventory: Path | None = None
    json_mode: bool = False

    def rendezvous(self) -> Rendezvous:
        return Rendezvous(nnodes=self.nnodes, endpoint=self.rdzv_endpoint, run_id=self.rdzv_id)


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
    metrics_port: int | None = None
    verbose: bool = False

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
        return Timeouts(stop_grace_s=self.stop_grace, hang_s=self.hang_timeout, startup_s=self.startup_timeout)


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
        default="1",
        show_default=True,
        envvar="FT_NNODES",
        help="Nodes (N or MIN:MAX) for multi-node runs through torchrun's rendezvous.",
    ),
    _opt("--rdzv-endpoint", envvar="FT_RDZV_ENDPOINT", help="host:port of the c10d rendezvous (multi-node)."),
    _opt(
        "--rdzv-id",
        default="ft-appliance",
        show_default=True,
        envvar="FT_RDZV_ID",
        help="Rendezvous id shared by the nodes of one job.",
    ),
    _opt(
        "--no-profile",
        is_flag=True,
        envvar="FT_NO_PROFILE",
        help="Do not apply the default performance profile (Liger, neat packing, no needless "
        "gradient checkpointing); train exactly as the YAML says.",
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
        help="Do not probe for the largest micro-batch that fits (GPU runs with the profile only).",
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


def _folded(cls: type, options: list[Callable]) -> Callable[[Callable], Callable]:
    """Adds the options to a command and hands them to it as one `opts` dataclass."""
    names = {f.name for f in dataclasses.fields(cls)}

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def command(**kw: Any) -> Any:
            opts = cls(**{k: kw.pop(k) for k in list(kw) if k in names})
            return f(opts=opts, **kw)

        for opt in reversed(options):
            command = opt(command)
        return command

    return decorate


preflight_options = _folded(PreflightOptions, PREFLIGHT)
run_options = _folded(RunOptions, PREFLIGHT + SUPERVISION)
