"""Read a LlamaFactory YAML plus `key=value` overrides and turn it into a Plan (preflight validates it).

Precedence: command-line `key=value` > the YAML file. The LlamaFactory arguments are kept as the
user wrote them; the appliance adds policy (resumable output, explicit resume) and its own
settings (process count, retries, timeouts) live beside them in the Plan, never in the YAML.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from ..state.records import AutotuneRequest
from .topology import Topology


def data_root() -> Path:
    """The data volume: /data in the container (FT_DATA to move it)."""
    return Path(os.environ.get("FT_DATA", "/data"))


def default_config() -> Path:
    return data_root() / "configs" / "train.yaml"


@dataclass(frozen=True)
class RetryPolicy:
    max_restarts: int = 3
    """Restarts after abnormal exits before the run is marked failed."""
    backoff_s: float = 2.0
    """First wait before a restart; doubles each time up to backoff_max_s."""
    backoff_max_s: float = 60.0
    crash_loop_limit: int = 3
    """Consecutive failed attempts that end on the same step before giving up as a crash loop."""
    spare: bool = True
    """Keep a spare set of workers with the stack imported while training runs, to take over after a
    crash without importing it again."""


@dataclass(frozen=True)
class Timeouts:
    stop_grace_s: float = 120.0
    """After SIGTERM: time for training to save a checkpoint and exit before it is killed."""
    hang_s: float = 1800.0
    """No training step for this long (after the first) means a hang: kill and restart."""
    startup_s: float = 3600.0
    """Time allowed from launch to the first step (model load, tokenisation)."""
    join_s: float = 600.0
    """Multi-node: how long the head waits for the other nodes to join, and they for the head."""


@dataclass(frozen=True)
class Plan:
    config_path: Path
    args: dict[str, Any]
    """LlamaFactory arguments: the YAML with overrides and the appliance's policy applied."""
    output_dir: Path
    nproc: int
    workdir: Path
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    topology: Topology = field(default_factory=Topology)
    """Which node of the job this is (config/topology.py); one node unless the scheduler says otherwise."""
    notes: tuple[str, ...] = ()
    """Policy decisions worth a log line ("overwrite_output_dir forced off: ...")."""
    tweaks: tuple[str, ...] = ()
    """Changes the worker makes to the loaded model (profile.Profile.tweaks), each explained in notes."""
    autotune: AutotuneRequest | None = None
    """Set on GPUs with the profile: the workers choose the micro-batch (worker/autotune.py)."""
    background_saves: bool = False
    """Checkpoints written by a thread from host copies (policy/saves.py decides, worker/saves.py does it)."""


def read_yaml(path: Path) -> dict[str, Any]:
    """The config file as a dict; every failure is one ConfigError line naming the file."""
    if not path.exists():
        raise ConfigError(
            f"config file {path} does not exist: put your LlamaFactory YAML there "
            f"or pass its path (ft-appliance train PATH, or FT_CONFIG=PATH)"
        )
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory: pass the YAML file inside it")
    if path.suffix == ".json":
        raise ConfigError(f"config file {path} is JSON: write it as YAML (LlamaFactory 0.9.5 crashes on JSON)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    _check_shape(path, text)
    try:
        # LlamaFactory loads its YAML with OmegaConf (which, unlike plain PyYAML, reads 2e-4 as a
        # number and resolves ${...}); load it the same way so the worker sees the same values.
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=True) if text.strip() else None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    except OmegaConfBaseException as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {path} cannot be read as a LlamaFactory config: {first}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty: it needs LlamaFactory keys (model_name_or_path, ...)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of LlamaFactory keys, not a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {path}: key {bad[0]!r} is not a string")
    return data


def _check_shape(path: Path, text: str) -> None:
    """A file that is YAML but not a mapping (`42`, `true`, a line of text) makes OmegaConf assert."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # OmegaConf reports it with its line and column
    if data is not None and not isinstance(data, dict):
        what = f"the text {data!r:.40}" if isinstance(data, str) else f"a {type(data).__name__} ({data!r:.40})"
        raise ConfigError(f"config file {path} must be a mapping of LlamaFactory keys (key: value lines), not {what}")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings, typed as LlamaFactory's own CLI types them (OmegaConf dotlist)."""
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (for example: max_steps=100)")
        if not item.partition("=")[2].strip():
            raise ConfigError(f"override {item!r} has no value: write {key}=VALUE, or leave it out")
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist(list(items)), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"overrides {' '.join(items)!r} cannot be read: {str(exc).splitlines()[0]}") from None
    return dict(parsed)


def resolve_output_dir(args: Mapping[str, Any], workdir: Path) -> Path:
    raw = args.get("output_dir")
    if not raw or not isinstance(raw, str):
        raise ConfigError("config has no output_dir: set output_dir (for example /data/output/my-run)")
    path = Path(raw)
    path = path if path.is_absolute() else (workdir / path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} is a file, not a directory: set output_dir to a folder (new or a run's)")
    return path


def apply_policy(
    args: Mapping[str, Any], output_dir: Path, multi_node: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """The appliance's changes to the user's arguments, each with its reason."""
    out = dict(args)
    notes: list[str] = []
    if out.get("overwrite_output_dir"):
        notes.append("overwrite_output_dir forced off: it deletes checkpoints and disables resume")
    out["overwrite_output_dir"] = False
    if multi_node and "data_shared_file_system" not in out:
        # The nodes share the volume and its dataset cache (HF_HOME): one rank of the job tokenises
        # for all of them, instead of one per node racing to write the same cache files.
        out["data_shared_file_system"] = True
        notes.append("data_shared_file_system on: the nodes share one dataset cache, so one rank tokenises for all")
    # Workers may run with another working directory (the container's); pin the path we checked.
    out["output_dir"] = str(output_dir)
    return out, notes


def build_plan(
    config_path: Path,
    overrides: Sequence[str] = (),
    *,
    nproc: int,
    workdir: Path | None = None,
    retry: RetryPolicy | None = None,
    timeouts: Timeouts | None = None,
    topology: Topology | None = None,
) -> Plan:
    workdir = (workdir or Path(os.getcwd())).resolve()
    file_args = read_yaml(config_path)
    merged = {**file_args, **parse_overrides(overrides)}
    output_dir = resolve_output_dir(merged, workdir)
    args, notes = apply_policy(merged, output_dir, bool(topology and topology.multi_node))
    if nproc < 1:
        raise ConfigError(f"process count {nproc} is not positive: pass --nproc N with N >= 1")
    return Plan(
        config_path=config_path.resolve(),
        args=args,
        output_dir=output_dir,
        nproc=nproc,
        workdir=workdir,
        retry=retry or RetryPolicy(),
        timeouts=timeouts or Timeouts(),
        topology=topology or Topology(),
        notes=tuple(notes),
    )
