"""The whole story of a run, from its folder alone (while training, after a crash, after the end, or
copied from another machine): state, progress, restarts, every checkpoint with its verdict, and what
the run produced. `status` prints it; `status --json` gives the same fields."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..policy.checkpoints import Candidate, choose_resume
from ..policy.progress import format_duration, format_progress
from ..state import checkpoints
from ..state.checkpoints import SET_ASIDE_DIR
from ..state.layout import StateDir, read_record
from ..state.records import RunState, StatusRecord
from .curve import CURVE_FILE

PRODUCTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
GAVE_UP = {
    "retry": "gave up (restarts used up)",
    "crash_loop": "gave up (crash loop)",
    "no_space": "gave up (volume full)",
}
ASIDE_RE = re.compile(r"^(?P<name>[^.]+)\.(?P<reason>[a-z0-9-]+)\.(?P<when>\d{8}T\d{6}Z)")


def display_state(st: StatusRecord, supervisor_alive: bool) -> str:
    """running, finished, stopped, crashed, gave up (why), or supervisor gone."""
    if st.state.live:
        if not supervisor_alive:
            return "supervisor gone"
        return "restarting" if st.state is RunState.RESTARTING else "running"
    if st.state is RunState.FAILED:
        return GAVE_UP.get(st.verdict or "", "crashed")
    return {RunState.ALREADY_FINISHED: "finished"}.get(st.state, st.state.value)


@dataclass
class CheckpointView:
    name: str
    step: int | None
    verdict: str
    """complete, resume point, incomplete (set aside at the next start), or set aside."""
    reason: str = ""


@dataclass
class Story:
    state: str
    output_dir: str
    supervisor_alive: bool
    status: dict[str, Any]
    checkpoints: list[CheckpointView] = field(default_factory=list)
    products: list[str] = field(default_factory=list)
    loss_curve: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_views(output_dir: Path) -> list[CheckpointView]:
    found = checkpoints.scan(output_dir)
    chosen = choose_resume(found)

    def verdict(c: Candidate) -> str:
        return "resume point" if c is chosen else "complete" if c.complete else "incomplete"

    views = [CheckpointView(c.path.name, c.step, verdict(c), c.reason) for c in found]
    aside = output_dir / SET_ASIDE_DIR
    for path in sorted(aside.iterdir()) if aside.is_dir() else []:
        m = ASIDE_RE.match(path.name)
        name, reason = (m["name"], m["reason"].replace("-", " ")) if m else (path.name, "")
        views.append(CheckpointView(f"{SET_ASIDE_DIR}/{path.name}", checkpoints.step_of(name), "set aside", reason))
    return views


def read_story(output_dir: Path) -> Story | None:
    """None when the folder holds no run state."""
    from ..state.lock import holder_pid

    sd = StateDir(output_dir)
    st = read_record(sd.status, StatusRecord)  # BadRecord passes up: the caller prints its line
    if st is None:
        return None
    alive = holder_pid(sd.lock) is not None
    curve = output_dir / CURVE_FILE
    return Story(
        state=display_state(st, alive),
        output_dir=str(output_dir),
        supervisor_alive=alive,
        status=st.to_dict(),
        checkpoints=checkpoint_views(output_dir),
        products=[str(output_dir / n) for n in PRODUCTS if (output_dir / n).exists()],
        loss_curve=str(curve) if curve.exists() else None,
    )


def story_lines(story: Story, now: float | None = None) -> list[str]:
    st = StatusRecord.from_dict(story.status)
    now = time.time() if now is None else now
    head = f"{story.state}: {story.output_dir}"
    if story.state == "supervisor gone":
        head += f" (pid {st.pid} on {st.host} no longer holds the run: start again to resume)"
    lines = [head, f"  updated {format_duration(now - st.updated)} ago by pid {st.pid} on {st.host}"]
    lines.append("  " + (format_progress(st.progress) if st.progress else "no step yet"))
    lines.append(f"  restarts {st.restarts}; steps lost {sum(st.steps_lost)} {st.steps_lost or ''}".rstrip())
    if st.last_checkpoint is not None and st.last_checkpoint_time:
        age = format_duration(now - st.last_checkpoint_time)
        lines.append(f"  last complete checkpoint: step {st.last_checkpoint}, {age} ago")
    lines.append(f"  checkpoints ({len(story.checkpoints)}):" if story.checkpoints else "  checkpoints: none")
    for c in story.checkpoints:
        lines.append(f"    {c.name:<24} {c.verdict}" + (f" ({c.reason})" if c.reason else ""))
    for p in story.products:
        lines.append(f"  produced: {p}")
    if story.loss_curve:
        lines.append(f"  loss curve: {story.loss_curve}")
    return lines
