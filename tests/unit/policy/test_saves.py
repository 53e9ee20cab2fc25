"""Which runs write their checkpoints in the background (policy/saves.py), by table."""

from __future__ import annotations

import pytest
from ft_appliance.policy.saves import host_copy_fits, why_not_background

FULL = {"finetuning_type": "full"}


@pytest.mark.parametrize(
    ("args", "why_not"),
    [
        (FULL, None),
        ({"finetuning_type": "freeze"}, None),
        ({**FULL, "stage": "dpo"}, None),
        ({}, "LoRA checkpoints are small"),
        ({"finetuning_type": "lora"}, "LoRA checkpoints are small"),
        ({**FULL, "save_strategy": "no"}, "saves no checkpoints"),
        ({**FULL, "deepspeed": "ds_z3_config.json"}, "DeepSpeed writes its own"),
        ({**FULL, "fsdp": "full_shard"}, "FSDP writes its own"),
        ({**FULL, "stage": "rm"}, "value-head callback"),
        ({**FULL, "stage": "ppo"}, "value-head callback"),
    ],
)
def test_why_not_background(args: dict, why_not: str | None) -> None:
    got = why_not_background(args)
    assert got is None if why_not is None else why_not in got


@pytest.mark.parametrize(
    ("state", "available", "fits"),
    [(10, 20, True), (10, 19, False), (0, 0, True), (24 * 2**30, 100 * 2**30, True), (24 * 2**30, 40 * 2**30, False)],
)
def test_host_copy_fits_in_half_the_available_memory(state: int, available: int, fits: bool) -> None:
    assert host_copy_fits(state, available) is fits
