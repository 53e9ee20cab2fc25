"""Honest progress numbers across restarts, computed from the workers' step and log records.

LlamaFactory's own trainer_log.jsonl repeats the steps redone after a resume and resets its timers;
here every step counts once (the attempt that last completed it wins), so tokens, tokens/s, ETA and
the final loss stay right however often training restarted. Pure functions over plain records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def latest_per_step(records: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """step -> the record of the last attempt that completed that step (file order is time order)."""
    out: dict[int, dict[str, Any]] = {}
    for rec in records:
        step = rec.get("step")
        if isinstance(step, int):
            out[step] = rec
    return out


@dataclass(frozen=True)
class Progress:
    step: int
    max_steps: int
    tokens: int
    tokens_per_s: float
    seconds_per_step: float
    eta_s: float | None
    loss: float | None
    first_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def progress(steps: Sequence[dict[str, Any]], logs: Sequence[dict[str, Any]], recent: int = 20) -> Progress | None:
    kept = latest_per_step(steps)
    if not kept:
        return None
    # Only steps up to the newest one count: after a resume, steps beyond it belong to a dead attempt.
    current = steps[-1]
    step = int(current["step"])
    kept = {s: r for s, r in kept.items() if s <= step}
    max_steps = int(current.get("max_steps") or step)
    tokens = sum(int(r.get("tokens", 0)) for r in kept.values())
    window = [kept[s] for s in sorted(kept)[-recent:]]
    # The first step of an attempt includes warm-up (compilation, allocator), so it is left out of
    # the rate when there is anything else to go on.
    steady = [r for r in window if not r.get("first")] or window
    w_seconds = sum(float(r.get("seconds", 0.0)) for r in steady)
    w_tokens = sum(int(r.get("tokens", 0)) for r in steady)
    s_per_step = w_seconds / len(steady) if steady else 0.0
    losses = latest_per_step([r for r in logs if "loss" in r])
    loss_steps = sorted(s for s in losses if s <= step)
    return Progress(
        step=step,
        max_steps=max_steps,
        tokens=tokens,
        tokens_per_s=(w_tokens / w_seconds) if w_seconds > 0 else 0.0,
        seconds_per_step=s_per_step,
        eta_s=(max_steps - step) * s_per_step if s_per_step > 0 else None,
        loss=float(losses[loss_steps[-1]]["loss"]) if loss_steps else None,
        first_loss=float(losses[loss_steps[0]]["loss"]) if loss_steps else None,
    )


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_progress(p: Progress) -> str:
    pct = 100.0 * p.step / p.max_steps if p.max_steps else 0.0
    loss = f"{p.loss:.4f}" if p.loss is not None else "-"
    return (
        f"step {p.step}/{p.max_steps} ({pct:.0f}%)  loss {loss}  "
        f"{p.tokens_per_s:,.0f} tok/s  {p.seconds_per_step:.2f} s/step  ETA {format_duration(p.eta_s)}"
    )


def steps_lost(crashed_at: int | None, resumed_from: int) -> int:
    """Optimizer steps a crash threw away: done before it, redone after it."""
    return max(0, (crashed_at or 0) - resumed_from)
