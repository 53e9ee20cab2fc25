"""Datasets named by `hf_hub_url` in dataset_info.json, staged once by the run's owner before any
worker starts: the repo's files into the hub cache (stage/hub.py: resumable, retried, its size checked),
then `datasets.load_dataset` with exactly the arguments LlamaFactory 0.9.5 passes, which builds the
dataset's Arrow cache under HF_HOME. The workers then run with HF_DATASETS_OFFLINE=1, and datasets
answers their identical call from that cache ("Found the latest cached dataset configuration").

The load runs in a child process: the image sets HF_DATASETS_OFFLINE=1, which datasets reads once, at
import, and the supervisor must stay offline for everything else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import EXIT_INPUTS, PreflightError

LOAD_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class HubDataset:
    """One dataset_info.json entry that LlamaFactory loads from the Hugging Face hub."""

    name: str
    repo: str
    subset: str | None = None
    folder: str | None = None
    split: str = "train"


def hub_datasets(args: Mapping[str, Any], workdir: Path) -> list[HubDataset]:
    """The run's datasets that come from the hub (as LlamaFactory's parser decides it: hf_hub_url, and
    neither ModelScope nor Modelers chosen by their environment switches)."""
    if os.environ.get("USE_MODELSCOPE_HUB", "0") not in ("0", "") or os.environ.get("USE_OPENMIND_HUB", "0") not in (
        "0", "",
    ):  # fmt: skip
        return []
    data_dir = Path(str(args.get("dataset_dir", "data")))
    data_dir = data_dir if data_dir.is_absolute() else workdir / data_dir
    try:
        info = json.loads((data_dir / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # preflight has said why
    found = []
    for key in ("dataset", "eval_dataset"):
        raw = args.get(key) or []
        names = [n.strip() for n in raw.split(",")] if isinstance(raw, str) else [str(n) for n in raw]
        for name in names:
            entry = info.get(name) if isinstance(info, dict) else None
            if isinstance(entry, dict) and entry.get("hf_hub_url"):
                found.append(
                    HubDataset(
                        name,
                        str(entry["hf_hub_url"]),
                        entry.get("subset"),
                        entry.get("folder"),
                        str(entry.get("split", "train")),
                    )  # fmt: skip
                )
    return found


def cached(ds: HubDataset) -> bool:
    """The Arrow cache of a hub dataset datasets built before (HF_HOME/datasets/org___name)."""
    from huggingface_hub import constants

    root = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return any((root / ds.repo.replace("/", "___")).glob("*/*/*/dataset_info.json"))


def stage(
    missing: list[HubDataset], args: Mapping[str, Any], say: Callable[[str], None], backoff_s: float
) -> list[str]:
    """Stage the hub datasets not cached yet (the caller found them: hub_datasets, cached); returns
    the names staged."""
    from .hub import pull

    staged = []
    for ds in missing:
        got = pull(ds.repo, None, say, repo_type="dataset", backoff_s=backoff_s)
        load = {**asdict(ds), "cache_dir": args.get("cache_dir"), "num_proc": args.get("preprocessing_num_workers")}
        env = {**os.environ, "HF_DATASETS_OFFLINE": "0", "HF_HUB_OFFLINE": "0"}
        res = subprocess.run(
            [sys.executable, "-m", "ft_appliance.stage.datasets", json.dumps(load)],
            capture_output=True, text=True, env=env, timeout=LOAD_TIMEOUT_S,
        )  # fmt: skip
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise PreflightError(
                f"dataset {ds.name!r} ({ds.repo}) downloaded but does not load with datasets: {last}", EXIT_INPUTS
            )
        say(f"staged dataset {ds.name!r} from {ds.repo}@{got.revision[:12]}: {res.stdout.strip()}")
        staged.append(ds.name)
    return staged


def _load(spec: dict[str, Any]) -> str:
    """LlamaFactory 0.9.5's call (data/loader.py, load_from hf_hub), with the same arguments."""
    from datasets import load_dataset

    data = load_dataset(
        path=spec["repo"], name=spec["subset"], data_dir=spec["folder"], data_files=None, split=spec["split"],
        cache_dir=spec["cache_dir"], token=None, num_proc=spec["num_proc"], streaming=False,
    )  # fmt: skip
    return f"{len(data)} examples in the datasets cache"


if __name__ == "__main__":
    print(_load(json.loads(sys.argv[1])))
