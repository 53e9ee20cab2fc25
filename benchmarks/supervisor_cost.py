"""The supervisor's cost per logged step, at the start of a run and 100,000 steps into it.

    PYTHONPATH=entrypoint python benchmarks/supervisor_cost.py [--steps 100 100000] [--rounds 200]

For each history length it writes a state folder with that many step and log records, lets a
StatusWriter read it once (what a new supervisor does at start), then times what the monitor does for
every logged step: a worker appends one step and one log record, the supervisor reads what is new,
reads the beat, computes progress, formats the line and writes status.json (fsynced). For contrast
it also times the full re-parse of both logs that main at 7823a97 did three times per logged step.
Prints one line per history length; no GPU needed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ft_appliance.policy.progress import format_progress, progress_of
from ft_appliance.run.status import StatusWriter
from ft_appliance.state.files import append_jsonl, read_jsonl
from ft_appliance.state.layout import StateDir, parse_records, read_record_or_none
from ft_appliance.state.records import BeatRecord, LogRecord, RunState, StepRecord


def step(n: int) -> dict:
    return StepRecord(1, n, 10**6, 4096, 0.05, time.time(), n == 1).to_dict()


def log(n: int) -> dict:
    return LogRecord(1, n, time.time(), loss=2.0 - n * 1e-6, learning_rate=1e-4, epoch=n / 1e4).to_dict()


def history(sd: StateDir, steps: int) -> None:
    sd.root.mkdir(parents=True)
    with open(sd.steps, "w") as fs, open(sd.log, "w") as fl:
        import json

        for n in range(1, steps + 1):
            fs.write(json.dumps(step(n), sort_keys=True) + "\n")
            fl.write(json.dumps(log(n), sort_keys=True) + "\n")


def per_logged_step(sd: StateDir, first: int, rounds: int) -> list[float]:
    writer = StatusWriter(sd, {}, lambda _line: None)
    writer.refresh()
    times = []
    for n in range(first, first + rounds):
        append_jsonl(sd.steps, step(n))
        append_jsonl(sd.log, log(n))
        t0 = time.perf_counter()
        writer.refresh()
        writer.last_step_of(1)
        read_record_or_none(sd.beat_file(1), BeatRecord)
        p = writer.progress()
        assert p is not None and p.step == n
        format_progress(p)
        writer.write(RunState.TRAINING)
        times.append(time.perf_counter() - t0)
    return times


def full_reparse(sd: StateDir, rounds: int) -> list[float]:
    """What 7823a97's monitor did per logged step: parse steps.jsonl three times and log.jsonl twice
    (JSON only here, a lower bound), plus one progress computation over everything."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        steps = [read_jsonl(sd.steps) for _ in range(3)][-1]
        logs = [read_jsonl(sd.log) for _ in range(2)][-1]
        progress_of(parse_records(steps, StepRecord), parse_records(logs, LogRecord))
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 100_000])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    print(f"{'history':>9}  {'per logged step (median / p95)':>32}  {'full re-read, as at 7823a97':>26}")
    for steps in args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            sd = StateDir(Path(tmp) / "out")
            history(sd, steps)
            cost = sorted(per_logged_step(sd, steps + 1, args.rounds))
            reparse = statistics.median(full_reparse(sd, max(3, args.rounds // 40)))
            p95 = cost[int(0.95 * (len(cost) - 1))]
            print(
                f"{steps:>9,}  {statistics.median(cost) * 1e3:>14.2f} ms / {p95 * 1e3:>6.2f} ms"
                f"          {reparse * 1e3:>14.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
