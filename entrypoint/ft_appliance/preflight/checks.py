"""Pure preflight judgement: facts in (GPU inventory, environment, model, datasets, config), findings
and policy decisions out. Nothing here touches a GPU, a file or a process.

Every finding is one line saying what is wrong and how to fix it; its check id's prefix decides the
exit code (config -> 3, gpu -> 4, env -> 8, model/data/template -> 9).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config.args import grad_accum, is_full, names, per_device, zero_stage
from ..errors import EXIT_CONFIG, EXIT_ENVIRONMENT, EXIT_INPUTS, EXIT_PREFLIGHT
from ..state.records import RunMeta
from .facts import DatasetFacts, EnvFacts, ModelFacts
from .gpus import Inventory
from .problems import Problem

GiB = 2**30
EXIT_BY_PREFIX = {
    "config": EXIT_CONFIG,
    "gpu": EXIT_PREFLIGHT,
    "env": EXIT_ENVIRONMENT,
    "model": EXIT_INPUTS,
    "data": EXIT_INPUTS,
    "template": EXIT_INPUTS,
}


def exit_code_for(problem: Problem) -> int:
    return EXIT_BY_PREFIX.get(problem.check.split(".", 1)[0], EXIT_PREFLIGHT)


# The order in which findings block a run, most basic first: a config that cannot be read hides
# everything after it, and a machine without GPUs is the last thing a laptop check should fail on.
WORST_FIRST = (EXIT_CONFIG, EXIT_INPUTS, EXIT_ENVIRONMENT, EXIT_PREFLIGHT)


def worst_exit_code(problems: list[Problem]) -> int:
    """`check`'s exit code: its most basic error's (config, then inputs, environment, GPUs); 0 for none."""
    codes = {exit_code_for(p) for p in problems if p.severity == "error"}
    return next((c for c in WORST_FIRST if c in codes), 0)


# Findings that only make sense for a CPU run: left out when `check` judges a GPU config on a machine
# without GPUs (a laptop), where the run itself will have them.
CPU_ONLY = frozenset({"config.cpu_precision", "config.liger", "config.cpu_zero2", "config.cpu_fp8"})


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    updates: dict[str, Any] = field(default_factory=dict)
    """Argument changes decided by policy (precision, gradient accumulation), each with a note."""
    notes: list[str] = field(default_factory=list)
    effective_batch: int | None = None
    world_size: int = 1

    def add(self, check: str, message: str, severity: str = "error") -> None:
        self.problems.append(Problem(check, message, severity))  # type: ignore[arg-type]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


# --- GPU and precision --------------------------------------------------------------------------


def check_fp8_base(args: Mapping[str, Any], inventory: Inventory | None, profile: bool, report: Report) -> None:
    """--fp8-base (worker/fp8.py): float8 matmuls for a bf16 LoRA run's frozen base, on GPUs that have them."""
    if inventory is None or not inventory.gpus:
        report.add("gpu.fp8", "--fp8-base needs GPUs with float8 matmuls (compute capability 8.9+): drop it on CPU")
        return
    weakest, cc = _weakest(inventory)
    if cc < (8, 9):
        report.add(
            "gpu.fp8",
            f"--fp8-base needs compute capability 8.9 or newer (Ada, Hopper) but {weakest} is "
            f"{cc[0]}.{cc[1]}: drop --fp8-base on these GPUs",
        )
    why = _fp8_base_conflict(args, profile)
    if why:
        report.add("config.fp8_base", f"--fp8-base {why}")


def _weakest(inv: Inventory) -> tuple[str, tuple[int, int]]:
    """The name and compute capability of the oldest card: what every feature check is judged by."""
    gpu = min(inv.gpus, key=lambda g: g.compute_capability)
    return gpu.name, gpu.compute_capability


def _fp8_base_conflict(args: Mapping[str, Any], profile: bool) -> str | None:
    if not profile:
        return "is part of the performance profile: drop --no-profile or --fp8-base"
    if args.get("finetuning_type", "lora") != "lora":
        return f"runs a LoRA run's frozen base in float8, not finetuning_type {args['finetuning_type']}: drop it"
    if args.get("quantization_bit") or args.get("fp8"):
        which = "quantization_bit" if args.get("quantization_bit") else "fp8: true"
        return f"and {which} both change the base's matmuls: keep one of them"
    if not args.get("bf16") or args.get("pure_bf16") or args.get("fp16"):
        return "computes in bf16 under autocast: set bf16: true (not fp16 or pure_bf16)"
    if args.get("deepspeed") or args.get("fsdp"):
        return "is for DDP runs (DeepSpeed and FSDP shard the base): drop deepspeed/fsdp or --fp8-base"
    return None


def choose_precision(cc: tuple[int, int], args: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Precision when the config leaves it open: bf16 from compute capability 8.0, else fp16."""
    if any(args.get(k) for k in ("bf16", "fp16", "pure_bf16")) or "bf16" in args or "fp16" in args:
        return {}, None
    if cc >= (8, 0):
        return {"bf16": True}, f"precision: bf16 (compute capability {cc[0]}.{cc[1]} supports it)"
    return {"fp16": True}, f"precision: fp16, since compute capability {cc[0]}.{cc[1]} has no bf16 (needs 8.0)"


def _version(v: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in (v or "").split(".")[:2])
    except ValueError:
        return ()


def check_gpus(inv: Inventory, nproc: int, args: Mapping[str, Any], report: Report) -> None:
    if inv.count == 0:
        report.add(
            "gpu.none",
            "no GPU visible: run the container with --gpus all (docker) or a GPU reservation "
            "(compose); to train on CPU pass --nproc N, or try `ft-appliance demo`",
        )
        return
    if nproc > inv.count:
        report.add(
            "gpu.count",
            f"{nproc} GPUs requested but {inv.count} visible: pass --nproc {inv.count} "
            f"or make more GPUs visible (--gpus all, CUDA_VISIBLE_DEVICES)",
        )
    names = sorted({g.name for g in inv.gpus})
    if len(names) > 1:
        report.add(
            "gpu.mixed",
            f"mixed GPU models ({', '.join(names)}): the slowest sets the pace and precision "
            "follows the weakest card; set CUDA_VISIBLE_DEVICES to one model",
            "warning",
        )
    _check_precision(inv, args, report)
    _check_features(inv, args, report)


def _check_precision(inv: Inventory, args: Mapping[str, Any], report: Report) -> None:
    weakest, cc = _weakest(inv)
    ccs = f"{cc[0]}.{cc[1]}"
    if args.get("bf16") is True or args.get("pure_bf16") is True:
        if cc < (8, 0):
            report.add(
                "gpu.bf16",
                f"bf16 needs compute capability 8.0 or newer but {weakest} is {ccs}: "
                "set fp16: true instead of bf16 (or remove both and let the appliance choose)",
            )
    else:
        updates, note = choose_precision(cc, args)
        if note:
            report.updates.update(updates)
            report.notes.append(note)
            if "fp16" in updates:
                report.add(
                    "gpu.precision", f"{weakest} (compute capability {ccs}) has no bf16: training in fp16", "warning"
                )


def _check_features(inv: Inventory, args: Mapping[str, Any], report: Report) -> None:
    """Attention kernels, FP8 and the driver against what torch was built for."""
    weakest, cc = _weakest(inv)
    ccs = f"{cc[0]}.{cc[1]}"
    attn = str(args.get("flash_attn", "auto"))
    if attn == "fa2" and cc < (8, 0):
        report.add(
            "gpu.flash_attn",
            f"FlashAttention-2 needs compute capability 8.0 or newer but {weakest} is {ccs}: set flash_attn: sdpa",
        )
    if attn == "fa3" and cc < (9, 0):
        report.add(
            "gpu.flash_attn",
            f"FlashAttention-3 needs compute capability 9.0 (Hopper) but {weakest} is "
            f"{ccs}: set flash_attn: fa2 or sdpa",
        )
    if args.get("fp8") and cc < (8, 9):
        report.add(
            "gpu.fp8", f"FP8 training needs compute capability 8.9 or newer but {weakest} is {ccs}: remove fp8: true"
        )
    drv, tch = _version(inv.driver_cuda), _version(inv.torch_cuda)
    if drv and tch and drv < tch:
        report.add(
            "gpu.driver",
            f"the NVIDIA driver {inv.driver_version} supports CUDA up to {inv.driver_cuda} "
            f"but torch was built for CUDA {inv.torch_cuda}: update the host driver, or build the image "
            f"for an older CUDA (docker build --build-arg TORCH_INDEX_URL=.../cu126)",
        )


def check_memory(inv: Inventory, model: ModelFacts, args: Mapping[str, Any], world: int, report: Report) -> None:
    params = estimate_params(model.config) if model.config else None
    if not params or inv.count == 0:
        return
    gpu_mem = min(g.memory_total_mib for g in inv.gpus) * 2**20
    need, what = estimate_gpu_bytes(params, args, world)
    if need > 0.95 * gpu_mem:
        full = is_full(args)
        fix = (
            "use ZeRO-3 (deepspeed: /data/configs/deepspeed/ds_z3_config.json) across more GPUs, or LoRA"
            if full
            else "use QLoRA (quantization_bit: 4) or ZeRO-3, and a shorter cutoff_len"
        )
        report.add(
            "gpu.memory",
            f"the model needs about {need / GiB:.0f} GiB per GPU ({what}) but "
            f"{inv.gpus[0].name} has {gpu_mem / GiB:.0f} GiB: {fix}",
        )
    elif need > 0.8 * gpu_mem:
        report.add(
            "gpu.memory",
            f"the model needs about {need / GiB:.0f} GiB of {gpu_mem / GiB:.0f} GiB per GPU "
            f"before activations ({what}): lower per_device_train_batch_size or cutoff_len if it "
            "runs out of memory",
            "warning",
        )


def estimate_params(config: Mapping[str, Any]) -> int | None:
    """Parameters of a decoder-only transformer from its config.json (Llama-style names)."""
    try:
        h = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        vocab = int(config["vocab_size"])
        inter = int(config.get("intermediate_size", 4 * h))
        heads = int(config.get("num_attention_heads", 1))
        kv = int(config.get("num_key_value_heads", heads))
    except (KeyError, TypeError, ValueError):
        return None
    head_dim = int(config.get("head_dim") or h // heads)
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * inter
    emb = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return emb + layers * (attn + mlp + 2 * h) + h


def estimate_gpu_bytes(params: int, args: Mapping[str, Any], world: int) -> tuple[float, str]:
    """Weights and optimizer state per GPU, activations left out (they depend on the batch)."""
    quant = args.get("quantization_bit")
    full = is_full(args)
    ds = str(args.get("deepspeed") or "")
    zero3 = zero_stage(args) == 3
    if not full:
        per = 0.5 if quant == 4 else 1.0 if quant == 8 else 2.0
        return params * per, f"{params / 1e9:.1f}B parameters, {'4-bit' if quant == 4 else 'bf16'} base"
    if zero3:
        return 16.0 * params / max(1, world), f"{params / 1e9:.1f}B parameters, full, ZeRO-3 over {world} GPUs"
    if ds:
        return 2.0 * params + 14.0 * params / max(1, world), f"{params / 1e9:.1f}B parameters, full, ZeRO-2"
    return 16.0 * params, f"{params / 1e9:.1f}B parameters, full, no ZeRO"


def estimate_checkpoint_bytes(params: int, args: Mapping[str, Any], config: Mapping[str, Any]) -> float:
    full = is_full(args)
    if full:
        return 14.0 * params  # bf16 weights + fp32 Adam moments
    r = int(args.get("lora_rank", 8) or 8)
    h = int(config.get("hidden_size", 0))
    inter = int(config.get("intermediate_size", 4 * h))
    layers = int(config.get("num_hidden_layers", 0))
    trainable = layers * r * (4 * 2 * h + 3 * (h + inter))
    return 12.0 * trainable + 50 * 2**20  # fp32 adapter + Adam moments, plus tokenizer and state files


# --- environment -------------------------------------------------------------------------------


def check_env(
    env: EnvFacts, args: Mapping[str, Any], model: ModelFacts, on_gpu: bool, nproc: int, report: Report
) -> None:
    if not env.output_writable:
        report.add(
            "env.volume",
            f"output_dir {env.output_dir} is not writable by this user "
            f"({env.output_error}): mount the volume read-write and give it to uid {env.uid} "
            "(docker run --user, or chown the volume)",
        )
    if env.shm_bytes is not None and nproc > 1:
        if env.shm_bytes < 256 * 2**20 and on_gpu:
            report.add(
                "env.shm",
                f"/dev/shm is {env.shm_bytes / 2**20:.0f} MiB, too small for {nproc} GPU "
                "processes (NCCL and data loaders use it): run with --ipc host or --shm-size 16g",
            )
        elif env.shm_bytes < GiB:
            report.add(
                "env.shm",
                f"/dev/shm is only {env.shm_bytes / 2**20:.0f} MiB: data loader workers may "
                "fail; run with --ipc host or --shm-size 16g",
                "warning",
            )
    if on_gpu and env.memlock_soft not in (None, -1) and env.memlock_soft < 64 * 2**20:
        report.add(
            "env.memlock",
            f"memlock ulimit is {env.memlock_soft // 1024} KiB: NCCL/RDMA may fail to pin "
            "memory; run with --ulimit memlock=-1",
            "warning",
        )
    if on_gpu and env.stack_soft not in (None, -1) and env.stack_soft < 8 * 2**20:
        report.add(
            "env.stack", f"stack ulimit is {env.stack_soft // 1024} KiB: run with --ulimit stack=67108864", "warning"
        )
    params = estimate_params(model.config) if model.config else None
    if env.output_free_bytes is not None and params:
        ckpt = estimate_checkpoint_bytes(params, args, model.config or {})
        limit = args.get("save_total_limit")
        kept = int(limit) + 1 if limit else None
        final = 2.0 * params if is_full(args) else ckpt / 3
        if env.output_free_bytes < ckpt + final:
            report.add(
                "env.disk",
                f"{env.output_free_bytes / GiB:.1f} GiB free on the output volume but one "
                f"checkpoint needs about {ckpt / GiB:.1f} GiB: free space or use a bigger volume",
            )
        elif kept and env.output_free_bytes < ckpt * kept + final:
            report.add(
                "env.disk",
                f"{env.output_free_bytes / GiB:.1f} GiB free, {kept} checkpoints need about "
                f"{ckpt * kept / GiB:.1f} GiB: lower save_total_limit or free space",
                "warning",
            )
        elif not kept:
            report.add(
                "env.disk", "save_total_limit is not set: every checkpoint is kept; set it to bound disk use", "info"
            )


# --- model, template, data ---------------------------------------------------------------------

SPECIAL_TOKEN_RE = re.compile(r"<\|[^<>|\s]+\|>|<(?:start|end)_of_turn>|</?s>")


def check_model(model: ModelFacts, env: EnvFacts, report: Report) -> None:
    if model.path is None:
        if env.hub_offline:
            report.add(
                "model.missing",
                f"model {model.name!r} is not a local directory and the hub is offline: "
                f"copy it to /data/models/{model.name.split('/')[-1]} and set model_name_or_path to that path",
            )
        else:
            report.add(
                "model.hub",
                f"model {model.name!r} is not in the cache yet: this node downloads it once before training "
                "(HF_TOKEN for gated models), then every rank loads it offline",
                "warning",
            )
        return
    if model.error:
        report.add(
            "model.missing",
            f"model directory {model.path} {model.error}: copy the model (config.json, "
            "weights, tokenizer) there or fix model_name_or_path",
        )
        return
    if model.config is None:
        report.add(
            "model.config",
            f"model directory {model.path} has no config.json: copy the whole model "
            "folder (config.json, *.safetensors, tokenizer files)",
        )
    if not model.weight_files:
        report.add(
            "model.weights",
            f"model directory {model.path} has no weights (*.safetensors or *.bin): copy the weight files too",
        )
    if not model.tokenizer_files:
        report.add(
            "model.tokenizer",
            f"model directory {model.path} has no tokenizer (tokenizer.json or "
            "tokenizer.model): copy the tokenizer files from the model's repository",
        )
    if model.weights_error:
        report.add(
            "model.weights",
            f"model directory {model.path}: {model.weights_error}: copy the weight files again (a download "
            "or copy was cut short)",
        )
    if model.tokenizer_error:
        report.add(
            "model.tokenizer",
            f"model directory {model.path}: {model.tokenizer_error}: copy the tokenizer files from the "
            "model's repository again",
        )


def check_template(
    args: Mapping[str, Any], templates: Mapping[str, set[str]], model: ModelFacts, report: Report
) -> None:
    name = args.get("template")
    if name is None:
        if args.get("stage", "sft") == "sft":
            report.add(
                "template.missing",
                "template is not set: set template to the model's chat format (llama3 for Llama 3, qwen for Qwen, ...)",
                "warning",
            )
        return
    if name not in templates:
        near = difflib.get_close_matches(str(name), list(templates), n=1)
        hint = f"did you mean {near[0]!r}?" if near else "see LlamaFactory's template list"
        report.add("template.unknown", f"template {name!r} does not exist in LlamaFactory: {hint}")
        return
    if model.vocab is None or args.get("resize_vocab"):
        return
    missing = sorted(t for t in templates[name] if t not in model.vocab)
    if missing:
        report.add(
            "template.tokens",
            f"template {name!r} uses {', '.join(missing)}, which the tokenizer in "
            f"{model.path} does not have (training would crash in the embedding): pick the model's own "
            "template, or set resize_vocab: true",
        )


# config.json keys of the models that take images, video or audio (LlamaFactory's multimodal ones).
MEDIA_CONFIG_KEYS = ("vision_config", "audio_config", "visual", "vision_tower", "mm_vision_tower", "image_token_id")


def check_datasets(args: Mapping[str, Any], data: DatasetFacts | None, report: Report, model: Any = None) -> None:
    if data is None:
        return
    config = getattr(model, "config", None)
    if isinstance(config, dict) and not any(k in config for k in MEDIA_CONFIG_KEYS):
        for name, media in data.media.items():
            report.add(
                "data.multimodal",
                f"dataset {name!r} has {', '.join(media)}, but {args.get('model_name_or_path')} is a text-only model "
                f"({config.get('model_type', 'its config')} has no vision or audio tower): it needs a multimodal model "
                "(Qwen2.5-VL, Qwen3-VL, LLaVA, ...) with its template, or a text dataset",
            )
    if data.info is None:
        report.add(
            "data.dir",
            f"dataset_dir {data.dataset_dir} {data.info_error}: put dataset_info.json and "
            "the dataset files there, or fix dataset_dir",
        )
        return
    for key in ("dataset", "eval_dataset"):
        for name in names(args.get(key)):
            if name not in data.info:
                near = difflib.get_close_matches(name, list(data.info), n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"add it to {data.dataset_dir}/dataset_info.json"
                report.add("data.unknown", f"{key} {name!r} is not in {data.dataset_dir}/dataset_info.json: {hint}")
            elif data.files.get(name):
                report.add("data.file", f"dataset {name!r}: {data.files[name]}: copy it into {data.dataset_dir}")


# --- config combinations LlamaFactory finds only after loading the model -----------------------


def fix_oft_under_ddp(args: Mapping[str, Any], world: int, report: Report) -> None:
    """OFT under DDP with LlamaFactory's default reentrant gradient checkpointing fails in the first
    backward ("Expected to mark a variable ready only once"), in plain LlamaFactory too: the reentrant
    checkpoint re-runs each OFT layer's forward inside backward, and DDP's reducer sees the rotation's
    parameters become ready twice. Non-reentrant checkpointing (torch's recommended kind) records no
    second forward, and training is otherwise the same. Applied only where the config leaves it open."""
    if args.get("finetuning_type") != "oft" or world < 2 or args.get("disable_gradient_checkpointing"):
        return
    if "use_reentrant_gc" in args:
        if args["use_reentrant_gc"]:
            why = "DDP marks OFT's parameters ready twice"
            message = f"finetuning_type: oft across processes fails with use_reentrant_gc: true ({why})"
            report.add("config.oft_ddp", message + ": set use_reentrant_gc: false", "warning")
        return
    report.updates["use_reentrant_gc"] = False
    report.notes.append(
        "use_reentrant_gc: false (OFT under DDP fails with reentrant gradient checkpointing: "
        '"Expected to mark a variable ready only once")'
    )


def check_combinations(args: Mapping[str, Any], report: Report, deepspeed_exists: bool | None) -> None:
    if not args.get("do_train"):
        report.add(
            "config.do_train",
            "do_train is not true: LlamaFactory would load everything and train nothing; set do_train: true",
        )
    if args.get("stage", "sft") != "pt" and "dataset" not in args:
        report.add("config.dataset", "no dataset is set: set dataset to a name from dataset_info.json")
    if args.get("bf16") and args.get("fp16"):
        report.add("config.precision", "bf16 and fp16 are both true: keep one")
    if args.get("quantization_bit") and is_full(args):
        report.add(
            "config.quantization",
            "quantization_bit needs finetuning_type: lora (QLoRA); full fine-tuning "
            "of a quantized model is not possible",
        )
    if args.get("quantization_bit") and zero_stage(args) == 3:
        report.add(
            "config.quantization",
            "QLoRA (quantization_bit) does not work with DeepSpeed ZeRO-3: use ZeRO-2 or no DeepSpeed",
            "warning",
        )
    if args.get("deepspeed") and deepspeed_exists is False:
        report.add(
            "config.deepspeed",
            f"deepspeed config {args['deepspeed']} does not exist: use "
            "/data/configs/deepspeed/ds_z2_config.json or ds_z3_config.json",
        )
    if args.get("neat_packing") and args.get("packing") is False:
        report.add(
            "config.packing",
            "neat_packing: true needs packing (it is packing that keeps examples apart): remove packing: false",
            "warning",
        )
    if "max_steps" not in args and "num_train_epochs" not in args:
        report.add(
            "config.length", "neither max_steps nor num_train_epochs is set: LlamaFactory trains 3 epochs", "info"
        )


# --- numeric ranges LlamaFactory and transformers never check up front ------------------------

# Keys that must be positive counts or rates -> what they count.
POSITIVE = {
    "per_device_train_batch_size": "examples per device per step",
    "per_device_eval_batch_size": "examples per device per evaluation step",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "cutoff_len": "tokens per example",
    "learning_rate": "the learning rate",
    "num_train_epochs": "epochs",
    "lora_rank": "the LoRA rank",
    "logging_steps": "steps between log lines",
    "preprocessing_num_workers": "tokenisation processes",
}
# Beyond this, a step count is a typo (10**30 overflows the Trainer's integer arithmetic).
MAX_STEPS_LIMIT = 10**9


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def check_values(args: Mapping[str, Any], report: Report) -> None:
    """Values that type-check but cannot train: zero or negative sizes, rates and step counts."""
    for key, what in POSITIVE.items():
        value = _number(args.get(key))
        if value is not None and value <= 0:
            report.add("config.value", f"{key} is {args[key]}, but {what} must be positive: set {key} to 1 or more")
    steps = _number(args.get("max_steps"))
    if steps is not None and (steps == 0 or steps < -1 or steps > MAX_STEPS_LIMIT):
        report.add(
            "config.value",
            f"max_steps is {args['max_steps']}: set a positive step count up to {MAX_STEPS_LIMIT:,} "
            "(or -1, or leave it out, to train num_train_epochs)",
        )
    for key in ("save_steps", "eval_steps"):
        value = _number(args.get(key))
        # transformers reads a value below 1 as a fraction of the run: 0 and negatives are neither.
        if value is not None and value <= 0:
            report.add("config.value", f"{key} is {args[key]}: set {key} to 1 or more steps (or a fraction 0 < x < 1)")
    ratio = _number(args.get("warmup_ratio"))
    if ratio is not None and not 0 <= ratio < 1:
        report.add("config.value", f"warmup_ratio is {args['warmup_ratio']}: set a fraction from 0 to below 1")
    limit = _number(args.get("save_total_limit"))
    if limit is not None and limit < 1:
        report.add("config.value", f"save_total_limit is {args['save_total_limit']}: keep at least 1 (or leave it out)")


# --- the config changed between starts --------------------------------------------------------

# A checkpoint cannot be loaded with another model, method or adapter shape.
BREAKS_CHECKPOINT = (
    "model_name_or_path",
    "stage",
    "finetuning_type",
    "lora_rank",
    "lora_alpha",
    "lora_target",
    "additional_target",
    "template",
    "quantization_bit",
    "quantization_method",
)
# On resume the saved optimizer and scheduler state win: LlamaFactory would ignore a new value.
# Refused too (rather than warned about), since the run would go on as if the change had been made.
IGNORED_ON_RESUME = ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay")
# Taken, but the resumed run is no longer the one that started: worth a line.
CHANGES_THE_RUN = (
    "dataset",
    "eval_dataset",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "cutoff_len",
    "packing",
    "neat_packing",
    "max_steps",
    "num_train_epochs",
    "seed",
)
TRACKED = BREAKS_CHECKPOINT + IGNORED_ON_RESUME + CHANGES_THE_RUN


def settings_of(args: Mapping[str, Any]) -> dict[str, Any]:
    """What the config fingerprint records: the tracked keys, as the run trains with them."""
    return {k: args.get(k) for k in TRACKED}


def check_config_change(
    previous: Mapping[str, Any] | None, args: Mapping[str, Any], resume_step: int | None, allow: bool, report: Report
) -> None:
    """Compare with the settings the run last started with; only matters once there is a checkpoint."""
    if previous is None or resume_step is None:
        return
    now = settings_of(args)
    hard = "error" if not allow else "warning"
    for key in TRACKED:
        before, after = previous.get(key), now.get(key)
        if before == after:
            continue
        change = f"{key} changed from {before!r} to {after!r} since this run's checkpoint-{resume_step}"
        if key in BREAKS_CHECKPOINT:
            report.add("config.change", f"{change}, which cannot load with it: restore {key}: {before!r}, or use a "
                       "new output_dir (--allow-config-change if you mean it)", hard)  # fmt: skip
        elif key in IGNORED_ON_RESUME:
            report.add("config.change", f"{change}, but the saved optimizer and scheduler state win on resume, so "
                       f"it would not take effect: restore {key}: {before!r}, or use a new output_dir to train with "
                       "it (--allow-config-change to resume anyway)", hard)  # fmt: skip
        else:
            report.add("config.change", f"{change}: the resumed run trains with the new value", "warning")
    steps = _number(args.get("max_steps"))
    if steps is not None and 0 < steps <= resume_step:
        report.add("config.change", f"max_steps {args['max_steps']} is not beyond this run's checkpoint-{resume_step}: "
                   "nothing would train; raise max_steps, or use a new output_dir", hard)  # fmt: skip


# --- effective batch and GPU-count changes ----------------------------------------------------


def check_batch(
    args: Mapping[str, Any], world: int, previous: RunMeta | None, keep_effective: bool, report: Report
) -> None:
    per = per_device(args)
    ga = grad_accum(args)
    report.world_size = world
    report.effective_batch = per * ga * world
    report.notes.append(
        f"effective batch {per * ga * world} = per_device_train_batch_size {per} x "
        f"gradient_accumulation_steps {ga} x {world} processes"
    )
    if previous is None or previous.world_size == world:
        return
    if previous.deepspeed and args.get("deepspeed"):
        report.add(
            "gpu.world_size",
            f"this run's checkpoints were written by {previous.world_size} processes "
            f"under DeepSpeed and resuming them needs the same count, not {world}: pass --nproc "
            f"{previous.world_size}, or start a new output_dir",
        )
        return
    before = previous.per_device_train_batch_size * previous.gradient_accumulation_steps * previous.world_size
    if not keep_effective:
        report.add(
            "gpu.world_size",
            f"the run started on {previous.world_size} processes and now has {world}: "
            f"the effective batch changes from {before} to {per * ga * world}; pass "
            "--keep-effective-batch to adjust gradient_accumulation_steps",
            "warning",
        )
        return
    if before % (per * world):
        report.add(
            "gpu.world_size",
            f"cannot keep the effective batch {before} on {world} processes with "
            f"per_device_train_batch_size {per} (not divisible): set the batch sizes by hand",
        )
        return
    new_ga = before // (per * world)
    report.updates["gradient_accumulation_steps"] = new_ga
    report.effective_batch = before
    report.notes.append(
        f"gradient_accumulation_steps {ga} -> {new_ga} to keep the effective batch {before} "
        f"on {world} processes (was {previous.world_size})"
    )


def check_cpu_run(args: Mapping[str, Any], nproc: int, report: Report) -> None:
    """What a GPU config asks for that a CPU run cannot give."""
    if any(args.get(k) for k in ("bf16", "fp16", "pure_bf16")):
        report.add(
            "config.cpu_precision",
            "bf16/fp16 mixed precision needs a GPU and this is a CPU run: remove "
            "bf16/fp16 from the config (or pass them as key=value only on GPU machines)",
        )
    if args.get("fp8"):
        report.add(
            "config.cpu_fp8",
            "FP8 training needs a GPU of compute capability 8.9 or newer (Ada, Hopper) and this is a CPU run: "
            "remove fp8: true (or pass fp8=true only on such GPUs)",
        )
    if zero_stage(args) == 2 and nproc > 1:
        report.add(
            "config.cpu_zero2",
            "DeepSpeed ZeRO-2 fails on CPU processes: its gradient all-gather over gloo modifies a view "
            'in place ("Output 0 of Split is a view and is being modified inplace"); on CPU use ZeRO-3 '
            "(ds_z3_config.json) or no deepspeed; ZeRO-2 runs on GPUs",
        )


def run_checks(
    args: Mapping[str, Any],
    *,
    inventory: Inventory | None,
    nproc: int,
    world: int,
    env: EnvFacts,
    model: ModelFacts,
    data: DatasetFacts | None,
    templates: Mapping[str, set[str]],
    previous: RunMeta | None = None,
    keep_effective_batch: bool = False,
    deepspeed_exists: bool | None = None,
) -> Report:
    """All checks; inventory None means a CPU run (no GPU checks)."""
    report = Report()
    check_combinations(args, report, deepspeed_exists)
    fix_oft_under_ddp(args, world, report)
    check_values(args, report)
    if inventory is None:
        check_cpu_run(args, nproc, report)
    if inventory is not None:
        check_gpus(inventory, nproc, args, report)
        check_memory(inventory, model, args, world, report)
    check_env(env, args, model, inventory is not None, nproc, report)
    check_model(model, env, report)
    check_template(args, templates, model, report)
    check_datasets(args, data, report, model)
    check_batch(args, world, previous, keep_effective_batch, report)
    return report
