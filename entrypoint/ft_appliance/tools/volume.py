"""First start on an empty volume: lay out /data and tell the user what to put where."""

from __future__ import annotations

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


def examples_dir() -> Path:
    """Shipped configs: FT_EXAMPLES_DIR in the image, the repository's configs/ in a checkout."""
    env = os.environ.get("FT_EXAMPLES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def is_unset_up(root: Path) -> bool:
    """True for a volume the user has not filled yet (empty, or only our own layout)."""
    if not root.is_dir():
        return False
    return not (root / "configs" / "train.yaml").exists() and not any((root / "models").glob("*"))


def init_volume(root: Path) -> list[str]:
    """Create the layout, the README and the example configs; never overwrite what is there."""
    created = []
    for name in LAYOUT:
        d = root / name
        if not d.exists():
            d.mkdir(parents=True)
            created.append(f"{name}/")
    if not (root / "README.txt").exists():
        (root / "README.txt").write_text(README)
        created.append("README.txt")
    src = examples_dir()
    if (src / "finetune_lora_single_node.yaml").exists() and not (root / "configs" / "train.example.yaml").exists():
        shutil.copyfile(src / "finetune_lora_single_node.yaml", root / "configs" / "train.example.yaml")
        created.append("configs/train.example.yaml")
    if (src / "deepspeed").is_dir() and not (root / "configs" / "deepspeed").exists():
        shutil.copytree(src / "deepspeed", root / "configs" / "deepspeed")
        created.append("configs/deepspeed/")
    return created
