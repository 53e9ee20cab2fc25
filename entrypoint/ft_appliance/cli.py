"""ft-appliance: fine-tune with LlamaFactory on every GPU of the node, resuming after any crash.

The only module that knows about Click: it turns options into a Plan, hands it on, and maps the
domain errors of errors.py to one line and an exit code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import Plan, Rendezvous, RetryPolicy, Timeouts, build_plan, default_config
from .errors import ApplianceError, ConfigError, Stopped, exit_code_table

EPILOG = "Exit codes:\n\n\b\n" + exit_code_table()


def _echo_to(json_mode: bool) -> Callable[[str], None]:
    # With --json, stdout carries only the final JSON document; logs go to stderr.
    def echo(line: str) -> None:
        click.echo(line, err=json_mode)

    return echo


class ApplianceGroup(click.Group):
    """Turns domain errors into one line on stderr and their exit code; anything else is a bug and
    keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Stopped as exc:
            click.echo(f"ft-appliance: {exc.message}", err=True)
            ctx.exit(exc.exit_code)
        except ApplianceError as exc:
            click.echo(f"ft-appliance: error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)


@click.group(
    cls=ApplianceGroup,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="ft-appliance")
def cli() -> None:
    """Fine-tune LLMs with LlamaFactory under torchrun, with preflight checks and crash-resume.

    Reads a LlamaFactory YAML (unchanged), trains on every visible GPU, and after any crash
    resumes from the newest complete checkpoint. Checkpoints are never deleted.
    """


def supervisor_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--nproc",
            "--gpus",
            "nproc",
            type=click.IntRange(min=1),
            envvar=["FT_NPROC", "FT_GPUS"],
            show_envvar=True,
            help="Training processes (GPUs) on this node [default: every visible GPU].",
        ),
        click.option(
            "--max-restarts",
            type=click.IntRange(min=0),
            default=3,
            show_default=True,
            envvar="FT_MAX_RESTARTS",
            show_envvar=True,
            help="Restarts after crashes.",
        ),
        click.option(
            "--backoff",
            type=click.FloatRange(min=0),
            default=2.0,
            show_default=True,
            envvar="FT_BACKOFF_S",
            show_envvar=True,
            help="First restart wait in seconds (doubles).",
        ),
        click.option(
            "--crash-loop-limit",
            type=click.IntRange(min=1),
            default=3,
            show_default=True,
            envvar="FT_CRASH_LOOP_LIMIT",
            show_envvar=True,
            help="Failed attempts in a row at the same step that count as a crash loop.",
        ),
        click.option(
            "--stop-grace",
            type=click.FloatRange(min=0),
            default=120.0,
            show_default=True,
            envvar="FT_STOP_GRACE_S",
            show_envvar=True,
            help="Seconds to save a checkpoint after SIGTERM before training is killed.",
        ),
        click.option(
            "--hang-timeout",
            type=click.FloatRange(min=1),
            default=1800.0,
            show_default=True,
            envvar="FT_HANG_TIMEOUT_S",
            show_envvar=True,
            help="Seconds without a training step before the run counts as hung and restarts.",
        ),
        click.option(
            "--startup-timeout",
            type=click.FloatRange(min=1),
            default=3600.0,
            show_default=True,
            envvar="FT_STARTUP_TIMEOUT_S",
            show_envvar=True,
            help="Seconds allowed from launch to the first step.",
        ),
        click.option(
            "--nnodes",
            default="1",
            show_default=True,
            envvar="FT_NNODES",
            show_envvar=True,
            help="Nodes (N or MIN:MAX) for multi-node runs through torchrun's rendezvous.",
        ),
        click.option(
            "--rdzv-endpoint",
            envvar="FT_RDZV_ENDPOINT",
            show_envvar=True,
            help="host:port of the c10d rendezvous (multi-node).",
        ),
        click.option(
            "--rdzv-id",
            default="ft-appliance",
            show_default=True,
            envvar="FT_RDZV_ID",
            show_envvar=True,
            help="Rendezvous id shared by the nodes of one job.",
        ),
        click.option(
            "--workdir",
            type=click.Path(file_okay=False, path_type=Path),
            envvar="FT_WORKDIR",
            show_envvar=True,
            help="Working directory of the workers (relative paths in the YAML) [default: current directory].",
        ),
        click.option(
            "--no-profile",
            is_flag=True,
            envvar="FT_NO_PROFILE",
            show_envvar=True,
            help="Do not apply the default performance profile (Liger, neat packing, no needless "
            "gradient checkpointing); train exactly as the YAML says.",
        ),
        click.option(
            "--no-spare",
            is_flag=True,
            envvar="FT_NO_SPARE",
            show_envvar=True,
            help="Do not keep spare workers with the stack imported (one more process per GPU, idle) to "
            "take over after a crash; a restart then imports everything again.",
        ),
        click.option(
            "--no-autotune",
            is_flag=True,
            envvar="FT_NO_AUTOTUNE",
            show_envvar=True,
            help="Do not probe for the largest micro-batch that fits (GPU runs with the profile only).",
        ),
        click.option(
            "--keep-effective-batch",
            is_flag=True,
            envvar="FT_KEEP_EFFECTIVE_BATCH",
            show_envvar=True,
            help="When the GPU count differs from the run's start, adjust gradient_accumulation_steps "
            "so per_device x accumulation x processes stays the same.",
        ),
        click.option(
            "--inventory",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            envvar="FT_GPU_INVENTORY",
            show_envvar=True,
            help="Judge against a recorded GPU inventory (JSON from `check --json`) instead of NVML.",
        ),
        click.option(
            "--json",
            "json_mode",
            is_flag=True,
            envvar="FT_JSON",
            show_envvar=True,
            help="Print the result as JSON on stdout (logs go to stderr).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_plan(
    config: Path, overrides: tuple[str, ...], kw: dict[str, Any], default_nproc: int | None
) -> tuple[Plan, Any]:
    """Options -> Plan, with the GPU inventory that decided the process count (None on CPU)."""
    from .gate import recorded_inventory, resolve_gpu_plan
    from .hardware import read_nvml

    source = recorded_inventory(kw["inventory"]) if kw.get("inventory") else read_nvml
    nproc, inventory = resolve_gpu_plan(None, kw["nproc"] or default_nproc, source)
    plan = build_plan(
        config,
        overrides,
        nproc=nproc,
        workdir=kw["workdir"],
        retry=RetryPolicy(
            kw["max_restarts"], kw["backoff"], max(kw["backoff"], 60.0), kw["crash_loop_limit"], not kw.get("no_spare")
        ),
        timeouts=Timeouts(kw["stop_grace"], kw["hang_timeout"], kw["startup_timeout"]),
        rendezvous=Rendezvous(kw["nnodes"], 0, kw["rdzv_endpoint"], kw["rdzv_id"]),
    )
    return plan, inventory


def preflight(plan: Plan, inventory: Any, kw: dict[str, Any]) -> Plan:
    """Run every check; print decisions and warnings; stop on the first error with its exit code."""
    from .gate import check, raise_on_errors, world_size, write_run_meta

    echo = _echo_to(kw["json_mode"])
    result = check(plan, inventory, kw["keep_effective_batch"], profile=not kw["no_profile"])
    for p in result.report.problems:
        if p.severity == "warning":
            echo(f"[ft] warning: {p.message}")
    raise_on_errors(result)
    for note in result.report.notes:
        echo(f"[ft] {note}")
    write_run_meta(result.plan, world_size(result.plan))
    return result.plan


def maybe_init_volume(config: Path) -> None:
    """`docker run -v data:/data ft-appliance` on an empty volume: lay it out, say what goes where."""
    from .volume import init_volume, is_unset_up

    root = config.parent.parent
    if config.exists() or config != default_config() or not is_unset_up(root):
        return
    try:
        created = init_volume(root)
    except OSError as exc:
        raise ConfigError(f"{root} is not writable ({exc.strerror}): mount the volume read-write") from None
    what = f"laid out {', '.join(created)} in {root}; " if created else ""
    raise ConfigError(
        f"no config at {config}: {what}copy your model to {root}/models/, your dataset and dataset_info.json "
        f"to {root}/datasets/, and write {config} (start from {root}/configs/train.example.yaml; "
        f"see {root}/README.txt), then start again"
    )


def maybe_autotune(plan: Plan, inventory: Any, kw: dict[str, Any]) -> Plan:
    """On GPUs with the profile: find the largest micro-batch that fits with short real probes."""
    if inventory is None or kw["no_profile"] or kw["no_autotune"]:
        return plan
    import shutil
    from dataclasses import replace

    from .autotune import autotune
    from .gate import cache_dir, world_size
    from .statefiles import STEPS, read_jsonl, state_dir
    from .supervise import Shutdown, Supervisor

    echo = _echo_to(kw["json_mode"])
    shutdown = Shutdown()
    shutdown.install()

    def run_probe(probe: Plan) -> int | None:
        shutil.rmtree(probe.output_dir, ignore_errors=True)  # the appliance's own scratch, not a run
        try:
            Supervisor(probe, lambda _line: None, shutdown).run()
        except Stopped:
            raise
        except ApplianceError:
            return None  # out of memory (or another failure): this size does not fit
        peaks = [int(r.get("mem_reserved", 0)) for r in read_jsonl(state_dir(probe.output_dir) / STEPS)]
        return max(peaks, default=0) or None

    gpu = min(inventory.gpus, key=lambda g: g.memory_total_mib)
    updates, notes = autotune(
        plan, gpu.name, gpu.memory_total_mib * 2**20, world_size(plan), cache_dir() / "autotune.json", run_probe, echo
    )
    for note in notes:
        echo(f"[ft] {note}")
    return replace(plan, args={**plan.args, **updates})


def run_training(plan: Plan, json_mode: bool) -> None:
    from .supervise import Shutdown, Supervisor, summary_lines

    echo = _echo_to(json_mode)
    shutdown = Shutdown()
    shutdown.install()
    result = Supervisor(plan, echo, shutdown).run()
    for line in summary_lines(result):
        echo(f"[ft] {line}")
    if json_mode:
        click.echo(json.dumps(result.to_dict(), default=str))


@cli.command(epilog=EPILOG)
@click.argument(
    "config", type=click.Path(dir_okay=True, path_type=Path), envvar="FT_CONFIG", default=None, required=False
)
@click.argument("overrides", nargs=-1)
@supervisor_options
def train(config: Path, overrides: tuple[str, ...], **kw: Any) -> None:
    """Train from CONFIG, a LlamaFactory YAML, with optional key=value OVERRIDES.

    CONFIG defaults to /data/configs/train.yaml (or FT_CONFIG). The YAML is used unchanged, except
    that overwrite_output_dir is forced off and resume_from_checkpoint is chosen by the appliance:
    the newest complete checkpoint in output_dir. A finished run is reported and left alone.
    """
    config = config or default_config()
    maybe_init_volume(config)
    plan, inventory = make_plan(config, overrides, kw, None)
    plan = preflight(plan, inventory, kw)
    run_training(maybe_autotune(plan, inventory, kw), kw["json_mode"])


@cli.command(epilog=EPILOG)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("ft-demo"), required=False)
@click.option(
    "--max-steps", type=click.IntRange(min=1), default=30, show_default=True, help="Optimizer steps of the demo run."
)
@click.option(
    "--save-steps",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Checkpoint interval of the demo run.",
)
@supervisor_options
def demo(directory: Path, max_steps: int, save_steps: int, **kw: Any) -> None:
    """Build a tiny Llama, a dataset and a config under DIRECTORY and train it (CPU, offline).

    DIRECTORY (default ./ft-demo) gets the /data layout: configs/, datasets/, models/, output/.
    Runs 2 CPU processes unless --nproc says otherwise. Running it again resumes or reports the
    finished run; delete DIRECTORY/output to train from scratch.
    """
    from .demo import build_demo

    echo = _echo_to(kw["json_mode"])
    echo(f"[ft] building the demo layout in {directory.resolve()}")
    config = build_demo(directory, max_steps=max_steps, save_steps=save_steps)
    echo(f"[ft] config: {config}")
    plan, inventory = make_plan(config, (), kw, default_nproc=2)
    plan = preflight(plan, inventory, kw)
    run_training(maybe_autotune(plan, inventory, kw), kw["json_mode"])


@cli.command(epilog=EPILOG)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("ft-soak"), required=False)
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="FT_CONFIG",
    show_envvar=True,
    help="LlamaFactory YAML to soak (needs max_steps) [default: the demo config].",
)
@click.option(
    "--kills",
    type=click.IntRange(min=0),
    default=6,
    show_default=True,
    envvar="FT_SOAK_KILLS",
    show_envvar=True,
    help="SIGKILLs of the whole process tree (some timed to land in a save).",
)
@click.option(
    "--terms",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    envvar="FT_SOAK_TERMS",
    show_envvar=True,
    help="SIGTERMs (graceful stops).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    envvar="FT_SOAK_SEED",
    show_envvar=True,
    help="Seed of the random kill schedule.",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=5),
    default=60,
    show_default=True,
    help="Steps of the demo run (ignored with --config).",
)
@click.option(
    "--save-steps",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Checkpoint interval of the demo run (ignored with --config).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    envvar="FT_NPROC",
    show_envvar=True,
    help="Training processes.",
)
@click.option("--json", "json_mode", is_flag=True, envvar="FT_JSON", show_envvar=True, help="Print JSON.")
def soak(
    directory: Path,
    config: Path | None,
    kills: int,
    terms: int,
    seed: int,
    max_steps: int,
    save_steps: int,
    nproc: int,
    json_mode: bool,
) -> None:
    """Kill and stop a run at random, then compare it with an uninterrupted run of the same seed.

    Each SIGKILL takes down the supervisor and every training process (as `docker kill` or a host
    crash would) and a new `ft-appliance train` starts on the same output; each SIGTERM must save
    and lose no step. Checks: the newest complete checkpoint is always the one resumed, steps lost
    per kill never exceed save_steps, the run finishes at max_steps, and the final adapter equals
    the uninterrupted run's. Works in DIRECTORY (default ./ft-soak), which it does not clean.
    """
    from .config import read_yaml
    from .soak import SoakRunner, format_table

    echo = _echo_to(json_mode)
    directory = directory.resolve()
    if config is None:
        from .demo import build_demo

        config = build_demo(directory, max_steps=max_steps, save_steps=save_steps)
    args = read_yaml(config)
    if not isinstance(args.get("max_steps"), int) or args["max_steps"] < 5:
        raise ConfigError(f"{config}: soak needs a fixed max_steps (5 or more) to compare runs")
    runner = SoakRunner(config, directory / "soak", nproc, seed, lambda m: echo(f"[soak] {m}"))
    (directory / "soak").mkdir(parents=True, exist_ok=True)
    report = runner.run(kills, terms)
    for line in format_table(report):
        echo(line)
    if json_mode:
        click.echo(json.dumps(report.to_dict()))
    if not report.ok:
        raise ApplianceError("soak failed: " + "; ".join(report.failures))


@cli.command(epilog=EPILOG)
@click.argument(
    "config", type=click.Path(dir_okay=True, path_type=Path), envvar="FT_CONFIG", default=None, required=False
)
@click.argument("overrides", nargs=-1)
@supervisor_options
def check(config: Path, overrides: tuple[str, ...], **kw: Any) -> None:
    """Check CONFIG against the GPUs, the environment, the model and the data, without training.

    Runs exactly the checks `train` runs first and prints a report (or JSON with --json). Exits
    non-zero on any error, with the code of the first one (see the table below).
    """
    from .gate import check as run_check
    from .gate import describe_inventory, report_dict
    from .preflight import exit_code_for

    plan, inventory = make_plan(config or default_config(), overrides, kw, None)
    result = run_check(plan, inventory, kw["keep_effective_batch"], profile=not kw["no_profile"])
    if kw["json_mode"]:
        click.echo(json.dumps(report_dict(result), indent=1))
    else:
        click.echo(f"ft-appliance check: {plan.config_path}")
        click.echo(f"  {describe_inventory(inventory)}")
        click.echo(f"  processes: {plan.nproc} on this node, world size {result.report.world_size}")
        for note in result.report.notes:
            click.echo(f"  {note}")
        for p in result.report.problems:
            click.echo(f"  {p.severity:<7} {p.check:<20} {p.message}")
        warnings = sum(p.severity == "warning" for p in result.report.problems)
        click.echo(f"result: {len(result.report.errors)} error(s), {warnings} warning(s)")
    if result.report.errors:
        raise click.exceptions.Exit(exit_code_for(result.report.errors[0]))


@cli.command()
@click.argument("target", type=click.Path(path_type=Path), envvar="FT_CONFIG", default=None, required=False)
@click.option("--json", "json_mode", is_flag=True, envvar="FT_JSON", show_envvar=True, help="Print JSON.")
def status(target: Path, json_mode: bool) -> None:
    """Show the state of a run: TARGET is its output_dir or its config file."""
    from .config import read_yaml, resolve_output_dir
    from .supervise import load_status

    target = target or default_config()
    out = target
    if target.is_file():
        out = resolve_output_dir(read_yaml(target), Path.cwd())
    st = load_status(out)
    if st is None:
        raise ConfigError(f"no run state in {out}: it has not been trained by ft-appliance yet")
    if json_mode:
        click.echo(json.dumps(st, indent=1, sort_keys=True))
        return
    from .status import Progress, format_progress

    click.echo(f"{st['state']}: {st['output_dir']} (restarts {st['restarts']}, steps lost {sum(st['steps_lost'])})")
    if st.get("progress"):
        click.echo("  " + format_progress(Progress(**st["progress"])))


@cli.command()
@click.option(
    "--max-age",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    envvar="FT_HEALTH_MAX_AGE",
    show_envvar=True,
    help="Seconds a heartbeat stays fresh.",
)
def health(max_age: float) -> None:
    """Exit 0 while the supervisor's heartbeat is fresh (the image's HEALTHCHECK).

    Reads FT_HEARTBEAT_FILE. A finished or stopped run counts as healthy; a stale heartbeat means
    the supervisor itself is stuck (training hangs are handled by the hang watchdog).
    """
    import os
    import time

    from .statefiles import read_json

    path = os.environ.get("FT_HEARTBEAT_FILE")
    beat = read_json(Path(path)) if path else None
    if beat is None:
        raise ApplianceError(f"no heartbeat in {path or '(FT_HEARTBEAT_FILE is not set)'} yet")
    age = time.time() - float(beat.get("time", 0))
    if beat.get("state") not in ("finished", "stopped", "failed") and age > max_age:
        raise ApplianceError(f"heartbeat is {age:.0f} s old (state {beat.get('state')}): the supervisor is stuck")
    click.echo(f"{beat.get('state')} step {beat.get('step')} ({age:.0f} s ago)")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ft-appliance")
