"""Resume for LlamaFactory's reward models (`stage: rm`), which the Trainer cannot do by itself.

A reward model trains trl's AutoModelForCausalLMWithValueHead, a wrapper that is neither a
PreTrainedModel nor a PeftModel. LlamaFactory's FixValueHeadModelCallback rewrites each checkpoint
into the decoder (adapter_model.safetensors for LoRA, model.safetensors for full) beside
value_head.safetensors. Trainer._load_from_checkpoint knows neither layout: for the wrapper it falls
through to load_sharded_checkpoint and fails ("Can't find a checkpoint index") or, for full tuning,
would load decoder names that match nothing. So for such a checkpoint and such a model, the worker
loads each part where it belongs; every other resume goes through the Trainer's own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VALUE_HEAD = "value_head.safetensors"
ADAPTER = "adapter_model.safetensors"
DECODER = "model.safetensors"


def is_value_head_checkpoint(model: Any, ckpt: Path) -> bool:
    return hasattr(model, "v_head") and hasattr(model, "pretrained_model") and (ckpt / VALUE_HEAD).is_file()


def load_value_head_checkpoint(model: Any, ckpt: Path) -> None:
    """Decoder (adapter or full weights) and value head from LlamaFactory's layout; strict on each."""
    from safetensors.torch import load_file

    head = {k.removeprefix("v_head."): v for k, v in load_file(str(ckpt / VALUE_HEAD)).items()}
    model.v_head.load_state_dict(head, strict=True)
    if (ckpt / ADAPTER).is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model.pretrained_model, load_file(str(ckpt / ADAPTER)))
        if result.unexpected_keys:
            raise ValueError(f"{ckpt / ADAPTER}: keys the model does not have: {result.unexpected_keys[:3]}")
    else:
        model.pretrained_model.load_state_dict(load_file(str(ckpt / DECODER)), strict=False)


def install() -> None:
    """Route value-head checkpoints of value-head models to load_value_head_checkpoint."""
    from transformers import Trainer

    if getattr(Trainer, "_ft_value_head_resume", False):
        return
    original = Trainer._load_from_checkpoint

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):  # noqa: ANN001, ANN202
        target = model if model is not None else self.model
        if is_value_head_checkpoint(target, Path(resume_from_checkpoint)):
            return load_value_head_checkpoint(target, Path(resume_from_checkpoint))
        return original(self, resume_from_checkpoint, model)

    Trainer._load_from_checkpoint = _load_from_checkpoint
    Trainer._ft_value_head_resume = True
