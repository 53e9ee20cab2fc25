"""The files through which workers and the supervisor talk, and how they are written safely.

Everything lives in `<output_dir>/.ft/` except the completion marker, which sits inside each
checkpoint directory so that it travels with the checkpoint when copied.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATE_DIR = ".ft"
STEPS = "steps.jsonl"  # one line per optimizer step (rank 0): the heartbeat and the token count
LOG = "log.jsonl"  # one line per Trainer log (loss, learning rate, ...)
EVENTS = "events.jsonl"  # train_begin per attempt
STOPPED = "stopped.json"  # written after the stop checkpoint is saved
COMPLETED = "completed.json"  # written after training and the final save returned
STATUS = "status.json"  # the supervisor's view, for humans, healthchecks and --json
MARKER = ".ft-complete.json"  # inside checkpoint-N, written last, after every rank saved


def state_dir(output_dir: Path) -> Path:
    return output_dir / STATE_DIR


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Atomic replace: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete lines; a torn last line (killed mid-write) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def last_jsonl(path: Path, tail_bytes: int = 8192) -> dict[str, Any] | None:
    """The last complete record, reading only the end of the file (the supervisor polls this)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - tail_bytes))
            chunk = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(chunk.splitlines()):
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a torn last line, or the cut first line of the chunk
        if isinstance(item, dict):
            return item
    return None


def list_files(root: Path) -> dict[str, int]:
    """Relative path -> size for every file under root (the marker itself excluded)."""
    out: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == MARKER:
                continue
            try:
                out[rel] = full.stat().st_size
            except OSError:
                continue
    return out


def write_marker(checkpoint: Path, *, step: int, world_size: int) -> None:
    """Mark a checkpoint complete: its file list and sizes, written last, atomically, fsynced."""
    for path in checkpoint.rglob("*"):
        if path.is_file():
            try:
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass
    write_json(
        checkpoint / MARKER,
        {"step": step, "world_size": world_size, "files": list_files(checkpoint), "time": time.time()},
    )
