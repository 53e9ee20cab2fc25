"""Read the facts preflight judges: the container's limits, the output volume, the model and the
datasets on disk. Only reading here; the judgement is in preflight.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EnvFacts:
    shm_bytes: int | None
    memlock_soft: int | None
    """RLIMIT_MEMLOCK soft limit in bytes; -1 for unlimited."""
    stack_soft: int | None
    output_dir: Path
    output_free_bytes: int | None
    output_writable: bool
    output_error: str | None = None
    hub_offline: bool = True
    uid: int = 0
    """The user the appliance runs as (the owner the volume needs)."""


@dataclass(frozen=True)
class ModelFacts:
    name: str
    path: Path | None
    """Local directory, or None when name is not a local path (a hub id)."""
    config: dict[str, Any] | None = None
    weight_files: tuple[str, ...] = ()
    tokenizer_files: tuple[str, ...] = ()
    vocab: frozenset[str] | None = None
    """Every token string the tokenizer knows (from tokenizer.json), or None when unreadable."""
    error: str | None = None
    weights_error: str | None = None
    """A weight file that is torn (header, size) or a shard the index names that is missing."""
    tokenizer_error: str | None = None
    """The tokenizer does not load (tokenizer.json or tokenizer_config.json broken)."""


@dataclass(frozen=True)
class DatasetFacts:
    dataset_dir: Path
    info: dict[str, Any] | None
    info_error: str | None = None
    files: dict[str, str | None] = field(default_factory=dict)
    """dataset name -> problem with its file(s), or None when readable."""
    media: dict[str, list[str]] = field(default_factory=dict)
    """dataset name -> the media its entry maps (images, videos, audios): it needs a multimodal model."""


def _limit(which: int) -> int | None:
    try:
        soft, _hard = resource.getrlimit(which)
    except (ValueError, OSError):
        return None
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def _existing_parent(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def read_env(output_dir: Path, environ: Mapping[str, str] | None = None) -> EnvFacts:
    environ = os.environ if environ is None else environ
    try:
        st = os.statvfs("/dev/shm")
        shm: int | None = st.f_frsize * st.f_blocks
    except OSError:
        shm = None
    base = _existing_parent(output_dir)
    free = None
    writable, error = True, None
    try:
        free = shutil.disk_usage(base).free
    except OSError as exc:
        error = str(exc)
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".ft-write-probe-"):
            pass
    except OSError as exc:
        writable, error = False, f"{type(exc).__name__}: {exc.strerror or exc}"
    offline = hub_offline(environ)
    return EnvFacts(
        shm,
        _limit(resource.RLIMIT_MEMLOCK),
        _limit(resource.RLIMIT_STACK),
        output_dir,
        free,
        writable,
        error,
        offline,
        os.getuid(),
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def hub_offline(environ: Mapping[str, str]) -> bool:
    """The hub is off: air-gapped use (FT_OFFLINE=1), or huggingface_hub's own HF_HUB_OFFLINE."""
    return environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or environ.get("FT_OFFLINE") == "1"


def hub_id(name: str, workdir: Path) -> str | None:
    """name when it names a hub repo rather than a local folder."""
    path = Path(name) if Path(name).is_absolute() else workdir / name
    return None if name.startswith(("/", "./", "../")) or path.exists() else name


def cached_snapshot(repo: str, revision: str | None, repo_type: str = "model") -> Path | None:
    """The complete local snapshot of repo@revision in the Hugging Face cache, or None; nothing is
    sent over the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, repo_type=repo_type, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, or no cache yet
        return None


def read_model(name: str, workdir: Path, revision: str | None = None) -> ModelFacts:
    """A hub id is read from its cached snapshot when there is one (staged earlier)."""
    if hub_id(name, workdir):
        path = cached_snapshot(name, revision)
        if path is None:
            return ModelFacts(name, None)
    else:
        path = Path(name) if Path(name).is_absolute() else workdir / name
    if not path.is_dir():
        return ModelFacts(name, path, error="does not exist" if not path.exists() else "is not a directory")
    files = {p.name for p in path.iterdir() if p.is_file()}
    config = None
    if "config.json" in files:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            return ModelFacts(name, path, error=f"config.json is unreadable ({type(exc).__name__})")
    weights = tuple(sorted(f for f in files if f.endswith(WEIGHT_SUFFIXES) and not f.startswith("training_args")))
    tok = tuple(sorted(f for f in files if f in TOKENIZER_FILES))
    vocab, tokenizer_error = _load_tokenizer(path)
    return ModelFacts(name, path, config, weights, tok, vocab, None, _weights_problem(path, weights), tokenizer_error)


def _weights_problem(path: Path, weights: tuple[str, ...]) -> str | None:
    """Headers and sizes only (no tensor is loaded): torn downloads and missing shards."""
    from ..state.checkpoints import check_safetensors, check_zip

    for name in weights:
        f = path / name
        if name.endswith(".safetensors"):
            problem = check_safetensors(f)
        elif name.endswith(".bin"):
            problem = check_zip(f)
        else:
            continue
        if problem:
            return problem
    index = next(
        (path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (path / n).exists()),
        None,
    )
    if index is None:
        return None
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return f"{index.name} is unreadable ({type(exc).__name__})"
    missing = [s for s in shards if not (path / s).is_file()]
    return f"shard {missing[0]} named in {index.name} is missing ({len(missing)} of {len(shards)})" if missing else None


def _load_tokenizer(path: Path) -> tuple[frozenset[str] | None, str | None]:
    """(every token string, problem): tokenizer.json loaded once, by the tokenizers library alone
    (no torch, no transformers), which is what proves it loads and what lists its vocabulary."""
    if (path / "tokenizer_config.json").exists():
        try:
            json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return None, f"tokenizer_config.json is unreadable ({type(exc).__name__})"
    if not (path / "tokenizer.json").exists():
        return None, None
    try:
        from tokenizers import Tokenizer

        loaded = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception for a broken file
        return (
            None,
            f"tokenizer.json does not load ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})",
        )
    return frozenset(loaded.get_vocab(with_added_tokens=True)), None


def read_datasets(names: list[str], dataset_dir: Path, stage: str = "sft") -> DatasetFacts:
    info_path = dataset_dir / "dataset_info.json"
    if not dataset_dir.is_dir():
        return DatasetFacts(dataset_dir, None, "does not exist")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return DatasetFacts(dataset_dir, None, "has no dataset_info.json")
    except (OSError, ValueError) as exc:
        return DatasetFacts(dataset_dir, None, f"dataset_info.json is unreadable ({type(exc).__name__}: {exc})")
    if not isinstance(info, dict):
        return DatasetFacts(dataset_dir, None, "dataset_info.json is not a mapping of dataset names")
    files: dict[str, str | None] = {}
    media: dict[str, list[str]] = {}
    for name in names:
        entry = info.get(name)
        if not isinstance(entry, dict):
            continue
        columns = entry.get("columns") if isinstance(entry.get("columns"), dict) else {}
        if found := [m for m in ("images", "videos", "audios") if m in columns]:
            media[name] = found
        if "file_name" not in entry:
            files[name] = (
                None if any(k in entry for k in ("hf_hub_url", "ms_hub_url", "om_hub_url")) else ("has no file_name")
            )
            continue
        files[name] = _dataset_problem(dataset_dir / str(entry["file_name"]), entry, stage)
    return DatasetFacts(dataset_dir, info, None, files, media)


def _dataset_problem(target: Path, entry: dict[str, Any], stage: str) -> str | None:
    from .datasets import FORMATS, check_file

    if not target.exists():
        return f"file {target} does not exist"
    if target.is_dir():
        if target.suffix.lower() in FORMATS:
            return f"{target} is a folder where a data file should be: point file_name at the file"
        inside = sorted(p for p in target.iterdir() if p.is_file() and not p.name.startswith("."))
        if not inside:
            return f"folder {target} holds no data files"
        return next((p for f in inside[:3] if (p := check_file(f, entry, stage))), None)
    if not os.access(target, os.R_OK):
        return f"file {target} is not readable"
    if target.stat().st_size == 0:
        return f"file {target} is empty"
    return check_file(target, entry, stage)
