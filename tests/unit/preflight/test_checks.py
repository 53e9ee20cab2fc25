"""Preflight policy fed with recorded inventories of real cards (tests/fixtures/inventories)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ft_appliance.preflight.checks import (
    Report,
    RunMeta,
    check_batch,
    check_fp8_base,
    check_gpus,
    check_memory,
    choose_precision,
    estimate_params,
    exit_code_for,
    run_checks,
)
from ft_appliance.preflight.facts import EnvFacts, ModelFacts
from ft_appliance.preflight.gpus import Inventory, inventory_from_dict

from tests.helpers import INVENTORIES, LLAMA_8B_CONFIG

FIXTURES = INVENTORIES
LLAMA_8B = LLAMA_8B_CONFIG
LLAMA_70B = {
    **LLAMA_8B,
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "intermediate_size": 28672,
}


def inv(name: str) -> Inventory:
    return inventory_from_dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def gpu_check(card: str, args: dict, nproc: int = 1) -> Report:
    report = Report()
    check_gpus(inv(card), nproc, args, report)
    return report


def test_h100_recorded_on_real_hardware_is_usable() -> None:
    h100 = inv("h100")
    assert h100.source == "nvml" and h100.count >= 1
    assert h100.gpus[0].compute_capability == (9, 0) and "H100" in h100.gpus[0].name
    assert gpu_check("h100", {"bf16": True, "flash_attn": "fa3", "fp8": True}).problems == []


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        ("v100", {"fp16": True}),
        ("t4", {"fp16": True}),
        ("a10g", {"bf16": True}),
        ("l4", {"bf16": True}),
        ("a100", {"bf16": True}),
        ("h100", {"bf16": True}),
    ],
)
def test_precision_left_to_the_appliance(card: str, expected: dict) -> None:
    report = gpu_check(card, {})
    assert report.updates == expected
    warned = [p for p in report.problems if p.check == "gpu.precision"]
    assert bool(warned) == ("fp16" in expected)  # a downgrade is said out loud


@pytest.mark.parametrize("card", ["v100", "t4", "mixed-a100-v100"])
def test_insisting_on_bf16_on_old_cards_fails_clearly(card: str) -> None:
    [p] = [p for p in gpu_check(card, {"bf16": True}, nproc=1).problems if p.severity == "error"]
    assert p.check == "gpu.bf16" and "compute capability 8.0" in p.message and "set fp16: true" in p.message
    assert exit_code_for(p) == 4


def test_user_precision_is_never_overridden() -> None:
    assert choose_precision((9, 0), {"fp16": True}) == ({}, None)
    assert choose_precision((9, 0), {"bf16": False}) == ({}, None)
    assert gpu_check("a100", {"fp16": True}).updates == {}


@pytest.mark.parametrize(
    ("card", "args", "check", "needle"),
    [
        ("t4", {"flash_attn": "fa2"}, "gpu.flash_attn", "FlashAttention-2 needs compute capability 8.0"),
        ("a100", {"flash_attn": "fa3"}, "gpu.flash_attn", "FlashAttention-3 needs compute capability 9.0"),
        ("a100", {"fp8": True}, "gpu.fp8", "FP8 training needs compute capability 8.9"),
        ("a100-old-driver", {}, "gpu.driver", "supports CUDA up to 12.2 but torch was built for CUDA 13.0"),
    ],
)
def test_card_features(card: str, args: dict, check: str, needle: str) -> None:
    errors = [p for p in gpu_check(card, args).problems if p.severity == "error"]
    assert [p.check for p in errors] == [check]
    assert needle in errors[0].message


LORA_BF16 = {"finetuning_type": "lora", "bf16": True}


@pytest.mark.parametrize(
    ("card", "args", "profile", "found"),
    [
        ("h100", LORA_BF16, True, []),
        ("l4", LORA_BF16, True, []),  # Ada: compute capability 8.9
        ("a100", LORA_BF16, True, [("gpu.fp8", "needs compute capability 8.9 or newer (Ada, Hopper) but NVIDIA A100")]),
        (None, LORA_BF16, True, [("gpu.fp8", "drop it on CPU")]),
        ("h100", LORA_BF16, False, [("config.fp8_base", "drop --no-profile or --fp8-base")]),
        ("h100", {"finetuning_type": "full", "bf16": True}, True, [("config.fp8_base", "not finetuning_type full")]),
        ("h100", {**LORA_BF16, "quantization_bit": 4}, True, [("config.fp8_base", "quantization_bit both")]),
        ("h100", {**LORA_BF16, "fp8": True}, True, [("config.fp8_base", "fp8: true both")]),
        ("h100", {"finetuning_type": "lora", "fp16": True}, True, [("config.fp8_base", "set bf16: true")]),
        ("h100", {**LORA_BF16, "pure_bf16": True}, True, [("config.fp8_base", "set bf16: true")]),
        ("h100", {**LORA_BF16, "deepspeed": "ds.json"}, True, [("config.fp8_base", "for DDP runs")]),
    ],
)
def test_fp8_base_needs_float8_gpus_and_a_bf16_lora_run(card, args, profile, found) -> None:  # noqa: ANN001
    report = Report()
    check_fp8_base(args, inv(card) if card else None, profile, report)
    assert [(p.check, p.severity) for p in report.problems] == [(check, "error") for check, _ in found]
    for problem, (_, needle) in zip(report.problems, found, strict=True):
        assert needle in problem.message and problem.message.startswith("--fp8-base")
    assert [exit_code_for(p) for p in report.problems] == [3 if c.startswith("config") else 4 for c, _ in found]


def test_l4_has_fp8_and_fa2() -> None:
    assert [p for p in gpu_check("l4", {"fp8": True, "flash_attn": "fa2"}).problems if p.severity == "error"] == []


def test_gpu_count_and_mixed_models() -> None:
    [p] = gpu_check("t4", {"fp16": True}, nproc=4).problems
    assert p.check == "gpu.count" and "4 GPUs requested but 1 visible" in p.message
    mixed = gpu_check("mixed-a100-v100", {"fp16": True}, nproc=2).problems
    assert [(p.check, p.severity) for p in mixed] == [("gpu.mixed", "warning")]


def test_params_estimate_matches_llama_3_1_8b() -> None:
    assert estimate_params(LLAMA_8B) == pytest.approx(8.03e9, rel=0.01)


def _memory(card: str, config: dict, args: dict, world: int = 1) -> list:
    report = Report()
    check_memory(inv(card), ModelFacts("m", Path("/m"), config), args, world, report)
    return report.problems


def test_memory_estimate_with_concrete_suggestions() -> None:
    assert _memory("a100", LLAMA_8B, {"finetuning_type": "lora"}) == []
    [p] = _memory("t4", LLAMA_8B, {"finetuning_type": "lora"})
    assert p.severity == "error" and "QLoRA (quantization_bit: 4)" in p.message
    assert _memory("t4", LLAMA_8B, {"finetuning_type": "lora", "quantization_bit": 4}) == []
    [p] = _memory("a100", LLAMA_8B, {"finetuning_type": "full"})
    assert p.severity == "error" and "ZeRO-3" in p.message
    z3 = {"finetuning_type": "full", "deepspeed": "/data/configs/deepspeed/ds_z3_config.json"}
    assert _memory("a100", LLAMA_8B, z3, world=8) == []
    [p] = _memory("a100", LLAMA_70B, {"finetuning_type": "lora"})
    assert "about 131 GiB" in p.message


def test_effective_batch_and_gpu_count_change() -> None:
    args = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    r = Report()
    check_batch(args, 4, None, False, r)
    assert r.effective_batch == 32 and r.problems == []
    prev = RunMeta(world_size=8, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    r = Report()
    check_batch(args, 4, prev, False, r)
    assert [p.severity for p in r.problems] == ["warning"] and "--keep-effective-batch" in r.problems[0].message
    r = Report()
    check_batch(args, 4, prev, True, r)
    assert r.updates == {"gradient_accumulation_steps": 4} and r.effective_batch == 64
    r = Report()
    check_batch({**args, "deepspeed": "ds.json"}, 4, RunMeta(8, 4, 2, "ds.json"), True, r)
    assert r.problems[0].check == "gpu.world_size" and "needs the same count" in r.problems[0].message


def test_cpu_run_skips_gpu_checks(tmp_path: Path) -> None:
    env = EnvFacts(2**34, -1, 8 * 2**20, tmp_path, 2**40, True)
    report = run_checks(
        {"do_train": True, "dataset": "d", "bf16": True},
        inventory=None,
        nproc=2,
        world=2,
        env=env,
        model=ModelFacts("m", tmp_path, {}, ("model.safetensors",), ("tokenizer.json",)),
        data=None,
        templates={},
    )
    assert not any(p.check.startswith("gpu.") for p in report.problems)


@pytest.mark.parametrize(
    ("args", "world", "update", "warned"),
    [
        ({"finetuning_type": "oft"}, 2, {"use_reentrant_gc": False}, False),
        ({"finetuning_type": "oft"}, 1, {}, False),
        ({"finetuning_type": "lora"}, 2, {}, False),
        ({"finetuning_type": "oft", "disable_gradient_checkpointing": True}, 2, {}, False),
        ({"finetuning_type": "oft", "use_reentrant_gc": False}, 2, {}, False),
        ({"finetuning_type": "oft", "use_reentrant_gc": True}, 2, {}, True),
    ],
)
def test_oft_under_ddp_gets_non_reentrant_checkpointing(args, world, update, warned) -> None:
    from ft_appliance.preflight.checks import Report, fix_oft_under_ddp

    report = Report()
    fix_oft_under_ddp(args, world, report)
    assert report.updates == update
    assert any(p.check == "config.oft_ddp" for p in report.problems) is warned


def _cpu_report(tmp_path: Path, args: dict, config: dict, data=None) -> Report:  # noqa: ANN001
    env = EnvFacts(2**34, -1, 8 * 2**20, tmp_path, 2**40, True)
    model = ModelFacts("m", tmp_path, config, ("model.safetensors",), ("tokenizer.json",))
    return run_checks({"do_train": True, **args}, inventory=None, nproc=2, world=2, env=env, model=model, data=data,
                      templates={})  # fmt: skip


def test_fp8_on_a_cpu_run_is_a_config_error(tmp_path: Path) -> None:
    (p,) = [p for p in _cpu_report(tmp_path, {"fp8": True}, {}).problems if p.check == "config.cpu_fp8"]
    assert "FP8 training needs a GPU of compute capability 8.9" in p.message and exit_code_for(p) == 3


@pytest.mark.parametrize(
    ("config", "refused"),
    [({"model_type": "llama"}, True), ({"model_type": "qwen2_5_vl", "vision_config": {}}, False),
     ({"model_type": "qwen2_audio", "audio_config": {}}, False)],
)  # fmt: skip
def test_a_dataset_with_images_needs_a_multimodal_model(tmp_path: Path, config: dict, refused: bool) -> None:
    from ft_appliance.preflight.facts import DatasetFacts

    data = DatasetFacts(tmp_path, {"mllm": {}}, None, {"mllm": None}, {"mllm": ["images"]})
    found = [
        p
        for p in _cpu_report(tmp_path, {"dataset": "mllm", "model_name_or_path": "m"}, config, data).problems
        if p.check == "data.multimodal"
    ]
    assert bool(found) == refused
    if found:
        assert "dataset 'mllm' has images, but m is a text-only model" in found[0].message
        assert exit_code_for(found[0]) == 9
