"""The one definition of a run's state folder, `<output_dir>/.ft/`, and typed access to its records.

    .ft/lock                       POSIX lock: held by the supervisor that owns the run
    .ft/owner.json                 Owner: who holds it (for the refusal line and takeovers)
    .ft/tree.lock                  POSIX read locks held by every live training rank
    .ft/status.json                StatusRecord        .ft/run-meta.json   RunMeta
    .ft/heartbeat.json             Heartbeat (also FT_HEARTBEAT_FILE)  .ft/metrics.prom  Prometheus text
    .ft/config.json                ConfigRecord: the settings the run last started with
    .ft/data-ready.json            DataReady: the run's tokenised dataset is cached
    .ft/steps.jsonl                StepRecord lines    .ft/log.jsonl       LogRecord lines
    .ft/events.jsonl               Event lines         .ft/stopped.json    StopRecord
    .ft/completed.json             Completion
    .ft/attempts/N/run.json        RunFile             .../launch.json     LaunchRecord
    .ft/attempts/N/outcome.json    AttemptOutcome      .../beat.json       BeatRecord
    .ft/attempts/N/failure-rankR.json  WorkerFailure   .../output.log      torchrun's output
    .ft/spares/K/go.json           GoFile              .../ready-rankR     a spare rank imported
    multi-node (one shared volume):
    .ft/job.json                   JobRecord (head)    .ft/job-end.json    JobEnd (head)
    .ft/nodes/K/lock, owner.json   node K's supervisor (K > 0; the head holds .ft/lock)
    .ft/stops/node-K.json          StopRequest         .ft/attempts/N/node-K.json  NodeEnd

The completion marker is the one file outside: `checkpoint-N/.ft-complete.json` (a Marker), so that it
travels with its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import files
from .records import Record, RecordError

STATE_DIR = ".ft"
MARKER = ".ft-complete.json"
R = TypeVar("R", bound=Record)


class BadRecord(Exception):
    """A state file that exists but cannot be used; `str()` is one line naming the file."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} is malformed ({why})")
        self.path = path


def read_record(path: Path, cls: type[R]) -> R | None:
    """The record, None when the file is missing; BadRecord when it is there but unusable."""
    if not path.exists():
        return None
    data = files.read_json(path)
    if data is None:
        raise BadRecord(path, "not JSON")
    try:
        return cls.from_dict(data)
    except RecordError as exc:
        raise BadRecord(path, str(exc)) from None


def read_record_or_none(path: Path, cls: type[R]) -> R | None:
    """For readers that treat an unusable record as absent (a torn write of a killed process)."""
    try:
        return read_record(path, cls)
    except BadRecord:
        return None


def write_record(path: Path, record: Record) -> None:
    files.write_json(path, record.to_dict())


def append_record(path: Path, record: Record) -> None:
    files.append_jsonl(path, record.to_dict())


def read_records(path: Path, cls: type[R]) -> list[R]:
    """Every well-formed line of a JSONL file as cls; torn or malformed lines are skipped."""
    return parse_records(files.read_jsonl(path), cls)


def parse_records(rows: list[dict], cls: type[R]) -> list[R]:
    out = []
    for row in rows:
        try:
            out.append(cls.from_dict(row))
        except RecordError:
            continue
    return out


@dataclass(frozen=True)
class StateDir:
    output_dir: Path

    @property
    def root(self) -> Path:
        return self.output_dir / STATE_DIR

    # the run
    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def owner(self) -> Path:
        return self.root / "owner.json"

    @property
    def tree_lock(self) -> Path:
        return self.root / "tree.lock"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def heartbeat(self) -> Path:
        return self.root / "heartbeat.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.prom"

    @property
    def run_meta(self) -> Path:
        return self.root / "run-meta.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def data_ready(self) -> Path:
        return self.root / "data-ready.json"

    @property
    def steps(self) -> Path:
        return self.root / "steps.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def stopped(self) -> Path:
        return self.root / "stopped.json"

    @property
    def completed(self) -> Path:
        return self.root / "completed.json"

    # multi-node
    @property
    def job(self) -> Path:
        return self.root / "job.json"

    @property
    def job_end(self) -> Path:
        return self.root / "job-end.json"

    def node_dir(self, k: int) -> Path:
        return self.root / "nodes" / str(k)

    def stop_request(self, k: int) -> Path:
        return self.root / "stops" / f"node-{k}.json"

    def stop_requests(self) -> list[Path]:
        return sorted((self.root / "stops").glob("node-*.json"))

    def node_end(self, n: int, k: int) -> Path:
        return self.attempt_dir(n) / f"node-{k}.json"

    def node_ends(self, n: int) -> list[Path]:
        return sorted(self.attempt_dir(n).glob("node-*.json"))

    # attempts
    @property
    def attempts(self) -> Path:
        return self.root / "attempts"

    def attempt_dir(self, n: int) -> Path:
        return self.attempts / str(n)

    def run_file(self, n: int) -> Path:
        return self.attempt_dir(n) / "run.json"

    def launch_file(self, n: int) -> Path:
        return self.attempt_dir(n) / "launch.json"

    def outcome_file(self, n: int) -> Path:
        return self.attempt_dir(n) / "outcome.json"

    def beat_file(self, n: int) -> Path:
        return self.attempt_dir(n) / "beat.json"

    def failure_file(self, n: int, rank: int) -> Path:
        return self.attempt_dir(n) / f"failure-rank{rank}.json"

    def failure_files(self, n: int) -> list[Path]:
        return sorted(self.attempt_dir(n).glob("failure-rank*.json"))

    def output_log(self, n: int, node: int = 0) -> Path:
        """torchrun's output: the head's (or a single node's), or node K's of a multi-node job."""
        return self.attempt_dir(n) / ("output.log" if node == 0 else f"output-node{node}.log")

    def attempt_numbers(self) -> list[int]:
        return sorted(int(p.name) for p in self.attempts.glob("*") if p.name.isdigit())

    def new_attempt(self) -> int:
        """Creates the next attempt's folder; exist_ok=False, so two writers can never share a number."""
        return _new_numbered(self.attempts, self.attempt_numbers())

    # spares
    @property
    def spares(self) -> Path:
        return self.root / "spares"

    def spare_dir(self, k: int) -> Path:
        return self.spares / str(k)

    def go_file(self, k: int) -> Path:
        return self.spare_dir(k) / "go.json"

    def new_spare(self) -> int:
        return _new_numbered(self.spares, sorted(int(p.name) for p in self.spares.glob("*") if p.name.isdigit()))


def _new_numbered(parent: Path, taken: list[int]) -> int:
    parent.mkdir(parents=True, exist_ok=True)
    n = max(taken, default=0) + 1
    while True:
        try:
            (parent / str(n)).mkdir()
            return n
        except FileExistsError:
            n += 1


def ready_file(go_file: Path, rank: int) -> Path:
    """spares/K/ready-rankR, beside the spare's go file: the rank has imported the stack."""
    return go_file.parent / f"ready-rank{rank}"
