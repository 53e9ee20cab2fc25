"""The default performance profile: applied only where the user said nothing, each choice explained."""

from __future__ import annotations

from ft_appliance.policy.profile import (
    BLOCKDIAG_ATTENTION,
    FP8_BASE,
    LIGER_LOSS_NO_SYNC,
    LORA_ADD_IN_GEMM,
    LORA_FUSED,
    LORA_INPUTS,
    GpuFacts,
    fits_without_checkpointing,
    performance_profile,
)

H100 = GpuFacts((9, 0), 80 * 2**30, liger_available=True, flash_attn_available=False)
LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32}
SEED = {"stage": "sft", "per_device_train_batch_size": 4, "cutoff_len": 2048}
LORA = [LORA_INPUTS, LORA_ADD_IN_GEMM, LORA_FUSED]


def test_seed_config_on_h100_gets_the_full_profile() -> None:
    chosen = performance_profile(SEED, H100, LLAMA_8B, 16 * 2**30)
    updates, notes = chosen.updates, chosen.notes
    assert chosen.tweaks == [LIGER_LOSS_NO_SYNC]  # no FlexAttention known, no precision chosen yet
    assert updates == {
        "enable_liger_kernel": True,
        "packing": True,
        "neat_packing": True,
        "disable_gradient_checkpointing": True,
        "accelerator_config": {"non_blocking": True},
        "logging_nan_inf_filter": False,
    }
    assert len([n for n in notes if n.startswith("profile: ")]) == 8  # six choices, the attention and Liger notes
    assert any("SDPA; flash-attn is not installed" in n for n in notes)


def test_user_keys_always_win() -> None:
    args = {
        **SEED,
        "enable_liger_kernel": False,
        "packing": False,
        "disable_gradient_checkpointing": False,
        "logging_nan_inf_filter": True,
        "accelerator_config": {"non_blocking": False},
    }
    chosen = performance_profile(args, H100, LLAMA_8B, 16 * 2**30)
    assert chosen.updates == {} and chosen.tweaks == []
    assert "profile: enable_liger_kernel left as the config says (False)" in chosen.notes
    assert "profile: logging_nan_inf_filter left as the config says (True)" in chosen.notes


def test_gradient_checkpointing_kept_when_memory_requires() -> None:
    small = GpuFacts((8, 6), 24 * 2**30, True, False)
    chosen = performance_profile(SEED, small, LLAMA_8B, 16 * 2**30)
    assert "disable_gradient_checkpointing" not in chosen.updates
    assert any("gradient checkpointing kept" in n for n in chosen.notes)
    assert fits_without_checkpointing(
        16 * 2**30, LLAMA_8B, {"per_device_train_batch_size": 1, "cutoff_len": 512}, 24 * 2**30
    )[0]


def test_no_liger_no_fa2_and_other_stages() -> None:
    plain = GpuFacts((8, 0), 80 * 2**30, liger_available=False, flash_attn_available=True)
    chosen = performance_profile({"stage": "dpo"}, plain, None, None)
    assert chosen.updates == {
        "flash_attn": "fa2",
        "accelerator_config": {"non_blocking": True},
        "logging_nan_inf_filter": False,
    }
    assert chosen.tweaks == []
    # unpinned batches cannot be copied without waiting: the profile leaves the copies alone
    unpinned = performance_profile({"stage": "dpo", "dataloader_pin_memory": False}, plain, None, None)
    assert "accelerator_config" not in unpinned.updates


H100_FLEX = GpuFacts((9, 0), 80 * 2**30, liger_available=True, flash_attn_available=False, flex_available=True)
BF16 = {**SEED, "bf16": True}


def test_neat_packing_gets_blockdiag_attention_and_lora_layers_stay_bf16() -> None:
    chosen = performance_profile(BF16, H100_FLEX, LLAMA_8B, 16 * 2**30)
    assert chosen.tweaks == [LIGER_LOSS_NO_SYNC, BLOCKDIAG_ATTENTION, *LORA] and chosen.updates["neat_packing"] is True
    assert "flash_attn" not in chosen.updates  # LlamaFactory loads with SDPA; the worker switches
    assert any(
        "FlashAttention-2 varlen kernel, or by FlexAttention with a block-sparse mask" in n for n in chosen.notes
    )
    assert any("no value changes" in n for n in chosen.notes)
    assert any("added inside its second matmul" in n for n in chosen.notes)
    # the user's own neat packing gets it too
    assert BLOCKDIAG_ATTENTION in performance_profile({**SEED, "neat_packing": True}, H100_FLEX, None, None).tweaks


def test_tweaks_only_where_safe_and_nobody_chose_otherwise() -> None:
    def tweaks(args: dict, gpu: GpuFacts = H100_FLEX) -> list[str]:
        return performance_profile(args, gpu, None, None).tweaks

    assert tweaks({**BF16, "flash_attn": "sdpa"}) == [LIGER_LOSS_NO_SYNC, *LORA]  # the user chose an attention
    assert tweaks({**BF16, "packing": True}) == [LIGER_LOSS_NO_SYNC, *LORA]  # plain packing: nothing to keep apart
    fa2 = GpuFacts((9, 0), 80 * 2**30, True, flash_attn_available=True, flex_available=True)
    assert tweaks(BF16, fa2) == [LIGER_LOSS_NO_SYNC, *LORA]  # LlamaFactory's own fa2 path keeps examples apart
    volta = GpuFacts((7, 0), 32 * 2**30, True, False, flex_available=True)
    assert tweaks({**SEED, "fp16": True}, volta) == [LIGER_LOSS_NO_SYNC, *LORA]
    # the LoRA changes hold under autocast with an fp32 adapter only
    assert tweaks({**BF16, "pure_bf16": True}) == [LIGER_LOSS_NO_SYNC, BLOCKDIAG_ATTENTION]
    assert tweaks({**BF16, "finetuning_type": "full"}) == [LIGER_LOSS_NO_SYNC, BLOCKDIAG_ATTENTION]
    assert tweaks({**BF16, "deepspeed": "configs/deepspeed/ds_z3_config.json"}) == [
        LIGER_LOSS_NO_SYNC,
        BLOCKDIAG_ATTENTION,
    ]
    assert tweaks(SEED) == [LIGER_LOSS_NO_SYNC, BLOCKDIAG_ATTENTION]  # fp32


def test_liger_loss_without_its_sync_only_where_liger_runs() -> None:
    def tweaks(args: dict, liger: bool = True) -> list[str]:
        gpu = GpuFacts((9, 0), 80 * 2**30, liger_available=liger, flash_attn_available=False)
        return performance_profile(args, gpu, None, None).tweaks

    assert tweaks(SEED) == [LIGER_LOSS_NO_SYNC]
    assert tweaks({**SEED, "enable_liger_kernel": True}) == [LIGER_LOSS_NO_SYNC]  # the user's own Liger
    assert tweaks({**SEED, "enable_liger_kernel": False}) == []
    assert tweaks(SEED, liger=False) == []


def test_fp8_base_only_when_asked() -> None:
    assert FP8_BASE not in performance_profile(BF16, H100_FLEX, LLAMA_8B, 16 * 2**30).tweaks
    chosen = performance_profile(BF16, H100_FLEX, LLAMA_8B, 16 * 2**30, fp8_base=True)
    assert FP8_BASE in chosen.tweaks and LORA_ADD_IN_GEMM in chosen.tweaks
    assert LORA_FUSED not in chosen.tweaks  # float8 runs the base matmuls the grouped path would
    assert any("float8 (--fp8-base)" in n for n in chosen.notes)
