"""Read a dataset file the way LlamaFactory will (by its extension: json, jsonl, csv, parquet, arrow)
and say what is wrong with it before any worker does: not UTF-8, not parseable, empty, or without the
columns its dataset_info.json entry maps. The message names the file, the row and the column.

Cost stays small on big datasets: JSON Lines and CSV are read for their first SAMPLE_ROWS rows (in the
first 8 MiB),
Parquet and Arrow only for their schema; a JSON array is parsed whole (LlamaFactory does the same
at its start), up to FULL_PARSE_BYTES, beyond which only its first rows are decoded.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

SAMPLE_ROWS = 1000
FULL_PARSE_BYTES = 512 * 2**20
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
# LlamaFactory's column defaults (data/parser.py DatasetAttr) per formatting.
DEFAULT_COLUMNS = {"alpaca": {"prompt": "instruction", "response": "output"}, "sharegpt": {"messages": "conversations"}}
RANKING_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}


def required_columns(entry: Mapping[str, Any], stage: str = "sft") -> dict[str, str]:
    """role -> column name that every example must carry, from the dataset_info entry. Pre-training
    (`stage: pt`) reads only the text: the prompt column."""
    formatting = str(entry.get("formatting", "alpaca"))
    columns = entry.get("columns") if isinstance(entry.get("columns"), dict) else {}
    needed = dict(DEFAULT_COLUMNS.get(formatting, {}))
    if formatting == "alpaca" and stage == "pt":
        needed.pop("response", None)
    if formatting == "alpaca" and entry.get("ranking"):
        needed.pop("response", None)
        needed.update(RANKING_COLUMNS)
    needed.update({k: str(v) for k, v in columns.items() if k in needed or k in ("query", "system", "history")})
    return needed


def check_file(path: Path, entry: Mapping[str, Any], stage: str = "sft") -> str | None:
    """The first problem with one data file, or None."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        return f"file {path} has an extension LlamaFactory cannot read (use .json, .jsonl, .csv, .parquet or .arrow)"
    if kind in ("parquet", "arrow"):
        return _check_columnar(path, kind, required_columns(entry, stage))
    try:
        whole = path.suffix.lower() == ".json" and path.stat().st_size <= FULL_PARSE_BYTES
        raw = path.read_bytes() if whole else _head(path)  # line formats: the first rows are the sample
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return f"file {path} is not UTF-8 (line {line}, byte {exc.start}): save it as UTF-8"
    except OSError as exc:
        return f"file {path} cannot be read ({exc.strerror})"
    if kind == "text":
        return None if text.strip() else f"file {path} is empty"
    try:
        rows = list(_rows(text, kind, path.suffix.lower() == ".jsonl", complete=whole or path.suffix != ".json"))
    except ValueError as exc:
        return f"file {path} {exc}"
    if not rows:
        return f"file {path} has no examples"
    return _check_rows(path, rows, required_columns(entry, stage))


def _head(path: Path, size: int = 8 * 2**20) -> bytes:
    """The file's first `size` bytes, cut after the last whole line (the whole file when smaller)."""
    with open(path, "rb") as fh:
        chunk = fh.read(size + 1)
    if len(chunk) <= size:
        return chunk
    return chunk[: chunk.rfind(b"\n") + 1] or chunk[:size]


def _rows(text: str, kind: str, lines: bool, complete: bool = True) -> Iterator[Any]:
    if kind == "csv":
        yield from _limited(csv.DictReader(io.StringIO(text)))
        return
    stripped = text.lstrip()
    if not lines and stripped.startswith("[") and not complete:
        yield from _first_of_array(text)
        return
    if not lines and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        yield from data[:SAMPLE_ROWS] if isinstance(data, list) else ()
        return
    if not lines and stripped.startswith("{") and not _is_json_lines(stripped):
        raise ValueError("holds one JSON object: LlamaFactory needs a list of examples ([{...}, {...}]) or JSON lines")
    for number, line in enumerate(text.splitlines()[:SAMPLE_ROWS], start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"is not valid JSON lines (line {number}, column {exc.colno}: {exc.msg})") from None


def _first_of_array(head: str) -> Iterator[Any]:
    """The first examples of a JSON array too big to parse whole (its head only was read)."""
    decoder = json.JSONDecoder()
    i, n = head.index("[") + 1, 0
    while n < SAMPLE_ROWS:
        while i < len(head) and head[i] in " \t\r\n,":
            i += 1
        if i >= len(head) or head[i] == "]":
            return
        try:
            item, i = decoder.raw_decode(head, i)
        except json.JSONDecodeError:
            return  # the cut at the end of the head
        n += 1
        yield item


def _is_json_lines(text: str) -> bool:
    first = text.split("\n", 1)[0]
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return True


def _limited(rows: Iterator[Any]) -> Iterator[Any]:
    for n, row in enumerate(rows):
        if n >= SAMPLE_ROWS:
            return
        yield row


def _check_rows(path: Path, rows: list[Any], needed: Mapping[str, str]) -> str | None:
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            return f"file {path}, example {number}: is a {type(row).__name__}, not an object of columns"
        for role, column in needed.items():
            if column not in row:
                have = ", ".join(sorted(map(str, row))[:6]) or "none"
                return (
                    f"file {path}, example {number}: no column {column!r} (the {role} column of its "
                    f"dataset_info.json entry; it has {have}): rename the column or set columns.{role}"
                )
    return None


def _check_columnar(path: Path, kind: str, needed: Mapping[str, str]) -> str | None:
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            schema, rows = pq.read_schema(path), pq.ParquetFile(path).metadata.num_rows
        else:
            with open(path, "rb") as fh:
                try:
                    reader = ipc.open_stream(fh)
                except Exception:  # noqa: BLE001 - not a stream: try the file format
                    fh.seek(0)
                    reader = ipc.open_file(fh)
                schema, rows = reader.schema, None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types for torn files
        return f"file {path} is not readable {kind} ({type(exc).__name__}: {str(exc)[:120]})"
    if rows == 0:
        return f"file {path} has no examples"
    missing = [c for c in needed.values() if c not in schema.names]
    if missing:
        return (
            f"file {path} has no column {missing[0]!r} (it has {', '.join(schema.names[:6])}): rename it or set columns"
        )
    return None
