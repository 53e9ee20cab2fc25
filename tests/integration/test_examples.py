"""LlamaFactory v0.9.5's 38 training examples (examples/, the ascend, ktransformers and megatron
folders aside), each as a config of the same shape: the example's own method keys with the tiny
model, a dataset of the same kind, its own output_dir, 2 steps and, where needed, the llama3 template
and no bf16 (a CPU run). These are the project's own configs, written from reading the examples;
LlamaFactory's files are not copied here. Through `ft-appliance train` on 2 CPU processes, every one
either trains or is refused before any launch in one line, with its reason and exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_cli, trainer_state, write_config

pytestmark = pytest.mark.slow

LORA = {"finetuning_type": "lora", "lora_rank": 8, "lora_target": "all"}
FULL = {"finetuning_type": "full", "lora_rank": None, "lora_target": None}
OFT = {"finetuning_type": "oft", "oft_block_size": 32, "oft_target": "all", "lora_rank": None, "lora_target": None}
Z0 = {"zero_optimization": {"stage": 0}}
Z3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
Z3_OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}}
QUANT4 = {"quantization_bit": 4, "quantization_method": "bnb", "double_quantization": False}

TRAINS = "trains"
BNB = (8, "quantization_bit (bnb) needs the bitsandbytes package")
TEXT_ONLY = (9, "is a text-only model")
# name: (the example's keys, the dataset kind, processes, expected: TRAINS or (exit code, the line's words))
CASES: dict[str, tuple[dict[str, Any], str, int, Any]] = {
    "extras/adam_mini": ({**FULL, "use_adam_mini": True}, "sft", 2, (8, "use_adam_mini needs the adam-mini package")),
    "extras/apollo": (
        {**FULL, "use_apollo": True, "apollo_layerwise": True, "apollo_target": "all", "apollo_rank": 16,
         "apollo_scale": 32.0, "apollo_scale_type": "channel"}, "sft", 1,
        (8, "use_apollo needs the apollo-torch package"),
    ),
    "extras/asft (llama2)": ({**FULL, "deepspeed": "z0", "use_asft_loss": True, "asft_alpha": 0.1}, "sft", 2, TRAINS),
    "extras/asft (qwen2)": ({**FULL, "deepspeed": "z0", "use_asft_loss": True, "asft_alpha": 0.05}, "sft", 2, TRAINS),
    "extras/badam": (
        {**FULL, "use_badam": True, "badam_mode": "layer", "badam_switch_mode": "ascending",
         "badam_switch_interval": 50, "badam_verbose": 2}, "sft", 2, (8, "use_badam needs the badam package"),
    ),
    "extras/dft": ({**FULL, "use_dft_loss": True}, "sft", 2, TRAINS),
    "extras/eaft": ({**FULL, "use_eaft_loss": True}, "sft", 2, TRAINS),
    "extras/fp8 (deepspeed)": (
        {**FULL, "fp8": True, "fp8_backend": "torchao", "fp8_enable_fsdp_float8_all_gather": False,
         "deepspeed": "z3_offload", "run_name": "fp8"}, "sft", 2,
        (3, "FP8 training needs a GPU of compute capability 8.9"),
    ),
    "extras/fp8 (fsdp)": (
        {**FULL, "fp8": True, "fp8_backend": "torchao", "fp8_enable_fsdp_float8_all_gather": True, "fsdp": None,
         "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "run_name": "fp8"}, "sft", 2,
        (3, "fsdp_transformer_layer_cls_to_wrap"),
    ),
    "extras/fsdp_qlora": ({**LORA, "quantization_bit": 4}, "sft", 2, BNB),
    "extras/galore": (
        {**FULL, "use_galore": True, "galore_layerwise": True, "galore_target": "all", "galore_rank": 16,
         "galore_scale": 2.0}, "sft", 1, (8, "use_galore needs the galore-torch package"),
    ),
    "extras/llama_pro": (
        {"finetuning_type": "freeze", "freeze_trainable_layers": 1, "freeze_trainable_modules": "all",
         "use_llama_pro": True, "lora_rank": None, "lora_target": None}, "sft", 2, TRAINS,
    ),
    "extras/loraplus": ({**LORA, "loraplus_lr_ratio": 16.0}, "sft", 2, TRAINS),
    "extras/mod": (
        {**FULL, "mixture_of_depths": "convert", "optim": "paged_adamw_8bit"}, "sft", 2,
        (8, "mixture_of_depths needs the mixture-of-depth package"),
    ),
    "extras/muon": ({**FULL, "use_muon": True}, "sft", 2, TRAINS),
    "extras/oft": (OFT, "sft", 2, TRAINS),
    "extras/oft (qwen2.5-vl)": (OFT, "mllm", 2, TEXT_ONLY),
    "extras/pissa": ({**LORA, "pissa_init": True, "pissa_iter": 16, "pissa_convert": True}, "sft", 2, TRAINS),
    "extras/qoft (awq)": (OFT, "sft", 2, (8, "a model quantized with AWQ needs the autoawq package")),
    "extras/qoft (bnb)": ({**OFT, **QUANT4}, "sft", 2, BNB),
    "extras/qoft (gptq)": (OFT, "sft", 2, (8, "a model quantized with GPTQ needs the gptqmodel package")),
    "train_full/qwen3 (ZeRO-3)": ({**FULL, "deepspeed": "z3"}, "sft", 2, TRAINS),
    "train_full/qwen3-vl": (
        {**FULL, "freeze_vision_tower": True, "freeze_multi_modal_projector": True, "freeze_language_model": False,
         "deepspeed": "z3"}, "mllm", 2, TEXT_ONLY,
    ),
    "train_lora/dpo": ({**LORA, "stage": "dpo", "pref_beta": 0.1, "pref_loss": "sigmoid"}, "pairs", 2, TRAINS),
    "train_lora/kto": ({**LORA, "stage": "kto", "pref_beta": 0.1}, "kto", 2, TRAINS),
    "train_lora/pretrain": ({**LORA, "stage": "pt"}, "pt", 2, TRAINS),
    "train_lora/reward": ({**LORA, "stage": "rm"}, "pairs", 2, TRAINS),
    "train_lora/sft": (LORA, "sft", 2, TRAINS),
    "train_lora/sft (ZeRO-3)": ({**LORA, "deepspeed": "z3"}, "sft", 2, TRAINS),
    "train_lora/sft (ray)": ({**LORA, "ray_num_workers": 4}, "sft", 2, TRAINS),
    "train_lora/preprocess": ({**LORA, "tokenized_path": "TOKENIZED"}, "sft", 2, TRAINS),
    "train_lora/qwen3-vl dpo": ({**LORA, "stage": "dpo", "pref_beta": 0.1}, "mllm-pairs", 2, TEXT_ONLY),
    "train_lora/qwen3-vl sft": (LORA, "mllm", 2, TEXT_ONLY),
    "train_qlora/aqlm": (LORA, "sft", 2, (8, "a model quantized with AQLM needs the aqlm package")),
    "train_qlora/awq": (LORA, "sft", 2, (8, "a model quantized with AWQ needs the autoawq package")),
    "train_qlora/gptq": (LORA, "sft", 2, (8, "a model quantized with GPTQ needs the gptqmodel package")),
    "train_qlora/bnb": ({**LORA, **QUANT4}, "sft", 2, BNB),
    "train_qlora/otfq": ({**LORA, **QUANT4}, "sft", 2, BNB),
}  # fmt: skip
# The examples that load a model quantized ahead of time: the tiny model gets that model's
# quantization_config (the one swap that stands for "a pre-quantized model").
PRE_QUANTIZED = {"extras/qoft (awq)": "awq", "extras/qoft (gptq)": "gptq", "train_qlora/aqlm": "aqlm",
                 "train_qlora/awq": "awq", "train_qlora/gptq": "gptq"}  # fmt: skip


def test_the_sweep_covers_every_training_example() -> None:
    assert len(CASES) == 38


def _rows(kind: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Examples of one kind, and their dataset_info.json entry (LlamaFactory's formats)."""
    n = range(48)
    talk = [[{"from": "human", "value": f"Add {i} and {i + 1}."}, {"from": "gpt", "value": str(2 * i + 1)}] for i in n]
    if kind == "pairs":
        rows = [{"instruction": f"Add {i} and {i + 1}.", "chosen": str(2 * i + 1), "rejected": str(2 * i)} for i in n]
        return rows, {"ranking": True, "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}
    if kind == "kto":
        rows = [{"messages": t, "label": i % 3 != 0} for i, t in zip(n, talk, strict=True)]
        return rows, {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"}}
    if kind == "pt":
        return [{"text": f"{i} plus {i + 1} is {2 * i + 1}."} for i in n], {"columns": {"prompt": "text"}}
    images = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"}}
    rows = [{"messages": [{**t[0], "value": "<image>" + t[0]["value"]}, t[1]], "images": ["img.png"]} for t in talk]
    if kind == "mllm-pairs":
        rows = [{**r, "chosen": r["messages"][1], "rejected": {"from": "gpt", "value": "0"}} for r in rows]
        rows = [{**r, "messages": r["messages"][:1]} for r in rows]
        images = {
            **images,
            "ranking": True,
            "columns": {**images["columns"], "chosen": "chosen", "rejected": "rejected"},
        }
    return rows, images


@pytest.fixture(scope="module")
def data(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    info = json.loads((demo_root / "datasets" / "dataset_info.json").read_text())
    sft = next(iter(info))
    (root / f"{sft}.json").write_bytes((demo_root / "datasets" / info[sft]["file_name"]).read_bytes())
    info = {"sft": info[sft]}
    for kind in ("pairs", "kto", "pt", "mllm", "mllm-pairs"):
        rows, entry = _rows(kind)
        (root / f"{kind}.json").write_text(json.dumps(rows))
        info[kind] = {"file_name": f"{kind}.json", **entry}
    (root / "dataset_info.json").write_text(json.dumps(info))
    for name, zero in {"z0": Z0, "z3": Z3, "z3_offload": Z3_OFFLOAD}.items():
        ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps":
              "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, **zero}  # fmt: skip
        (root / f"ds_{name}.json").write_text(json.dumps(ds))
    return root


def _model(demo_root: Path, tmp: Path, method: str | None) -> Path:
    """The tiny model, or a copy whose config says it was quantized with `method` ahead of time."""
    src = demo_root / "models" / "tiny-llama"
    if method is None:
        return src
    dst = tmp / f"tiny-{method}"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("name", sorted(CASES))
def test_example(name: str, demo_root: Path, data: Path, tmp_path: Path) -> None:
    keys, kind, nproc, expected = CASES[name]
    keys = dict(keys)
    if "deepspeed" in keys:
        keys["deepspeed"] = str(data / f"ds_{keys['deepspeed']}.json")
    if keys.get("tokenized_path") == "TOKENIZED":
        keys["tokenized_path"] = str(tmp_path / "tokenized")
    model = _model(demo_root, tmp_path, PRE_QUANTIZED.get(name))
    cfg = write_config(demo_root, tmp_path, "ex", model_name_or_path=str(model), dataset=kind, dataset_dir=str(data),
                       max_steps=2, save_steps=2, logging_steps=1, **keys)  # fmt: skip
    res = run_cli("train", str(cfg), "--nproc", str(nproc), "--max-restarts", "0", timeout=600)
    text = res.stdout + res.stderr
    if expected == TRAINS:
        assert res.returncode == 0, text[-4000:]
        assert trainer_state(tmp_path / "output" / "ex")["global_step"] == 2
        return
    code, words = expected
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("ft-appliance:")]
    assert (res.returncode, len(lines)) == (code, 1), text[-4000:]
    assert words in lines[0] and "Traceback" not in text, lines
    assert not (tmp_path / "output" / "ex" / ".ft" / "attempts").exists()  # refused before any launch
