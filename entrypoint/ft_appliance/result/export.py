"""`ft-appliance export`: a run's adapter merged into its base model for serving, through LlamaFactory's
own export path (export_model: safetensors shards, the tokenizer, the chat template), written to a new
folder on the volume. A ZeRO-3 checkpoint without consolidated weights is gathered first (DeepSpeed's
zero_to_fp32). Nothing of the run is changed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StateError
from ..state import checkpoints
from ..state.history import is_finished
from ..state.layout import StateDir, read_record_or_none
from ..state.records import RunFile

DTYPES = ("auto", "float32", "bfloat16", "float16")
# What a model folder carries besides its weights; copied beside weights gathered from ZeRO-3 shards.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")  # fmt: skip


@dataclass(frozen=True)
class ExportPlan:
    source: Path
    """The finished output_dir or the named checkpoint: the adapter, or the full weights."""
    dest: Path
    args: dict[str, Any]
    """The run's LlamaFactory args (its last attempt's run file)."""
    zero3_shards: bool
    """source holds only DeepSpeed ZeRO shards (global_stepN/), to be gathered first."""


def run_args(output_dir: Path) -> dict[str, Any]:
    sd = StateDir(output_dir)
    for n in reversed(sd.attempt_numbers()):
        run = read_record_or_none(sd.run_file(n), RunFile)
        if run is not None:
            return run.args
    raise StateError(f"{output_dir} holds no ft-appliance run (no readable .ft/attempts/*/run.json)")


def _source(output_dir: Path, checkpoint: str | None) -> Path:
    if checkpoint is None:
        if not is_finished(output_dir):
            done = [c.path.name for c in checkpoints.scan(output_dir) if c.complete]
            raise StateError(
                f"{output_dir} has not finished: name a checkpoint with --checkpoint "
                f"({', '.join(done) or 'none complete yet'}), or let the run finish"
            )
        return output_dir
    path = output_dir / checkpoint if not Path(checkpoint).is_absolute() else Path(checkpoint)
    complete, reason, _ = checkpoints.judge(path) if path.is_dir() else (False, "no such folder", False)
    if not complete:
        raise StateError(f"{path} cannot be exported: {reason}")
    return path


def plan_export(output_dir: Path, dest: Path | None, checkpoint: str | None) -> ExportPlan:
    source = _source(output_dir, checkpoint)
    dest = dest or output_dir / ("export" if checkpoint is None else f"export-{source.name}")
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest} exists and is not empty: export never overwrites; choose another DEST")
    has_weights = any((source / n).exists() for n in checkpoints.WEIGHT_FILES)
    zero3 = not has_weights and any(source.glob("global_step*"))
    if not has_weights and not zero3:
        raise StateError(f"{source} holds no adapter or model weights to export")
    return ExportPlan(source, dest, run_args(output_dir), zero3)


def export_args(plan: ExportPlan, model_dir: Path, dtype: str) -> dict[str, Any]:
    """export_model's arguments: the run's model, template and method, with the adapter when LoRA."""
    args = plan.args
    out: dict[str, Any] = {
        "model_name_or_path": str(model_dir),
        "template": args.get("template") or "default",
        "finetuning_type": args.get("finetuning_type", "lora"),
        "trust_remote_code": bool(args.get("trust_remote_code", False)),
        "export_dir": str(plan.dest),
        "export_size": 5,
        "export_device": "cpu",
        "infer_dtype": dtype,
    }
    if args.get("stage") == "rm":
        out["stage"] = "rm"
    if out["finetuning_type"] == "lora":
        out["adapter_name_or_path"] = str(plan.source)
        out["model_name_or_path"] = str(args["model_name_or_path"])
    return out


def untied(state: dict[str, Any]) -> dict[str, Any]:
    """One name per shared tensor (tied embeddings): safetensors refuses aliases, and transformers ties
    them again on load. The output head is the alias dropped."""
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(tensor.data_ptr(), []).append(name)
    keep = {sorted(names, key=lambda n: (n.startswith("lm_head"), n))[0] for names in groups.values()}
    return {name: t.contiguous() for name, t in state.items() if name in keep}


def gather_zero3(source: Path, into: Path) -> Path:
    """Consolidate a ZeRO-3 checkpoint's shards (DeepSpeed's own zero_to_fp32) into plain safetensors,
    with its config and tokenizer beside them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    into.mkdir(parents=True)
    state = get_fp32_state_dict_from_zero_checkpoint(str(source))
    save_file(untied(state), str(into / "model.safetensors"), metadata={"format": "pt"})
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, into / name)
    return into


def export(plan: ExportPlan, dtype: str) -> Path:
    from llamafactory.train.tuner import export_model

    plan.dest.mkdir(parents=True, exist_ok=True)
    gathered = None
    if plan.zero3_shards:
        gathered = gather_zero3(plan.source, plan.dest.with_name(f".{plan.dest.name}.zero3-gathered"))
    try:
        model_dir = gathered if gathered else plan.source
        export_model(export_args(plan, model_dir, dtype))
    finally:
        if gathered is not None:  # our own scratch copy, not a checkpoint of the run
            shutil.rmtree(gathered, ignore_errors=True)
    return plan.dest
