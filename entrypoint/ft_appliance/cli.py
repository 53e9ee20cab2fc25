"""ft-appliance: fine-tune with LlamaFactory on every GPU of the node, resuming after any crash.

The Click layer only: arguments and options in, app.py's steps called, domain errors (errors.py)
turned into one line and their exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .cli_options import PreflightOptions, RunOptions, preflight_options, run_options
from .config.plan import default_config
from .errors import ApplianceError, Stopped, exit_code_table

EPILOG = "Exit codes:\n\n\b\n" + exit_code_table()
CONFIG_ARG = click.argument(
    "config", type=click.Path(dir_okay=True, path_type=Path), envvar="FT_CONFIG", default=None, required=False
)


def _echo_to(json_mode: bool) -> Callable[[str], None]:
    # With --json, stdout carries only the final JSON document; logs go to stderr.
    from .console import Console

    return Console(click.get_text_stream("stderr" if json_mode else "stdout"))


class ApplianceGroup(click.Group):
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


def _run(config: Path, overrides: tuple[str, ...], opts: RunOptions, cpu_fallback: int | None = None) -> None:
    from . import app

    document = app.train_command(config, overrides, opts, _echo_to(opts.json_mode), cpu_fallback)
    if document is not None:
        click.echo(document)


@cli.command(epilog=EPILOG)
@CONFIG_ARG
@click.argument("overrides", nargs=-1)
@run_options
def train(config: Path | None, overrides: tuple[str, ...], opts: RunOptions) -> None:
    """Train from CONFIG, a LlamaFactory YAML, with optional key=value OVERRIDES.

    CONFIG defaults to /data/configs/train.yaml (FT_CONFIG). The YAML is used unchanged, except
    that overwrite_output_dir is forced off and resume_from_checkpoint is chosen by the appliance:
    the newest complete checkpoint in output_dir. A finished run is reported and left alone; a run
    that another supervisor owns is refused (exit 10).
    """
    from .app import maybe_init_volume

    config = config or default_config()
    maybe_init_volume(config)
    _run(config, overrides, opts)


@cli.command(epilog=EPILOG)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("ft-demo"), required=False)
@click.option(
    "--max-steps", type=click.IntRange(min=1), default=30, show_default=True, envvar="FT_DEMO_MAX_STEPS",
    show_envvar=True, help="Optimizer steps of the demo run.",
)  # fmt: skip
@click.option(
    "--save-steps", type=click.IntRange(min=1), default=10, show_default=True, envvar="FT_DEMO_SAVE_STEPS",
    show_envvar=True, help="Checkpoint interval of the demo run.",
)  # fmt: skip
@run_options
def demo(directory: Path, max_steps: int, save_steps: int, opts: RunOptions) -> None:
    """Build a tiny Llama, a dataset and a config under DIRECTORY and train it (offline).

    DIRECTORY (default ./ft-demo) gets the /data layout: configs/, datasets/, models/, output/.
    Trains on every visible GPU, or with 2 CPU processes where there is none or with --cpu
    (--nproc to choose how many).
    Running it again resumes or reports the finished run; delete DIRECTORY/output to train again.
    """
    from .tools.demo import build_demo

    echo = _echo_to(opts.json_mode)
    echo(f"[ft] building the demo layout in {directory.resolve()}")
    config = build_demo(directory, max_steps=max_steps, save_steps=save_steps)
    echo(f"[ft] config: {config}")
    _run(config, (), opts, cpu_fallback=2)


def _soak_count(flag: str, default: int, help: str) -> Callable[[Callable], Callable]:
    """How many of one fault the soak injects; its FT_SOAK_* mirror is named after the flag."""
    envvar = "FT_SOAK_" + flag.removeprefix("--").replace("-", "_").upper()
    return click.option(flag, type=click.IntRange(min=0), default=default, show_default=True, envvar=envvar,
                        show_envvar=True, help=help)  # fmt: skip


@cli.command(epilog=EPILOG)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("ft-soak"), required=False)
@click.option(
    "--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="FT_CONFIG",
    show_envvar=True, help="LlamaFactory YAML to soak (needs max_steps) [default: the demo config].",
)  # fmt: skip
@_soak_count("--kills", 6, "SIGKILLs of the whole process tree (some timed to land in a save).")
@_soak_count("--terms", 2, "SIGTERMs (graceful stops).")
@_soak_count("--supervisor-kills", 1, "SIGKILLs of the supervisor alone (its training processes must follow it).")
@_soak_count("--second-starts", 1, "Second starts on the live run (refused, exit 10), each followed by a SIGTERM.")
@_soak_count(
    "--config-changes", 1, "Whole-tree SIGKILLs followed by a restart with another lora_rank (refused, exit 3)."
)
@_soak_count("--hangs", 1, "SIGSTOPs of a rank: the supervisor must detect the hang and resume.")
@_soak_count("--disk-fulls", 0, "Volume fills during training (exit 8 in one line, then a resume once space is freed). "
             "The soaked run then lives on a tmpfs of --volume-mib (needs root).")  # fmt: skip
@click.option("--volume-mib", type=click.IntRange(min=32), default=128, show_default=True,
              envvar="FT_SOAK_VOLUME_MIB", show_envvar=True,
              help="Size of the tmpfs the soaked run lives on with --disk-fulls.")  # fmt: skip
@click.option("--save-total-limit", type=click.IntRange(min=0), default=1, show_default=True,
              envvar="FT_SOAK_SAVE_TOTAL_LIMIT", show_envvar=True,
              help="save_total_limit of the soaked run, so that kills land in rotations too (0: none).")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, envvar="FT_SOAK_SEED", show_envvar=True,
              help="Seed of the random kill schedule.")  # fmt: skip
@click.option("--max-steps", type=click.IntRange(min=5), default=60, show_default=True, envvar="FT_SOAK_MAX_STEPS",
              show_envvar=True, help="Steps of the demo run (ignored with --config).")  # fmt: skip
@click.option("--save-steps", type=click.IntRange(min=1), default=5, show_default=True, envvar="FT_SOAK_SAVE_STEPS",
              show_envvar=True, help="Checkpoint interval of the demo run (ignored with --config).")  # fmt: skip
@click.option("--nproc", type=click.IntRange(min=1), default=2, show_default=True, envvar="FT_NPROC",
              show_envvar=True, help="Training processes.")  # fmt: skip
@click.option("--json", "json_mode", is_flag=True, envvar="FT_JSON", show_envvar=True, help="Print JSON.")
def soak(directory: Path, config: Path | None, json_mode: bool, **runs: int) -> None:
    """Kill and stop a run at random, then compare it with an uninterrupted run of the same seed.

    Each SIGKILL takes down the supervisor and every training process (as `docker kill` or a host
    crash would) and a new `ft-appliance train` starts on the same output; each SIGTERM must save
    and lose no step. A supervisor killed alone must take its tree with it within 10 s, a second
    start on the live run is refused (exit 10), a restart with a changed lora_rank is refused
    (exit 3) before the real restart, and a filled volume ends in exit 8 and one line. Checks: the
    newest complete checkpoint is always the one resumed, steps lost per kill never exceed
    save_steps, the run finishes at max_steps, and the final adapter equals the uninterrupted
    run's. Works in DIRECTORY (default ./ft-soak), which it does not clean.
    """
    import json

    from .app import soak as run_soak

    echo = _echo_to(json_mode)
    table, report = run_soak(directory, config, runs, echo)
    for line in table:
        echo(line)
    if json_mode:
        click.echo(json.dumps(report.to_dict()))
    if not report.ok:
        raise ApplianceError("soak failed: " + "; ".join(report.failures))


@cli.command(epilog=EPILOG)
@CONFIG_ARG
@click.argument("overrides", nargs=-1)
@preflight_options
def check(config: Path | None, overrides: tuple[str, ...], opts: PreflightOptions) -> None:
    """Check CONFIG against the GPUs, the environment, the model and the data, without training.

    Runs exactly the checks `train` runs first and prints a report (or JSON with --json). Exits
    non-zero on any error, with the code of the first one (see the table below).
    """
    from .app import check as run_check

    text, code = run_check(config or default_config(), overrides, opts)
    click.echo(text)
    if code:
        raise click.exceptions.Exit(code)


@cli.command(epilog=EPILOG)
@click.argument("target", type=click.Path(path_type=Path), envvar="FT_CONFIG", default=None, required=False)
@click.option("--json", "json_mode", is_flag=True, envvar="FT_JSON", show_envvar=True, help="Print JSON.")
@click.option(
    "--watch", "watch", type=click.FloatRange(min=0.5), is_flag=False, flag_value=5.0, default=None,
    envvar="FT_STATUS_WATCH", show_envvar=True, help="Refresh every N seconds (5 when given alone) until Ctrl-C.",
)  # fmt: skip
def status(target: Path | None, json_mode: bool, watch: float | None) -> None:
    """Tell a run's whole story: TARGET is its output_dir or its config file (FT_CONFIG).

    The state (running, restarting, finished, stopped, crashed, gave up, supervisor gone), step/total,
    the latest loss, tokens/s and ETA, restarts and the steps they lost, every checkpoint with its
    verdict, and what the run produced. Reads only the folder, so it works on a copy from another
    machine too.
    """
    import time

    from .app import status as show
    from .app import status_target

    output_dir = status_target(target)
    while True:
        text = show(output_dir, json_mode)
        if watch is None:
            click.echo(text)
            return
        if not json_mode and os.isatty(1):
            click.clear()
        click.echo(text)
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


@cli.command(epilog=EPILOG)
@click.argument("output_dir", type=click.Path(path_type=Path), required=False)
@click.option(
    "--max-age", type=click.FloatRange(min=1), default=120.0, show_default=True, envvar="FT_HEALTH_MAX_AGE",
    show_envvar=True, help="Seconds a heartbeat stays fresh.",
)  # fmt: skip
def health(output_dir: Path | None, max_age: float) -> None:
    """Exit 0 while the supervisor's heartbeat is fresh (the image's HEALTHCHECK).

    Reads OUTPUT_DIR's own heartbeat (.ft/heartbeat.json) when given, else FT_HEARTBEAT_FILE. A
    finished or stopped run counts as healthy; a stale heartbeat means the supervisor itself is
    stuck (training hangs are handled by the hang watchdog).
    """
    from .app import health as read_health
    from .app import heartbeat_path

    click.echo(read_health(heartbeat_path(output_dir, os.environ.get("FT_HEARTBEAT_FILE")), max_age))


@cli.command(epilog=EPILOG)
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--checkpoint", envvar="FT_EXPORT_CHECKPOINT", show_envvar=True,
              help="Export this checkpoint (checkpoint-N) of an unfinished run.")  # fmt: skip
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, envvar="FT_EXPORT_DTYPE", show_envvar=True,
              help="Dtype of the exported weights (auto: LlamaFactory decides).")  # fmt: skip
@click.option("--json", "json_mode", is_flag=True, envvar="FT_JSON", show_envvar=True, help="Print JSON.")
def export(output_dir: Path, dest: Path | None, checkpoint: str | None, dtype: str, json_mode: bool) -> None:
    """Merge a run's LoRA adapter into its base model for serving, into DEST [default: OUTPUT_DIR/export].

    Uses LlamaFactory's own export (safetensors shards, tokenizer, chat template). Refuses an
    unfinished run unless --checkpoint names one, and a DEST that is not empty. A ZeRO-3 checkpoint
    is gathered into plain weights first. The run itself is left as it is.
    """
    import json

    from .app import export as run_export

    out = run_export(output_dir, dest, checkpoint, dtype, _echo_to(json_mode))
    files = sorted(p.name for p in out.iterdir())
    click.echo(json.dumps({"export_dir": str(out), "files": files}) if json_mode else f"exported: {out}")


@cli.command(epilog=EPILOG)
@click.argument("model")
@click.option("--revision", envvar="FT_REVISION", show_envvar=True, help="Branch, tag or commit [default: main].")
@click.option("--json", "json_mode", is_flag=True, envvar="FT_JSON", show_envvar=True, help="Print JSON.")
def pull(model: str, revision: str | None, json_mode: bool) -> None:
    """Stage hub MODEL in the volume's Hugging Face cache (HF_HOME) ahead of training.

    Resumable and retried with backoff; HF_TOKEN (environment or env file) for gated repos, never
    printed. A later `train` naming MODEL then finds it and trains offline.
    """
    from .app import pull as run_pull

    got = run_pull(model, revision, _echo_to(json_mode))
    if json_mode:
        import json

        click.echo(json.dumps({"repo": got.repo, "revision": got.revision, "path": str(got.path), "bytes": got.bytes}))
    else:
        click.echo(f"staged {got.repo}@{got.revision[:12]}: {got.files} files in {got.path}")


@cli.command(epilog=EPILOG)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), required=False)
def init(directory: Path | None) -> None:
    """Lay out a data volume in DIRECTORY [default: the volume of the default config, /data in the image].

    Creates configs/ (a commented example), datasets/ (dataset_info.json and a tiny example dataset),
    models/, output/ and README.txt. Never overwrites anything: a second run changes nothing.
    """
    from .app import init as lay_out

    for line in lay_out(directory or default_config().parent.parent):
        click.echo(line)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ft-appliance")
