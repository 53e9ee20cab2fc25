"""Every record that crosses a process boundary, typed once: the supervisor, the workers, `status`,
`health`, the soak and later supervisors of the same run read and write only these.

Each record is a frozen dataclass with `to_dict()` and `from_dict()`. `from_dict` tolerates missing
keys that have a default and unknown extra keys (an older or newer writer), and raises RecordError
for anything else (a missing required key, a value of the wrong type, a list where an object goes),
so a reader turns a malformed file into one line instead of a traceback. Pure: no I/O here.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A record that is present but malformed."""


class RunState(str, enum.Enum):
    STARTING = "starting"
    TRAINING = "training"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"
    FINISHED = "finished"
    ALREADY_FINISHED = "already_finished"

    @property
    def live(self) -> bool:
        """A supervisor in this state is still working on the run (it holds the lock)."""
        return self in (RunState.STARTING, RunState.TRAINING, RunState.STOPPING, RunState.RESTARTING)


def _check(value: Any, tp: Any, where: str) -> Any:
    """value checked (and, for nested records, built) against the annotation tp."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check(value, option, where)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(errors[0] if errors else f"{where}: unexpected null")
    if isinstance(tp, type) and issubclass(tp, Record):
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        return tp.from_dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise RecordError(f"{where}: {value!r} is not one of {[m.value for m in tp]}") from None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        items = [_check(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        inner = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {str(k): _check(v, inner, f"{where}.{k}") for k, v in value.items()}
    return _scalar(value, tp, where)


def _scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"records cannot hold {tp!r}")
    raise RecordError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r:.40}")


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, annotation, required) per field; resolved once per class (get_type_hints is slow)."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
    )


class Record:
    """Base of the typed records: dict round trip with validation."""

    @classmethod
    def from_dict(cls: type[R], data: Any) -> R:
        if not isinstance(data, dict):
            raise RecordError(f"expected an object, got {type(data).__name__}")
        values = {}
        for name, tp, required in _fields(cls):
            if name in data:
                values[name] = _check(data[name], tp, name)
            elif required:
                raise RecordError(f"{name}: missing")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --- supervisor -> worker ----------------------------------------------------------------------

# RunFile.tweaks: changes the worker makes to the loaded model, for which LlamaFactory has no key
# (policy/profile.py decides them, worker/callbacks.py applies them).
BLOCKDIAG_ATTENTION = "blockdiag-attention"
LORA_INPUTS = "lora-inputs-in-compute-dtype"
LORA_ADD_IN_GEMM = "lora-add-in-gemm"
LORA_FUSED = "lora-fused-projections"
FP8_BASE = "fp8-frozen-base"
LIGER_LOSS_NO_SYNC = "liger-loss-backward-no-sync"


@dataclass(frozen=True)
class AutotuneRequest(Record):
    """RunFile.autotune: the workers time micro-batches at train begin (policy/autotune.py decides,
    worker/autotune.py measures) and train with the winner, keeping the config's effective batch."""

    cache: str
    """The decisions file (autotune.json under the appliance's cache); a hit skips the probes."""
    key: str
    """This model, card and settings (policy.autotune.cache_key)."""
    gpu_bytes: int
    per_device: int
    grad_accum: int


@dataclass(frozen=True)
class MicroProbe(Record):
    """One micro-batch size timed by the workers: forward and backward on the run's own first examples."""

    micro: int
    seconds_per_token: float | None = None
    """None: it ran out of memory."""
    peak: int | None = None
    """Bytes at the peak, with the optimizer's state still to come added (what the run will need)."""


@dataclass(frozen=True)
class AutotuneDecision(Record):
    """One entry of autotune.json, and the `autotune` event's data: what was chosen, why, and its cost."""

    micro: int
    per_device: int
    probes: list[MicroProbe] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0
    """Wall time the probes took (the first start pays it once per model, card and settings)."""


@dataclass(frozen=True)
class RunFile(Record):
    """attempts/N/run.json: what one attempt's workers train."""

    args: dict[str, Any]
    state_dir: str
    attempt: int
    tweaks: list[str] = field(default_factory=list)
    keep_checkpoints: int | None = None
    """The config's save_total_limit, applied by the worker after each marker (transformers' own
    rotation deletes before anything can mark the new checkpoint, so it is turned off)."""
    job: str | None = None
    """The job token of a multi-node run (JobRecord): the other nodes launch only run files of their job."""
    autotune: AutotuneRequest | None = None
    background_saves: bool = False
    """Checkpoints' weights and optimizer written by a thread from host copies (worker/saves.py)."""

    @property
    def resume_from(self) -> str | None:
        value = self.args.get("resume_from_checkpoint")
        return str(value) if value else None


@dataclass(frozen=True)
class GoFile(Record):
    """spares/K/go.json: hands a waiting spare the run file of the attempt it becomes."""

    run_file: str


# --- worker -> supervisor ----------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord(Record):
    """steps.jsonl, one per optimizer step (global rank 0)."""

    attempt: int
    step: int
    max_steps: int = 0
    tokens: int = 0
    """Real (non-padding) tokens of this step, all ranks."""
    seconds: float = 0.0
    time: float = 0.0
    first: bool = False
    """The attempt's first step (includes warm-up; left out of rates)."""
    mem_reserved: int | None = None


@dataclass(frozen=True)
class LogRecord(Record):
    """log.jsonl, one per Trainer log call; the numeric log values beside the step."""

    attempt: int
    step: int
    time: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    eval_loss: float | None = None
    epoch: float | None = None


@dataclass(frozen=True)
class BeatRecord(Record):
    """attempts/N/beat.json: rank 0 is busy but alive outside a training step (loading, tokenising,
    evaluating, saving). seq grows with every beat, so the reader needs no clock of the writer's."""

    attempt: int
    seq: int
    phase: str
    time: float = 0.0
    step: int | None = None


@dataclass(frozen=True)
class WorkerFailure(Record):
    """attempts/N/failure-rankR.json: the exception a rank died of."""

    type: str
    message: str = ""
    phase: str = "setup"
    """"setup" (before the attempt's first step) or "train"."""
    rank: int = 0
    kinds: tuple[str, ...] = ()
    """The exception's class and its bases, so a subclass counts as its base."""
    errno: int | None = None
    attempt: int = 0
    time: float = 0.0
    traceback: str = ""

    def is_a(self, names: frozenset[str]) -> bool:
        return self.type in names or any(k in names for k in self.kinds)


@dataclass(frozen=True)
class StopRecord(Record):
    """stopped.json: the attempt stopped on request; checkpoint is the one it saved (None: none)."""

    attempt: int
    step: int | None = None
    checkpoint: str | None = None
    time: float = 0.0


@dataclass(frozen=True)
class Completion(Record):
    """completed.json: training and the final save returned (written by global rank 0)."""

    attempt: int
    time: float = 0.0


@dataclass(frozen=True)
class Marker(Record):
    """checkpoint-N/.ft-complete.json: written last, after every rank saved; its file list is the truth."""

    step: int
    world_size: int = 1
    files: dict[str, int] = field(default_factory=dict)
    time: float = 0.0


# --- supervisor -> later readers ---------------------------------------------------------------


@dataclass(frozen=True)
class LaunchRecord(Record):
    """attempts/N/launch.json: the command an attempt ran, and the spare's go file when it ran on one."""

    argv: list[str]
    cwd: str
    spare: str | None = None


@dataclass(frozen=True)
class AttemptOutcome(Record):
    """attempts/N/outcome.json: how an attempt ended, read back by later supervisors (crash loops)."""

    attempt: int
    exit_code: int
    start_step: int
    """Global step the attempt resumed from (0 for a fresh start)."""
    last_step: int | None = None
    """Last optimizer step the attempt completed (None when it never reached one)."""
    failure: WorkerFailure | None = None
    hung: bool = False
    stop_requested: bool = False
    stopped_cleanly: bool = False
    completed: bool = False
    disk_full: bool = False
    """The output volume had no room left when the attempt ended (read by the supervisor)."""
    verdict: str | None = None

    @property
    def progressed(self) -> bool:
        return self.last_step is not None and self.last_step > self.start_step


@dataclass(frozen=True)
class Progress(Record):
    step: int
    max_steps: int
    tokens: int
    tokens_per_s: float
    seconds_per_step: float
    eta_s: float | None
    loss: float | None
    first_loss: float | None
    learning_rate: float | None = None


@dataclass(frozen=True)
class StatusRecord(Record):
    """status.json: the supervisor's view, for `status`, healthchecks and the soak."""

    state: RunState
    output_dir: str
    pid: int = 0
    host: str = ""
    attempt: int | None = None
    restarts: int = 0
    steps_lost: list[int] = field(default_factory=list)
    progress: Progress | None = None
    updated: float = 0.0
    resumed_from: int | None = None
    verdict: str | None = None
    next_restart_in_s: float | None = None
    last_checkpoint: int | None = None
    """Step of the newest checkpoint a worker marked complete."""
    last_checkpoint_time: float | None = None


@dataclass(frozen=True)
class Heartbeat(Record):
    """FT_HEARTBEAT_FILE: the supervisor is alive and in `state` (the image's HEALTHCHECK reads it)."""

    state: RunState
    time: float
    step: int | None = None
    output_dir: str = ""
    pid: int = 0


@dataclass(frozen=True)
class Owner(Record):
    """.ft/owner.json: who holds the run's lock, for the line a second start prints."""

    pid: int
    host: str
    since: float
    output_dir: str = ""


@dataclass(frozen=True)
class RunMeta(Record):
    """.ft/run-meta.json: what the run was started with, compared on later starts."""

    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    deepspeed: str | None = None


@dataclass(frozen=True)
class ConfigRecord(Record):
    """.ft/config.json: the settings this run last started with, compared at every later start."""

    settings: dict[str, Any]
    time: float = 0.0


@dataclass(frozen=True)
class DataReady(Record):
    """.ft/data-ready.json: an attempt with these data settings (policy/timeouts.data_key) reached a
    step, so their tokenised dataset is in the cache and later attempts skip tokenisation."""

    key: str
    attempt: int
    time: float = 0.0


@dataclass(frozen=True)
class Event(Record):
    """events.jsonl: launches, train begins, saves, tweaks, worker imports (for benchmarks and status).
    The event's own numbers ride in `data`."""

    event: str
    attempt: int
    time: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


# --- multi-node: the head and the other nodes' supervisors -------------------------------------


@dataclass(frozen=True)
class JobRecord(Record):
    """.ft/job.json: written by the head's supervisor at each start. Another node that reads the token
    the head told it over the network sees the same volume; the config hash must match its own."""

    token: str
    nnodes: int
    config_hash: str
    head_host: str = ""
    since: float = 0.0


@dataclass(frozen=True)
class NodeEnd(Record):
    """attempts/N/node-K.json: node K's part of attempt N ended, and how (each node's supervisor)."""

    node: int
    attempt: int
    exit_code: int
    hung: bool = False
    time: float = 0.0


@dataclass(frozen=True)
class StopRequest(Record):
    """stops/node-K.json: node K's supervisor was asked to stop; the whole job stops with a checkpoint."""

    job: str
    node: int
    signum: int
    attempt: int | None = None
    time: float = 0.0


@dataclass(frozen=True)
class JobEnd(Record):
    """.ft/job-end.json: the head's last word on a job; the other nodes exit the same way."""

    job: str
    state: RunState
    exit_code: int
    message: str = ""
    time: float = 0.0
