"""First start on an empty volume: lay out /data and tell the user what to put where."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

LAYOUT = ("configs", "datasets", "models", "output")

README = """\
ft-appliance data volume
========================

configs/train.yaml   your LlamaFactory YAML (start from configs/train.example.yaml)
datasets/            dataset_info.json and the dataset files; set dataset_dir: /data/datasets
models/              model folders (config.json, *.safetensors, tokenizer files);
                     set model_name_or_path: /data/models/<name>
output/              training output: checkpoints, adapters, logs (set output_dir: /data/output/<run>)

Then start the container again. `ft-appliance check` reports what is missing without training.
Checkpoints are never deleted by the appliance; torn ones are moved to <output_dir>/ft-set-aside/.
"""


# A dataset of three examples in LlamaFactory's alpaca format, named as the example config names it, so
# that the example trains once a model is in models/ (and shows the format to copy).
EXAMPLE_DATASET = "my_dataset"
EXAMPLE_ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
]


def examples_dir() -> Path:
    """Shipped configs: FT_EXAMPLES_DIR in the image, the repository's configs/ in a checkout."""
    env = os.environ.get("FT_EXAMPLES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "configs"


def is_unset_up(root: Path) -> bool:
    """True for a volume the user has not filled yet (empty, or only our own layout)."""
    if not root.is_dir():
        return False
    return not (root / "configs" / "train.yaml").exists() and not any((root / "models").glob("*"))


def _write_new(path: Path, text: str, created: list[str], name: str) -> None:
    if not path.exists():
        path.write_text(text)
        created.append(name)


def init_volume(root: Path) -> list[str]:
    """Create the layout, the README, the example config and dataset; never overwrite what is there.
    Returns what it created (empty on a second run)."""
    created = []
    for name in LAYOUT:
        d = root / name
        if not d.exists():
            d.mkdir(parents=True)
            created.append(f"{name}/")
    _write_new(root / "README.txt", README, created, "README.txt")
    info = {EXAMPLE_DATASET: {"file_name": f"{EXAMPLE_DATASET}.json"}}
    _write_new(root / "datasets" / "dataset_info.json", json.dumps(info, indent=1) + "\n", created,
               "datasets/dataset_info.json")  # fmt: skip
    _write_new(root / "datasets" / f"{EXAMPLE_DATASET}.json", json.dumps(EXAMPLE_ROWS, indent=1) + "\n", created,
               f"datasets/{EXAMPLE_DATASET}.json")  # fmt: skip
    src = examples_dir()
    if (src / "finetune_lora_single_node.yaml").exists():
        text = (src / "finetune_lora_single_node.yaml").read_text()
        _write_new(root / "configs" / "train.example.yaml", text, created, "configs/train.example.yaml")
    if (src / "deepspeed").is_dir() and not (root / "configs" / "deepspeed").exists():
        shutil.copytree(src / "deepspeed", root / "configs" / "deepspeed")
        created.append("configs/deepspeed/")
    return created
