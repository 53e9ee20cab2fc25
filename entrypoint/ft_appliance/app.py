"""Each command's steps, in the order of the data path: config -> Plan -> preflight -> own the run ->
supervise -> result. cli.py turns options into these calls and their errors into one line.

Heavy imports stay inside the functions, so `--help`, `status` and `health` never import torch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cli_options import PreflightOptions, RunOptions
from .config.plan import Plan, build_plan, default_config, read_yaml, resolve_output_dir
from .errors import EXIT_ENVIRONMENT, ApplianceError, ConfigError, PreflightError, StateError, Stopped
from .run.report import RunResult, artifacts, summary_lines
from .run.signals import Shutdown, ShutdownRequested
from .state.history import is_finished
from .state.layout import BadRecord, StateDir, read_record
from .state.records import Heartbeat, RunState

Echo = Callable[[str], None]


def make_plan(
    config: Path, overrides: tuple[str, ...], opts: PreflightOptions, cpu_fallback: int | None = None
) -> tuple[Plan, Any]:
    """Options -> Plan, with the GPU inventory that decided the process count (None on CPU)."""
    from .preflight.gate import recorded_inventory, resolve_gpu_plan
    from .preflight.gpus import read_nvml

    if opts.cpu:  # asked for: the GPUs are not looked at
        nproc, inventory = opts.nproc or cpu_fallback or 1, None
    else:
        source = recorded_inventory(opts.inventory) if opts.inventory else read_nvml
        nproc, inventory = resolve_gpu_plan(opts.nproc, source, cpu_fallback)
    run = opts if isinstance(opts, RunOptions) else RunOptions()
    plan = build_plan(
        config,
        overrides,
        nproc=nproc,
        workdir=opts.workdir,
        retry=run.retry(),
        timeouts=run.timeouts(),
        topology=opts.topology(os.environ),
    )
    return plan, inventory


def preflight(plan: Plan, inventory: Any, opts: PreflightOptions, echo: Echo) -> Plan:
    """Every check; print decisions and warnings once; stop on the first error with its exit code.
    Writes nothing: the run is not owned yet."""
    from .preflight.gate import check, raise_on_errors

    result = check(
        plan, inventory, opts.keep_effective_batch, not opts.no_profile, opts.allow_config_change, opts.fp8_base
    )
    for p in result.report.problems:
        if p.severity == "warning":
            echo(f"[ft] warning: {p.message}")
    raise_on_errors(result)
    for note in result.plan.notes:
        echo(f"[ft] {note}")
    return result.plan


def banner(plan: Plan, inventory: Any) -> str:
    """The start line: where it trains, in which precision, and into which folder."""
    args = plan.args
    precision = "bf16" if args.get("bf16") else "fp16" if args.get("fp16") else "fp32"
    if inventory is not None and inventory.gpus:
        names = sorted({g.name for g in inventory.gpus})
        where = f"{plan.nproc} GPU process(es) on {len(inventory.gpus)} x {', '.join(names)}"
    else:
        where = f"{plan.nproc} CPU process(es)"
    method = f"{args.get('stage', 'sft')}/{args.get('finetuning_type', 'lora')}"
    return f"start: {method} of {args.get('model_name_or_path')} on {where}, {precision}, into {plan.output_dir}"


def maybe_init_volume(config: Path) -> None:
    """`docker run -v data:/data ft-appliance` on an empty volume: lay it out, say what goes where."""
    from .tools.volume import init_volume, is_unset_up

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


def export(output_dir: Path, dest: Path | None, checkpoint: str | None, dtype: str, echo: Echo) -> Path:
    """Plan first (refusals cost nothing), then LlamaFactory's export; its errors become one line."""
    from .result.export import export as run_export
    from .result.export import plan_export

    plan = plan_export(output_dir.resolve(), dest.resolve() if dest else None, checkpoint)
    what = "gathering the ZeRO-3 shards of " if plan.zero3_shards else ""
    echo(f"[ft] export: {what}{plan.source} -> {plan.dest}")
    try:
        return run_export(plan, dtype)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ApplianceError(f"export failed: {type(exc).__name__}: {exc}") from None


def init(root: Path) -> list[str]:
    """`ft-appliance init [DIR]`: lay out a volume; what it created, one line each (none the second time)."""
    from .tools.volume import init_volume

    try:
        created = init_volume(root)
    except OSError as exc:
        raise ConfigError(f"{root} is not writable ({exc.strerror}): mount the volume read-write") from None
    if not created:
        return [f"{root} is laid out already: nothing changed"]
    return [f"created {root / name}" for name in created] + [f"next: read {root / 'README.txt'}"]


def pull(repo: str, revision: str | None, echo: Echo) -> Any:
    """`ft-appliance pull`: refused in one line where the hub is off (air-gapped use stays as it is)."""
    import os

    from .errors import EXIT_ENVIRONMENT
    from .preflight.facts import hub_offline
    from .stage.hub import pull as pull_repo

    if hub_offline(os.environ):
        raise PreflightError(
            f"cannot pull {repo}: the hub is off here (FT_OFFLINE=1 or HF_HUB_OFFLINE=1); unset it, or copy the "
            "model under /data/models", EXIT_ENVIRONMENT,
        )  # fmt: skip
    return pull_repo(repo, revision, lambda m: echo(f"[ft] {m}"), backoff_s=_hub_backoff())


def _hub_backoff() -> float:
    import os

    return float(os.environ.get("FT_HUB_BACKOFF_S", "2.0"))


def stage_hub(plan: Plan, inventory: Any, echo: Echo) -> Plan:
    """Hub models and hub datasets not yet in the volume's cache are downloaded here, once, by the run's
    owner; then the model checks run on the files, and every worker loads them offline."""
    import os

    from .preflight.facts import cached_snapshot, hub_id, hub_offline
    from .preflight.gate import check_model_files
    from .stage.datasets import cached, hub_datasets
    from .stage.datasets import stage as stage_datasets
    from .stage.hub import pull

    repo = hub_id(str(plan.args.get("model_name_or_path", "")), plan.workdir)
    revision = plan.args.get("model_revision")
    if repo is not None and cached_snapshot(repo, revision) is None:
        got = pull(repo, revision, _say(echo), backoff_s=_hub_backoff())
        echo(f"[ft] staged {repo}@{got.revision[:12]}: {got.files} files in {got.path}")
        check_model_files(plan, inventory)  # the model's own checks, now that its files are here
    from_hub = hub_datasets(plan.args, plan.workdir)
    missing = [ds for ds in from_hub if not cached(ds)]
    if missing and hub_offline(os.environ):
        raise PreflightError(
            f"dataset {missing[0].name!r} comes from the hub ({missing[0].repo}) and the hub is off here (FT_OFFLINE=1 "
            "or HF_HUB_OFFLINE=1): unset it for the first start, or copy the data files under /data/datasets and "
            "name them with file_name", EXIT_ENVIRONMENT,
        )  # fmt: skip
    if missing:
        stage_datasets(missing, plan.args, _say(echo), _hub_backoff())
    if repo is not None or from_hub:  # staged: the workers (and spares) inherit these and stay offline
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ[key] = "1"
    return plan


def maybe_autotune(plan: Plan, inventory: Any, opts: RunOptions, echo: Echo) -> Plan:
    """On GPUs with the profile: the workers time the micro-batches at their first step (worker/autotune.py)."""
    from .config.args import grad_accum, per_device
    from .policy.autotune import MIN_GAIN, cache_key, cached, sizes
    from .preflight.gate import cache_dir, world_size
    from .state import files
    from .state.records import AutotuneRequest

    args = plan.args
    if inventory is None or opts.no_profile or opts.no_autotune:
        return plan
    per, ga = per_device(args), grad_accum(args)
    # DeepSpeed and FSDP accumulate themselves; the other stages' trainers compute their own losses.
    own_loop = args.get("deepspeed") or args.get("fsdp") or args.get("stage", "sft") not in ("sft", "pt")
    if own_loop or len(sizes(per, ga)) == 1:
        return plan
    gpu = min(inventory.gpus, key=lambda g: g.memory_total_mib)
    cache = cache_dir() / "autotune.json"
    key = cache_key(args, gpu.name, world_size(plan), plan.tweaks)
    request = AutotuneRequest(str(cache), key, gpu.memory_total_mib * 2**20, per, ga)
    hit = cached(files.read_json(cache), key, per, ga)
    if hit is not None:
        echo(f"[ft] autotune: micro-batch {hit.micro} from the cache ({cache.name}, key {key}): {hit.reason}")
    else:
        echo(
            f"[ft] autotune: the workers time micro-batches of {', '.join(map(str, sizes(per, ga)))} at the first "
            f"step (the config's {per} first; a larger one is kept only when {MIN_GAIN:.0%} faster or more)"
        )
    return replace(plan, autotune=request)


def saves_policy(plan: Plan, opts: RunOptions, echo: Echo) -> Plan:
    """Full fine-tuning's checkpoints go to the background unless --sync-saves (policy/saves.py)."""
    from .policy.saves import why_not_background

    why_not = "--sync-saves" if opts.sync_saves else why_not_background(plan.args)
    if why_not is None:
        echo("[ft] saves: weights and optimizer copied to host memory in the step, written to disk in the background")
        return replace(plan, background_saves=True)
    if not opts.sync_saves and plan.args.get("finetuning_type", "lora") != "lora":
        echo(f"[ft] saves: written in the step ({why_not})")
    return plan


def train(plan: Plan, inventory: Any, opts: RunOptions, shutdown: Shutdown, echo: Echo) -> RunResult:
    """A finished run is reported before anything else runs; then preflight, ownership, supervision."""
    from .state import lock

    if is_finished(plan.output_dir):
        echo(
            f"[ft] {plan.output_dir} holds a finished run: nothing to do (results kept as they are; "
            f"to train again, choose a new output_dir)"
        )
        return RunResult(RunState.ALREADY_FINISHED, plan.output_dir, artifacts=artifacts(plan.output_dir))
    as_configured = plan  # the fingerprint compares configs, not the profile's or autotune's choices
    plan = preflight(plan, inventory, opts, echo)
    echo(f"[ft] {banner(plan, inventory)}")
    t = plan.topology
    if t.multi_node:
        echo(f"[ft] nodes: {t.describe()}")
    sd = StateDir(plan.output_dir)
    slot = t.node_rank if not t.head else None  # node K > 0 holds its slot; the head owns the run
    try:
        with lock.own(sd, plan.timeouts.stop_grace_s + 30, lambda m: echo(f"[ft] {m}"), node=slot):
            shutdown.check()
            if not t.head:
                return follow(plan, as_configured, opts, shutdown, echo)
            return lead(plan, as_configured, inventory, opts, shutdown, echo)
    except ShutdownRequested as exc:
        raise Stopped("stopped before training started; start again to train", exc.signum) from None


def lead(
    plan: Plan, as_configured: Plan, inventory: Any, opts: RunOptions, shutdown: Shutdown, echo: Echo
) -> RunResult:
    """The run's owner: a single node, or the head of a multi-node job."""
    from .preflight.gate import world_size, write_config_record, write_run_meta
    from .run import job as jobs
    from .run.loop import Supervisor

    plan = stage_hub(plan, inventory, echo)
    write_run_meta(plan, world_size(plan))
    write_config_record(as_configured)
    t = plan.topology
    if not t.multi_node:
        plan = maybe_autotune(plan, inventory, opts, echo)
    plan = saves_policy(plan, opts, echo)
    shutdown.check()
    job = None
    if t.multi_node:  # every node must have joined before the first launch
        port = jobs.control_port(t, opts.control_port)
        digest = jobs.config_hash(as_configured.args)
        job = jobs.lead(StateDir(plan.output_dir), t, digest, port, plan.timeouts.join_s, _say(echo), shutdown.check)
    try:
        sup = Supervisor(plan, echo, shutdown, metrics_port=opts.metrics_port, verbose=opts.verbose, job=job)
        return notified(sup, echo)
    finally:
        if job is not None:
            job.close()


def follow(plan: Plan, as_configured: Plan, opts: RunOptions, shutdown: Shutdown, echo: Echo) -> RunResult:
    """Node K > 0: join the head, then launch its part of each attempt the head writes."""
    from .run import job as jobs
    from .run.follower import Follower

    t = plan.topology
    port = jobs.control_port(t, opts.control_port)
    digest = jobs.config_hash(as_configured.args)
    sd = StateDir(plan.output_dir)

    def join() -> jobs.Job:
        joined = jobs.follow(sd, t, digest, port, plan.timeouts.join_s, _say(echo), shutdown.check)
        stage_hub_follower(plan)
        return joined

    return Follower(plan, join, echo, shutdown, verbose=opts.verbose).run()


def _say(echo: Echo) -> Echo:
    return lambda m: echo(f"[ft] {m}")


def stage_hub_follower(plan: Plan) -> None:
    """The head staged a hub model into the shared cache; this node loads it offline from there."""
    import os

    from .errors import EXIT_INPUTS
    from .preflight.facts import cached_snapshot, hub_id

    repo = hub_id(str(plan.args.get("model_name_or_path", "")), plan.workdir)
    if repo is None:
        return
    if cached_snapshot(repo, plan.args.get("model_revision")) is None:
        raise PreflightError(
            f"the head staged {repo}, but this node's HF_HOME ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) "
            "does not hold it: put HF_HOME on the shared volume of every node (the image's: /data/.cache/huggingface)",
            EXIT_INPUTS,
        )
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"


def notified(sup: Any, echo: Echo) -> RunResult:
    """Supervise, then tell FT_NOTIFY_URL how it ended (finished, stopped, gave up, crash loop, failed)."""
    import os

    from .errors import CrashLoop, RetriesExhausted, VolumeFull
    from .result.notify import Notice, notify

    def tell(event: str, message: str, code: int = 0) -> None:
        p = sup.status.progress()
        restarts, _ = sup.status.restarts()
        notice = Notice(
            event, str(sup.plan.output_dir), message, p.step if p else None, p.max_steps if p else None,
            p.loss if p else None, restarts, code,
        )  # fmt: skip
        notify(os.environ, notice, lambda m: echo(f"[ft] {m}"))

    try:
        result = sup.run()
    except Stopped as exc:
        tell("stopped", exc.message, exc.exit_code)
        raise
    except (CrashLoop, RetriesExhausted, VolumeFull) as exc:
        tell("crash_loop" if isinstance(exc, CrashLoop) else "gave_up", exc.message, exc.exit_code)
        raise
    except ApplianceError as exc:
        tell("failed", exc.message, exc.exit_code)
        raise
    tell("finished", f"finished: {result.step}/{result.max_steps} steps")
    return result


def train_command(
    config: Path, overrides: tuple[str, ...], opts: RunOptions, echo: Echo, cpu_fallback: int | None = None
) -> str | None:
    """`train` and `demo`: the summary lines, and the JSON document for --json (the CLI prints it)."""
    shutdown = Shutdown()
    shutdown.install()  # before anything slow: a stop during preflight ends it before any launch
    plan, inventory = make_plan(config, overrides, opts, cpu_fallback)
    result = train(plan, inventory, opts, shutdown, echo)
    for line in summary_lines(result):
        echo(f"[ft] {line}")
    return json.dumps(result.to_dict(), default=str) if opts.json_mode else None


def status_target(target: Path | None) -> Path:
    target = target or default_config()
    return resolve_output_dir(read_yaml(target), Path.cwd()) if target.is_file() else target


def status(output_dir: Path, json_mode: bool) -> str:
    """The run's whole story (result/story.py) as lines, or as JSON with the same fields."""
    from .result.story import read_story, story_lines

    try:
        story = read_story(output_dir)
    except BadRecord as exc:
        raise StateError(f"{exc}: it is rewritten by the next start; `ft-appliance train` to continue") from None
    if story is None:
        raise ConfigError(f"no run state in {output_dir}: it has not been trained by ft-appliance yet")
    if json_mode:
        return json.dumps(story.to_dict(), indent=1, sort_keys=True)
    return "\n".join(story_lines(story))


def heartbeat_path(target: Path | None, env_file: str | None) -> Path | None:
    """An output_dir's own heartbeat (.ft/heartbeat.json), else FT_HEARTBEAT_FILE."""
    if target is not None:
        return StateDir(target).heartbeat if target.is_dir() else target
    return Path(env_file) if env_file else None


def health(path: Path | None, max_age: float) -> str:
    """The HEALTHCHECK: fresh heartbeat, or a finished/stopped/failed run; anything else raises."""
    if path is None:
        raise ApplianceError("no heartbeat: give the run's output_dir, or set FT_HEARTBEAT_FILE")
    try:
        beat = read_record(path, Heartbeat)
    except BadRecord as exc:
        raise StateError(str(exc)) from None
    if beat is None:
        raise ApplianceError(f"no heartbeat in {path} yet")
    age = time.time() - beat.time
    if beat.state.live and age > max_age:
        raise ApplianceError(f"heartbeat is {age:.0f} s old (state {beat.state.value}): the supervisor is stuck")
    return f"{beat.state.value} step {beat.step} ({age:.0f} s ago)"


def check(config: Path, overrides: tuple[str, ...], opts: PreflightOptions) -> tuple[str, int]:
    """The preflight report (text or JSON) and the exit code of its first error."""
    from .errors import PreflightError
    from .preflight.checks import CPU_ONLY, worst_exit_code
    from .preflight.gate import check as run_check
    from .preflight.gate import describe_inventory, report_dict
    from .preflight.problems import Problem

    no_gpu = None
    try:
        plan, inventory = make_plan(config, overrides, opts)
    except PreflightError as exc:  # no GPU and no --nproc: one finding, and the config judged anyway
        no_gpu = Problem("gpu.none", exc.message)
        plan, inventory = make_plan(config, overrides, opts, cpu_fallback=1)
    result = run_check(
        plan, inventory, opts.keep_effective_batch, not opts.no_profile, opts.allow_config_change, opts.fp8_base
    )
    if no_gpu is not None:
        result.report.problems[:] = [no_gpu, *(p for p in result.report.problems if p.check not in CPU_ONLY)]
    code = worst_exit_code(result.report.problems)
    if opts.json_mode:
        return json.dumps(report_dict(result), indent=1), code
    lines = [
        f"ft-appliance check: {plan.config_path}",
        f"  {describe_inventory(inventory)}",
        f"  processes: {plan.nproc} on this node, world size {result.report.world_size}",
        *[f"  {note}" for note in result.report.notes],
        *[f"  {p.severity:<7} {p.check:<20} {p.message}" for p in result.report.problems],
    ]
    warnings = sum(p.severity == "warning" for p in result.report.problems)
    lines.append(f"result: {len(result.report.errors)} error(s), {warnings} warning(s)")
    return "\n".join(lines), code


def soak(directory: Path, config: Path | None, runs: dict[str, int], echo: Echo) -> tuple[list[str], Any]:
    """The soak's table lines and its report; a failed soak raises after the table is printed."""
    from .tools.soak import SoakRunner, format_table, small_volume

    directory = directory.resolve()
    if config is None:
        from .tools.demo import build_demo

        config = build_demo(directory, max_steps=runs["max_steps"], save_steps=runs["save_steps"])
    args = read_yaml(config)
    if not isinstance(args.get("max_steps"), int) or args["max_steps"] < 5:
        raise ConfigError(f"{config}: soak needs a fixed max_steps (5 or more) to compare runs")
    (directory / "soak").mkdir(parents=True, exist_ok=True)
    faults = {
        "SIGKILL": runs["kills"],
        "SIGTERM": runs["terms"],
        "SIGKILL-supervisor": runs["supervisor_kills"],
        "second-start": runs["second_starts"],
        "config-change": runs["config_changes"],
        "hang": runs["hangs"],
        "disk-full": runs["disk_fulls"],
    }
    with ExitStack() as stack:
        volume = None
        if runs["disk_fulls"]:
            try:  # only the mount is guarded: errors of the soak itself pass through
                volume = stack.enter_context(small_volume(directory / "soak" / "volume", runs["volume_mib"]))
            except OSError as exc:
                raise PreflightError(f"--disk-fulls: {exc}; run as root or pass --disk-fulls 0") from None
        runner = SoakRunner(
            config, directory / "soak", runs["nproc"], runs["seed"], lambda m: echo(f"[soak] {m}"), volume
        )
        report = runner.run(faults, runs["save_total_limit"] or None)
    return format_table(report), report
