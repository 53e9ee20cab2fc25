"""What a run produced and how it went, as lines for people: the attempt descriptions, the final
summary, and the artifacts list."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..state.records import AttemptOutcome, Progress, RunState

ARTIFACT_NAMES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "all_results.json",
    "train_results.json",
    "trainer_log.jsonl",
    "loss_curve.png",
)


@dataclass
class RunResult:
    state: RunState
    """FINISHED or ALREADY_FINISHED."""
    output_dir: Path
    step: int = 0
    max_steps: int = 0
    restarts: int = 0
    steps_lost: list[int] = field(default_factory=list)
    progress: Progress | None = None
    artifacts: list[str] = field(default_factory=list)
    attempts: list[AttemptOutcome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "output_dir": str(self.output_dir),
            "step": self.step,
            "max_steps": self.max_steps,
            "restarts": self.restarts,
            "steps_lost": self.steps_lost,
            "progress": self.progress.to_dict() if self.progress else None,
            "artifacts": self.artifacts,
            "attempts": [a.to_dict() for a in self.attempts],
        }


def artifacts(output_dir: Path) -> list[str]:
    return [str(output_dir / n) for n in ARTIFACT_NAMES if (output_dir / n).exists()]


def describe(o: AttemptOutcome) -> str:
    if o.hung:
        return f"hung after step {o.last_step}" if o.last_step is not None else "hung before the first step"
    where = f"after step {o.last_step}" if o.last_step is not None else "before the first step"
    if o.failure:
        return f"{o.failure.type}: {o.failure.message} on rank {o.failure.rank}, {where}"
    if o.exit_code < 0:
        return f"killed by signal {-o.exit_code}, {where}"
    return f"exit code {o.exit_code}, {where}"


def summary_lines(result: RunResult) -> list[str]:
    if result.state is RunState.ALREADY_FINISHED:
        return [f"already finished: {result.output_dir}", *[f"  {a}" for a in result.artifacts]]
    p = result.progress
    lines = [f"finished: {result.step}/{result.max_steps} steps in {result.output_dir}"]
    if p is not None:
        first = f"{p.first_loss:.4f}" if p.first_loss is not None else "-"
        last = f"{p.loss:.4f}" if p.loss is not None else "-"
        lines.append(
            f"  loss {first} -> {last}; {p.tokens:,} tokens at {p.tokens_per_s:,.0f} tok/s "
            f"({p.seconds_per_step:.2f} s/step)"
        )
    lines.append(
        f"  restarts {result.restarts}; steps lost {sum(result.steps_lost)} {result.steps_lost or ''}".rstrip()
    )
    lines += [f"  {a}" for a in result.artifacts]
    return lines
