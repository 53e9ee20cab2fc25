"""What preflight's content checks cost on big datasets (they sample; LlamaFactory reads everything).

    PYTHONPATH=entrypoint python benchmarks/preflight_cost.py [--examples 10000 1000000]

Writes alpaca datasets of the given sizes as a JSON array, JSON Lines and Parquet, then times
preflight/datasets.check_file on each (the check `ft-appliance check` and `train` run per file).
Prints one line per file: size on disk and seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ft_appliance.preflight.datasets import check_file

ENTRY = {"file_name": "x"}


def write(folder: Path, n: int) -> list[Path]:
    rows = [{"instruction": f"Reverse the word {i}.", "input": f"word{i}", "output": f"{i}drow"} for i in range(n)]
    array, lines, parquet = folder / f"a{n}.json", folder / f"l{n}.jsonl", folder / f"p{n}.parquet"
    array.write_text(json.dumps(rows))
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), parquet)
    return [array, lines, parquet]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, nargs="+", default=[10_000, 1_000_000])
    args = ap.parse_args()
    print(f"{'file':<16} {'examples':>10} {'MB':>8} {'check s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.examples:
            for path in write(Path(tmp), n):
                t0 = time.perf_counter()
                problem = check_file(path, ENTRY)
                seconds = time.perf_counter() - t0
                assert problem is None, problem
                print(f"{path.suffix:<16} {n:>10,} {path.stat().st_size / 2**20:>8.1f} {seconds:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
