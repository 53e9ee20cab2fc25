"""The default performance profile: applied only where the user said nothing, each choice explained."""

from __future__ import annotations

from ft_appliance.profile import GpuFacts, fits_without_checkpointing, performance_profile

H100 = GpuFacts((9, 0), 80 * 2**30, liger_available=True, flash_attn_available=False)
LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32}
SEED = {"stage": "sft", "per_device_train_batch_size": 4, "cutoff_len": 2048}


def test_seed_config_on_h100_gets_the_full_profile() -> None:
    updates, notes = performance_profile(SEED, H100, LLAMA_8B, 16 * 2**30)
    assert updates == {
        "enable_liger_kernel": True,
        "packing": True,
        "neat_packing": True,
        "disable_gradient_checkpointing": True,
    }
    assert len([n for n in notes if n.startswith("profile: ")]) == 5  # four choices and the attention note
    assert any("SDPA; flash-attn is not installed" in n for n in notes)


def test_user_keys_always_win() -> None:
    args = {**SEED, "enable_liger_kernel": False, "packing": False, "disable_gradient_checkpointing": False}
    updates, notes = performance_profile(args, H100, LLAMA_8B, 16 * 2**30)
    assert updates == {}
    assert "profile: enable_liger_kernel left as the config says (False)" in notes


def test_gradient_checkpointing_kept_when_memory_requires() -> None:
    small = GpuFacts((8, 6), 24 * 2**30, True, False)
    updates, notes = performance_profile(SEED, small, LLAMA_8B, 16 * 2**30)
    assert "disable_gradient_checkpointing" not in updates
    assert any("gradient checkpointing kept" in n for n in notes)
    assert fits_without_checkpointing(
        16 * 2**30, LLAMA_8B, {"per_device_train_batch_size": 1, "cutoff_len": 512}, 24 * 2**30
    )[0]


def test_no_liger_no_fa2_and_other_stages() -> None:
    plain = GpuFacts((8, 0), 80 * 2**30, liger_available=False, flash_attn_available=True)
    updates, _ = performance_profile({"stage": "dpo"}, plain, None, None)
    assert updates == {"flash_attn": "fa2"}
