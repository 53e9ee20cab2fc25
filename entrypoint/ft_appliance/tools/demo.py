"""The embedded default: a /data-style layout with a tiny Llama, a small dataset and a config,
all built at run time (nothing binary is shipped), so the appliance trains anywhere, offline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|finetune_right_pad_id|>",
]
DATASET_NAME = "ft_demo"
LAYOUT = ("configs", "datasets", "models", "output")


def make_examples(n: int = 256, seed: int = 0) -> list[dict[str, str]]:
    """Small deterministic instruction tasks (alpaca format) a tiny model can start to learn."""
    rng = random.Random(seed)
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "tiger",
        "music",
        "paper",
        "light",
        "garden",
        "window",
        "silver",
        "orange",
        "planet",
        "rocket",
        "forest",
        "ocean",
        "candle",
        "bridge",
    ]
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            w = rng.choice(words)
            out.append({"instruction": "Reverse the word.", "input": w, "output": w[::-1]})
        elif kind == 1:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            out.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
        else:
            ws = rng.sample(words, 3)
            out.append(
                {"instruction": "Sort the words alphabetically.", "input": " ".join(ws), "output": " ".join(sorted(ws))}
            )
    return out


def build_tokenizer(texts: list[str], path: Path, vocab_size: int = 512) -> Any:
    """A byte-level BPE trained on the demo texts, with the llama3 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA3_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, vocab_size: int, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> None:
    """A Llama with random weights: about 175k parameters at hidden 64."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)


def demo_config(root: Path, *, max_steps: int = 30, save_steps: int = 10) -> dict[str, Any]:
    return {
        "model_name_or_path": str(root / "models" / "tiny-llama"),
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_target": "all",
        "dataset": DATASET_NAME,
        "dataset_dir": str(root / "datasets"),
        "template": "llama3",
        "cutoff_len": 96,
        "overwrite_cache": False,
        "preprocessing_num_workers": 1,
        "output_dir": str(root / "output" / "demo-lora"),
        "logging_steps": 5,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 5.0e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 2,
        "max_steps": max_steps,
        "seed": 42,
        "report_to": "none",
        "dataloader_num_workers": 0,
    }


def build_demo(root: Path, *, max_steps: int = 30, save_steps: int = 10) -> Path:
    """Write the layout under root (reusing the model and dataset if present); returns the config."""
    root = root.resolve()
    for name in LAYOUT:
        (root / name).mkdir(parents=True, exist_ok=True)
    examples = make_examples()
    data_dir = root / "datasets"
    (data_dir / f"{DATASET_NAME}.json").write_text(json.dumps(examples, indent=1))
    (data_dir / "dataset_info.json").write_text(
        json.dumps({DATASET_NAME: {"file_name": f"{DATASET_NAME}.json"}}, indent=1)
    )
    model_dir = root / "models" / "tiny-llama"
    if not (model_dir / "model.safetensors").exists():
        texts = [f"{e['instruction']} {e['input']} {e['output']}" for e in examples]
        tok = build_tokenizer(texts, model_dir)
        build_model(model_dir, vocab_size=len(tok))
    config = root / "configs" / "train.yaml"
    config.write_text(
        "# Demo: LoRA SFT of a tiny random Llama on CPU, built by `ft-appliance demo`.\n"
        + yaml.safe_dump(demo_config(root, max_steps=max_steps, save_steps=save_steps), sort_keys=False)
    )
    return config
