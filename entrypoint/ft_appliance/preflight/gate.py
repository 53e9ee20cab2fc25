"""Everything checked before a training process starts: read the facts, judge them (schema.py and
preflight.py), and fold the policy decisions into the Plan.

The GPU inventory comes from an InventorySource (NVML by default), so a recorded inventory of
another machine can be judged as well ("would this config fit on that box?").
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config.args import dataset_names, grad_accum, per_device
from ..config.plan import Plan
from ..errors import PreflightError
from ..state import files
from ..state.layout import StateDir, read_record_or_none, write_record
from ..state.records import ConfigRecord, RunMeta
from .checks import (
    SPECIAL_TOKEN_RE,
    Report,
    check_config_change,
    check_fp8_base,
    check_memory,
    check_model,
    check_template,
    exit_code_for,
    run_checks,
    settings_of,
    worst_exit_code,
)
from .facts import read_datasets, read_env, read_model
from .gpus import Inventory, InventorySource, inventory_from_dict
from .packages import missing_message, needs
from .schema import ArgSpec, check_args, load_schema


@dataclass
class GateResult:
    plan: Plan
    report: Report
    inventory: Inventory | None
    """None for a CPU run."""


def recorded_inventory(path: Path) -> InventorySource:
    def source() -> Inventory:
        return inventory_from_dict(json.loads(path.read_text()))

    return source


def _cache_name() -> str | None:
    """The schema cache's file name, keyed by the installed versions: reading the schema from
    LlamaFactory's dataclasses imports torch and transformers, seconds on every start."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"schema-llamafactory-{version('llamafactory')}-transformers-{version('transformers')}.json"
    except PackageNotFoundError:
        return None


def _cache_file() -> Path | None:
    name = _cache_name()
    return None if name is None else cache_dir() / name


def _baked_file() -> Path | None:
    """The copy the image's build wrote (FT_BAKED_CACHE, read-only): a new volume's first check reads
    it instead of importing LlamaFactory's arguments (4.3-6.0 s of the CLI's first start on the CI
    machine; on a fresh H200 machine that start took 9.3 s, not profiled). Only a file of the installed
    versions' name matches."""
    import os

    name = _cache_name()
    baked = os.environ.get("FT_BAKED_CACHE")
    return None if name is None or not baked else Path(baked) / name


def bake(directory: Path) -> Path:
    """Write the schema cache into `directory` (the image's build does, for FT_BAKED_CACHE)."""
    name = _cache_name()
    if name is None:
        raise RuntimeError("llamafactory or transformers is not installed: no schema to bake")
    path = directory / name
    files.write_json(path, _cache_record(load_schema(), template_tokens()))
    return path


def _cache_record(schema: dict[str, ArgSpec], templates: dict[str, set[str]]) -> dict:
    return {
        "schema": {k: {"kinds": sorted(v.kinds), "choices": list(v.choices)} for k, v in schema.items()},
        "templates": {k: sorted(v) for k, v in templates.items()},
    }


def _read_cache(path: Path | None) -> tuple[dict[str, ArgSpec], dict[str, set[str]]] | None:
    data = files.read_json(path) if path else None
    try:
        schema = {k: ArgSpec(k, frozenset(v["kinds"]), tuple(v["choices"])) for k, v in data["schema"].items()}
        return schema, {k: set(v) for k, v in data["templates"].items()}
    except (TypeError, KeyError, AttributeError):
        return None  # no cache yet, or a damaged one


def cache_dir() -> Path:
    """The appliance's caches (schema, autotune): FT_CACHE_DIR, else under HF_HOME (on the volume in
    the image), else ~/.cache/ft-appliance."""
    import os

    if os.environ.get("FT_CACHE_DIR"):
        return Path(os.environ["FT_CACHE_DIR"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "ft-appliance"
    return Path.home() / ".cache" / "ft-appliance"


def schema_and_templates() -> tuple[dict[str, ArgSpec], dict[str, set[str]]]:
    path = _cache_file()
    cached = _read_cache(path) or _read_cache(_baked_file())
    if cached is not None:
        return cached
    schema, templates = load_schema(), template_tokens()  # read again, and the cache rewritten
    if path is not None:
        try:
            files.write_json(path, _cache_record(schema, templates))
        except OSError:
            pass  # a read-only home only costs the import next time
    return schema, templates


def template_tokens() -> dict[str, set[str]]:
    """Template name -> the special tokens its slots and stop words use (LlamaFactory's registry)."""
    from llamafactory.data.template import TEMPLATES

    out: dict[str, set[str]] = {}
    for name, tpl in TEMPLATES.items():
        texts: list[str] = list(getattr(tpl, "stop_words", []) or [])
        for attr in ("format_user", "format_assistant", "format_system", "format_observation", "format_prefix"):
            fmt = getattr(tpl, attr, None)
            for slot in getattr(fmt, "slots", []) or []:
                if isinstance(slot, str):
                    texts.append(slot)
        out[name] = {m.group(0) for t in texts for m in SPECIAL_TOKEN_RE.finditer(t)}
    return out


def read_run_meta(output_dir: Path) -> RunMeta | None:
    return read_record_or_none(StateDir(output_dir).run_meta, RunMeta)


def write_run_meta(plan: Plan, world: int) -> None:
    """What the run started with, once (later starts compare against the first)."""
    path = StateDir(plan.output_dir).run_meta
    if path.exists():
        return
    a = plan.args
    ds = a.get("deepspeed")
    per, ga = per_device(a), grad_accum(a)
    write_record(path, RunMeta(world, per, ga, str(ds) if ds else None))


def world_size(plan: Plan) -> int:
    return plan.nproc * plan.topology.nnodes


def resolve_gpu_plan(
    nproc: int | None, source: InventorySource, cpu_fallback: int | None = None
) -> tuple[int, Inventory | None]:
    """Process count and inventory: every visible GPU unless --nproc; --nproc without GPUs is a CPU
    run, and so is a command with a CPU fallback (the demo) on a machine without GPUs."""
    inv = source()
    if inv.count == 0:
        nproc = nproc or cpu_fallback
        if nproc is None:
            raise PreflightError(
                "no GPU visible: run the container with --gpus all (docker) or a GPU reservation (compose); "
                "to train on CPU pass --nproc N, or try `ft-appliance demo`"
            )
        return nproc, None
    return (nproc or inv.count), inv


def check(
    plan: Plan,
    inventory: Inventory | None,
    keep_effective_batch: bool = False,
    profile: bool = True,
    allow_config_change: bool = False,
    fp8_base: bool = False,
) -> GateResult:
    args = plan.args
    schema, templates = schema_and_templates()
    report_problems = check_args(args, schema, str(plan.config_path))
    model = read_model(str(args.get("model_name_or_path", "")), plan.workdir, args.get("model_revision"))
    data_dir = Path(str(args.get("dataset_dir", "data")))
    if not data_dir.is_absolute():
        data_dir = plan.workdir / data_dir
    names = dataset_names(args)
    data = read_datasets(names, data_dir, str(args.get("stage", "sft"))) if names else None
    ds = args.get("deepspeed")
    ds_exists = None
    if isinstance(ds, str):
        ds_path = Path(ds) if Path(ds).is_absolute() else plan.workdir / ds
        ds_exists = ds_path.is_file()
    world = world_size(plan)
    report = run_checks(
        args,
        inventory=inventory,
        nproc=plan.nproc,
        world=world,
        env=read_env(plan.output_dir),
        model=model,
        data=data,
        templates=templates,
        previous=read_run_meta(plan.output_dir),
        keep_effective_batch=keep_effective_batch,
        deepspeed_exists=ds_exists,
    )
    report.problems[:0] = report_problems
    if fp8_base:
        check_fp8_base({**args, **report.updates}, inventory, profile, report)
    _config_change(plan, report, allow_config_change)
    _installation_and_layout(plan, model, report)
    tweaks: tuple[str, ...] = ()
    if profile and inventory is not None and inventory.count and not report.errors:
        tweaks = apply_profile(report, {**args, **report.updates}, inventory, model.config, world, fp8_base)
    new_plan = replace(plan, args={**plan.args, **report.updates}, notes=(*plan.notes, *report.notes), tweaks=tweaks)
    return GateResult(new_plan, report, inventory)


def check_model_files(plan: Plan, inventory: Inventory | None) -> None:
    """After a hub download: the checks that need the model's files, which preflight ran before they were
    here. Only these: the config, datasets and environment were judged already, and a big dataset is
    not parsed twice."""
    args = plan.args
    _, templates = schema_and_templates()
    model = read_model(str(args.get("model_name_or_path", "")), plan.workdir, args.get("model_revision"))
    report = Report()
    check_model(model, read_env(plan.output_dir), report)
    check_template(args, templates, model, report)
    if inventory is not None:
        check_memory(inventory, model, args, world_size(plan), report)
    raise_on_errors(GateResult(plan, report, inventory))


def _installation_and_layout(plan: Plan, model: Any, report: Report) -> None:
    """Findings about this machine and this deployment rather than the config's values."""
    args = plan.args
    resume = args.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume and (why := _resume_problem(resume, plan.workdir)):
        report.add("model.resume", f"resume_from_checkpoint {resume} {why}: fix the path or remove the key")
    if args.get("enable_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        report.add(
            "config.liger",
            "enable_liger_kernel needs liger-kernel, which is not installed here (the GPU "
            "image has it): remove enable_liger_kernel or run on the GPU image",
        )
    for need in needs(args, model.config):
        if not _installed(need.dist):
            report.add("env.package", missing_message(need))


def _config_change(plan: Plan, report: Report, allow: bool) -> None:
    """The settings the run last started with against these, once it has a checkpoint to resume."""
    from ..policy.checkpoints import choose_resume
    from ..state.checkpoints import scan

    previous = read_record_or_none(StateDir(plan.output_dir).config, ConfigRecord)
    chosen = choose_resume(scan(plan.output_dir)) if previous is not None else None
    resume_step = chosen.step if chosen is not None else None
    check_config_change(previous.settings if previous else None, plan.args, resume_step, allow, report)


def write_config_record(plan: Plan) -> None:
    """Recorded at every start that passed preflight: the next start compares against it."""
    write_record(StateDir(plan.output_dir).config, ConfigRecord(settings_of(plan.args), time.time()))


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(dist)
    except PackageNotFoundError:
        return False
    return True


def _resume_problem(raw: str, workdir: Path) -> str | None:
    from ..state.checkpoints import judge

    path = Path(raw) if Path(raw).is_absolute() else workdir / raw
    if not path.is_dir():
        return "does not exist" if not path.exists() else "is not a checkpoint folder"
    complete, reason, _ = judge(path)
    return None if complete else f"is not a complete checkpoint ({reason})"


def apply_profile(
    report: Report,
    args: dict[str, Any],
    inventory: Inventory,
    config: dict[str, Any] | None,
    world: int,
    fp8_base: bool = False,
) -> tuple[str, ...]:
    """Adds the profile's updates and notes to the report; returns the worker's tweaks."""
    from ..policy.profile import GpuFacts, performance_profile
    from .checks import estimate_gpu_bytes, estimate_params

    gpu = GpuFacts(
        compute_capability=min(g.compute_capability for g in inventory.gpus),
        memory_bytes=min(g.memory_total_mib for g in inventory.gpus) * 2**20,
        liger_available=importlib.util.find_spec("liger_kernel") is not None,
        flash_attn_available=importlib.util.find_spec("flash_attn") is not None,
        flex_available=_torch_has("nn/attention/flex_attention"),
    )
    params = estimate_params(config) if config else None
    weights = estimate_gpu_bytes(params, args, world)[0] if params else None
    chosen = performance_profile(args, gpu, config, weights, fp8_base)
    report.updates.update(chosen.updates)
    report.notes.extend(chosen.notes)
    return tuple(chosen.tweaks)


def _torch_has(module: str) -> bool:
    """Looks for one of torch's modules without importing torch (seconds) in the launcher."""
    spec = importlib.util.find_spec("torch")
    return bool(spec and spec.origin and (Path(spec.origin).parent / f"{module}.py").is_file())


def raise_on_errors(result: GateResult) -> None:
    errors = result.report.errors
    if not errors:
        return
    first = errors[0]
    more = f" (and {len(errors) - 1} more: run `ft-appliance check`)" if len(errors) > 1 else ""
    raise PreflightError(first.message + more, exit_code_for(first))


def describe_inventory(inv: Inventory | None) -> str:
    if inv is None:
        return "GPUs: none used (CPU run)"
    if inv.count == 0:
        return f"GPUs: none visible ({inv.error or 'no NVIDIA driver'})"
    kinds: dict[str, int] = {}
    for g in inv.gpus:
        key = f"{g.name} ({g.memory_total_mib / 1024:.0f} GiB, cc {g.compute_capability[0]}.{g.compute_capability[1]})"
        kinds[key] = kinds.get(key, 0) + 1
    gpus = ", ".join(f"{n} x {k}" for k, n in kinds.items())
    return f"GPUs: {gpus}; driver {inv.driver_version} (CUDA {inv.driver_cuda}); torch CUDA {inv.torch_cuda}"


def report_dict(result: GateResult) -> dict[str, Any]:
    errors = result.report.errors
    return {
        "config": str(result.plan.config_path),
        "ok": not errors,
        "exit_code": worst_exit_code(errors),
        "inventory": result.inventory.to_dict() if result.inventory else None,
        "nproc": result.plan.nproc,
        "world_size": result.report.world_size,
        "effective_batch": result.report.effective_batch,
        "decisions": result.report.notes,
        "tweaks": list(result.plan.tweaks),
        "updates": result.report.updates,
        "problems": [p.to_dict() for p in result.report.problems],
    }
