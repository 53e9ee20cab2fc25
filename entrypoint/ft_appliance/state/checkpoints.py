"""Find the checkpoints in an output directory and judge whether each is complete and loadable,
without loading tensors. Setting aside moves a checkpoint out of the Trainer's sight; nothing is
ever deleted.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zipfile
from pathlib import Path

from ..policy.checkpoints import Candidate, to_rotate, torn_after_marked
from . import files
from .layout import MARKER, BadRecord, read_record
from .records import Marker

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SET_ASIDE_DIR = "ft-set-aside"
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.bin",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# A reward model's value head beside its decoder weights (LlamaFactory's fix_valuehead_checkpoint).
VALUE_HEAD_FILES = ("value_head.safetensors", "value_head.bin")


def check_safetensors(path: Path) -> str | None:
    """A safetensors file is whole when its header parses and its last tensor ends at the file's end."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated (no header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                return f"{path.name} is truncated (header runs past the end)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"{path.name} is unreadable ({type(exc).__name__})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is truncated ({size} bytes, header says {8 + n + end})"
    return None


def check_zip(path: Path) -> str | None:
    """torch.save writes zip archives; a truncated one has no central directory."""
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{path.name} is truncated or corrupt ({type(exc).__name__})"
    return None


ZERO_SHARD_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(model|optim)_states\.pt$")


def check_deepspeed(ckpt: Path) -> str | None:
    """DeepSpeed's layout: `latest` names global_stepN/, which holds a model and an optimizer shard for
    every rank 0..W-1 of the world that wrote it, each a whole torch zip."""
    tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else None
    if not tag:
        return "DeepSpeed's latest file is missing or empty"
    folder = ckpt / tag
    if not folder.is_dir():
        return f"DeepSpeed's latest names {tag}/, which is missing"
    ranks: dict[str, set[int]] = {"model": set(), "optim": set()}
    for path in folder.iterdir():
        if m := ZERO_SHARD_RE.match(path.name):
            ranks[m[2]].add(int(m[1]))
            if problem := check_zip(path):
                return f"{tag}/{problem}"
    world = max(ranks["optim"] | ranks["model"], default=-1) + 1
    for kind, found in ranks.items():
        if found != set(range(world)) or not found:
            missing = sorted(set(range(max(world, 1))) - found)
            return f"{tag}/ lacks the {kind} shard of rank(s) {missing}"
    return None


def _check_weights(ckpt: Path) -> str | None:
    present = [name for name in WEIGHT_FILES if (ckpt / name).exists()]
    deepspeed = [p for p in ckpt.glob("global_step*") if p.is_dir()]
    if not present and not deepspeed:
        return "no model or adapter weights"
    if deepspeed and (problem := check_deepspeed(ckpt)):
        return problem
    for name in present:
        path = ckpt / name
        if name.endswith(".safetensors"):
            problem = check_safetensors(path)
        elif name.endswith(".index.json"):
            try:
                shards = set(json.loads(path.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError) as exc:
                return f"{name} is unreadable ({type(exc).__name__})"
            problem = next((p for s in sorted(shards) if (p := _check_shard(ckpt / s)) is not None), None)
        else:
            problem = check_zip(path)
        if problem:
            return problem
    return None


def _check_shard(path: Path) -> str | None:
    if not path.exists():
        return f"shard {path.name} is missing"
    return check_safetensors(path) if path.suffix == ".safetensors" else check_zip(path)


def judge(ckpt: Path) -> tuple[bool, str, bool]:
    """(complete, reason, marked). The marker's file list is authoritative when present; checkpoints
    from plain LlamaFactory (no marker) are judged by their content."""
    if not any(ckpt.iterdir()):
        return False, "empty directory", False
    try:
        marker = read_record(ckpt / MARKER, Marker)
    except BadRecord:
        return False, "its completion marker is unreadable", True
    if marker is not None:
        return _check_marked(ckpt, marker)
    return _check_content(ckpt)


def _check_marked(ckpt: Path, marker: Marker) -> tuple[bool, str, bool]:
    for rel, size in marker.files.items():
        path = ckpt / rel
        if not path.is_file():
            return False, f"{rel} listed in the marker is missing", True
        if path.stat().st_size != size:
            return False, f"{rel} changed size since it was marked complete", True
    return True, "", True


def _check_content(ckpt: Path) -> tuple[bool, str, bool]:
    if files.read_json(ckpt / TRAINER_STATE) is None:
        return False, f"no readable {TRAINER_STATE} (the save did not finish)", False
    problem = _check_weights(ckpt)
    if problem:
        return False, problem, False
    for name in VALUE_HEAD_FILES:
        if (ckpt / name).exists() and (problem := _check_shard(ckpt / name)):
            return False, problem, False
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
        if (ckpt / name).exists() and (problem := check_zip(ckpt / name)):
            return False, problem, False
    for rng in ckpt.glob("rng_state*.pth"):
        if problem := check_zip(rng):
            return False, problem, False
    return True, "", False


def scan(output_dir: Path) -> list[Candidate]:
    """Every checkpoint-N directory, oldest first, judged."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir():
            complete, reason, marked = judge(child)
            found.append(Candidate(child, int(m.group(1)), complete, reason, marked))
    found.sort(key=lambda c: c.step)
    return torn_after_marked(found)


def step_of(path: str | None) -> int | None:
    """checkpoint-N's N, for a path named in a run file (None for none or another name)."""
    m = CHECKPOINT_RE.match(Path(path).name) if path else None
    return int(m.group(1)) if m else None


def write_marker(checkpoint: Path, *, step: int, world_size: int) -> int:
    """Mark a checkpoint complete: every file made durable first, then its file list and sizes,
    written last, atomically. Returns the checkpoint's size in bytes."""
    files.fsync_tree(checkpoint)
    marker = Marker(step, world_size, files.list_files(checkpoint, MARKER), time.time())
    files.write_json(checkpoint / MARKER, marker.to_dict())
    return sum(marker.files.values())


def rotate(output_dir: Path, keep: int, best: str | None = None) -> list[str]:
    """Delete the complete checkpoints beyond `keep` (save_total_limit), oldest first; returns their
    names. Runs after the newest checkpoint is marked, so a kill at any moment leaves one whole."""
    import shutil

    protected = frozenset({Path(best)}) if best else frozenset()
    gone = []
    for c in to_rotate(scan(output_dir), keep, protected):
        # Renamed first: a kill during the delete leaves a name the Trainer and the scan ignore.
        doomed = c.path.with_name(f".deleting-{c.path.name}")
        c.path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        gone.append(c.path.name)
    return gone


# What LlamaFactory takes for a trained model in output_dir (extras/constants.py CHECKPOINT_NAMES):
# with one of them and no checkpoint it refuses to start unless overwrite_output_dir, which deletes.
FINAL_WEIGHTS = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def set_aside_leftovers(output_dir: Path) -> tuple[list[str], Path | None]:
    """A start from step 0 on an output_dir an earlier attempt left a final save in (save_strategy
    "no" killed mid-save, say): move its top-level files under ft-set-aside/, kept, so training can
    start again. Returns the names moved and where to."""
    if not output_dir.is_dir() or not any((output_dir / n).is_file() for n in FINAL_WEIGHTS):
        return [], None
    target = _aside_name(output_dir, "leftovers", "no-resumable-checkpoint")
    target.mkdir(parents=True)
    moved = []
    for path in sorted(output_dir.iterdir()):
        if path.is_file():
            path.rename(target / path.name)
            moved.append(path.name)
    return moved, target


def _aside_name(output_dir: Path, name: str, reason: str) -> Path:
    target_dir = output_dir / SET_ASIDE_DIR
    target_dir.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-")[:40] or "incomplete"
    target = target_dir / f"{name}.{slug}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 1
    while target.exists():
        target = target.with_name(f"{target.name}.{n}")
        n += 1
    return target


def set_aside(candidate: Candidate, output_dir: Path) -> Path:
    """Move a checkpoint under ft-set-aside/ (the Trainer only looks at checkpoint-*); never delete."""
    target = _aside_name(output_dir, candidate.path.name, candidate.reason)
    candidate.path.rename(target)
    return target
