"""How state files are written and read safely: atomic JSON replace, JSONL append, and an incremental
JSONL reader whose cost per poll does not grow with the file.

Nothing here knows what the records mean (records.py) or where they live (layout.py).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Atomic replace: a reader sees the old file or the new one, never half of one.

    The temporary name is unique per call (not per pid): two containers on one volume often run
    their supervisor under the same small pid.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or not JSON (a torn write of a non-atomic writer)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()


def _parse_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a torn line (killed mid-write)
        if isinstance(item, dict):
            out.append(item)
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn line is skipped. For one-off reads (status, tests); the
    supervisor's poll uses JsonlTail."""
    try:
        return _parse_lines(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return []


class JsonlTail:
    """Reads only what was appended since the last call: the supervisor polls the step log many
    times a second for a whole run, so a poll must not re-read the run's history."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []  # nothing, or a line still being written: read it whole next time
        self.offset += end + 1
        return _parse_lines(chunk[: end + 1].decode("utf-8", errors="replace"))


def last_jsonl(path: Path, tail_bytes: int = 8192) -> dict[str, Any] | None:
    """The last complete record, reading only the end of the file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - tail_bytes))
            chunk = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    records = _parse_lines(chunk)  # the chunk's cut first line does not parse and is skipped
    return records[-1] if records else None


def list_files(root: Path, exclude: str) -> dict[str, int]:
    """Relative path -> size for every file under root, `exclude` (the marker itself) left out."""
    out: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == exclude:
                continue
            try:
                out[rel] = full.stat().st_size
            except OSError:
                continue
    return out


def fsync_tree(root: Path) -> None:
    """Make every file under root durable; an error is raised, not swallowed, since a marker must
    never list a file that is not on disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
