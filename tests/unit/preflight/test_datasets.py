"""Dataset files read as LlamaFactory will read them, by table: each problem named with its file,
example and column; big files sampled."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ft_appliance.preflight import datasets
from ft_appliance.preflight.datasets import check_file, required_columns

GOOD = [{"instruction": "Add.", "input": "1 + 2", "output": "3"}] * 3


@pytest.mark.parametrize(
    ("name", "content", "entry", "problem"),
    [
        ("a.json", json.dumps(GOOD), {}, None),
        ("a.jsonl", "\n".join(map(json.dumps, GOOD)), {}, None),
        ("a.json", "\n".join(map(json.dumps, GOOD)), {}, None),  # JSON lines in a .json file: LlamaFactory reads it
        ("a.csv", "instruction,input,output\nAdd.,1 + 2,3\n", {}, None),
        ("a.json", '{"instruction": "x",\n "output": "y"}', {}, "holds one JSON object"),
        ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": ', {}, "not valid JSON lines (line 2"),
        ("a.json", json.dumps([GOOD[0], "text"]), {}, "example 2: is a str, not an object"),
        ("a.json", json.dumps([{"instruction": "x"}]), {}, "no column 'output' (the response column"),
        ("a.json", json.dumps(GOOD), {"ranking": True}, "no column 'chosen'"),
        ("a.json", json.dumps(GOOD), {"columns": {"query": "question"}}, "no column 'question' (the query column"),
        ("a.txt", "", {}, "is empty"),
        ("a.tsv", "x", {}, "has an extension LlamaFactory cannot read"),
    ],
)
def test_check_file(tmp_path: Path, name: str, content: str, entry: dict, problem: str | None) -> None:
    path = tmp_path / name
    path.write_text(content)
    found = check_file(path, entry)
    assert found is None if problem is None else problem in found


def test_columnar_files_are_judged_by_their_schema(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "good.parquet")
    assert check_file(tmp_path / "good.parquet", {}) is None
    pq.write_table(pa.Table.from_pylist([{"q": "x"}]), tmp_path / "bad.parquet")
    assert "has no column 'instruction'" in check_file(tmp_path / "bad.parquet", {})
    (tmp_path / "torn.parquet").write_bytes((tmp_path / "good.parquet").read_bytes()[:40])
    assert "is not readable parquet" in check_file(tmp_path / "torn.parquet", {})


def test_an_array_too_big_to_parse_whole_is_sampled_from_its_head(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(datasets, "FULL_PARSE_BYTES", 100)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(GOOD * 50))
    assert check_file(path, {}) is None
    path.write_text(json.dumps([{"instruction": "x"}] + GOOD * 50))
    assert "example 1: no column 'output'" in check_file(path, {})


def test_required_columns_follow_the_formatting() -> None:
    assert required_columns({}) == {"prompt": "instruction", "response": "output"}
    assert required_columns({"formatting": "sharegpt", "columns": {"messages": "msgs"}}) == {"messages": "msgs"}
    # pre-training reads only the text (LlamaFactory's c4_demo maps just `prompt: text`)
    assert required_columns({"columns": {"prompt": "text"}}, stage="pt") == {"prompt": "text"}
    assert required_columns({"columns": {"prompt": "text"}}) == {"prompt": "text", "response": "output"}
