"""Whether a run's checkpoints are written in the background (pure; worker/saves.py does it).

A full fine-tuning checkpoint is the weights plus the optimizer's two moments: 18-24 GB for a 1.5B
model in fp32, minutes of a stalled GPU per save when written in the step. In the background the step
pays only for a copy into host memory; the completeness marker still comes after every byte is on
disk, so a crash during the write leaves a checkpoint that resume sets aside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HOST_SHARE = 0.5
"""At most this share of the host's available memory holds the copy of the training state: the rest
stays for the data loaders, the page cache and the other ranks."""


def why_not_background(args: Mapping[str, Any]) -> str | None:
    """None when the run's checkpoints can be written in the background; else the reason they are not."""
    if str(args.get("save_strategy", "steps")) == "no":
        return "the run saves no checkpoints"
    if args.get("finetuning_type", "lora") == "lora":
        return "LoRA checkpoints are small (under a second in the step)"
    if args.get("deepspeed"):
        return "DeepSpeed writes its own checkpoints"
    if args.get("fsdp"):
        return "FSDP writes its own checkpoints"
    if args.get("stage", "sft") in ("rm", "ppo"):
        # LlamaFactory's FixValueHeadModelCallback rewrites model.safetensors in on_save: the file
        # must be whole by then.
        return "the value-head callback rewrites the weights as soon as they are saved"
    return None


def host_copy_fits(state_bytes: int, available_bytes: int) -> bool:
    """The training state's host copy fits beside everything else on the host."""
    return state_bytes <= HOST_SHARE * available_bytes
