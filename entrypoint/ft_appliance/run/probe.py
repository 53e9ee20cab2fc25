"""Batch autotune's probes: short real training runs through the normal supervisor, largest
micro-batch first, until one fits (policy/autotune.py decides). Only running out of memory means
"does not fit": any other failure stops autotune at once with the probe's log, since it would fail
every other size the same way.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.args import grad_accum, per_device
from ..config.plan import Plan
from ..errors import ApplianceError, Stopped
from ..policy.autotune import PROBE_STEPS, TARGET, cache_key, candidates, choose, probe_plan, updates_for
from ..policy.restarts import RESOURCE_ERRORS
from ..state import files
from ..state.history import earlier_outcomes
from ..state.layout import StateDir, read_records
from ..state.records import StepRecord
from .loop import Supervisor
from .signals import Shutdown


@dataclass(frozen=True)
class ProbeResult:
    peak: int | None = None
    """Peak reserved bytes over the probe's steps (it fit)."""
    oom: bool = False
    error: str | None = None
    log: Path | None = None


def run_probe(probe: Plan, shutdown: Shutdown) -> ProbeResult:
    shutil.rmtree(probe.output_dir, ignore_errors=True)  # the appliance's own scratch, not a run
    sd = StateDir(probe.output_dir)
    try:
        Supervisor(probe, lambda _line: None, shutdown).run()
    except Stopped:
        raise
    except ApplianceError as exc:
        last = (earlier_outcomes(sd) or [None])[-1]
        log = sd.output_log(last.attempt) if last else None
        if last is not None and last.failure is not None and last.failure.is_a(RESOURCE_ERRORS):
            return ProbeResult(oom=True, log=log)
        return ProbeResult(error=exc.message, log=log)
    peaks = [r.mem_reserved or 0 for r in read_records(sd.steps, StepRecord)]
    return ProbeResult(peak=max(peaks, default=0) or None)


def autotune(
    plan: Plan,
    gpu_name: str,
    gpu_bytes: int,
    world: int,
    cache: Path,
    shutdown: Shutdown,
    echo: Callable[[str], None],
    probe: Callable[[Plan, Shutdown], ProbeResult] = run_probe,
) -> tuple[dict[str, Any], list[str]]:
    """(argument updates, notes); the decision is cached per model, card and settings. `probe` is
    run_probe; tests pass a recorded memory profile of a card instead."""
    per, ga = per_device(plan.args), grad_accum(plan.args)
    key = cache_key(plan.args, gpu_name, world)
    data = files.read_json(cache)
    cached = data.get(key) if isinstance(data, dict) else None
    if isinstance(cached, dict) and isinstance(cached.get("micro"), int):
        note = f"autotune: micro-batch {cached['micro']} from the cache ({cache.name}, key {key})"
        return updates_for(per, ga, cached["micro"], world, note)
    peaks: dict[int, int | None] = {}
    for m, _ in candidates(per, ga):
        echo(f"[ft] autotune: probing micro-batch {m} ({PROBE_STEPS} steps)")
        result = probe(probe_plan(plan, m, StateDir(plan.output_dir).autotune / f"micro-{m}"), shutdown)
        if result.error:
            raise ApplianceError(f"autotune probe of micro-batch {m} failed: {result.error} (log: {result.log})")
        peaks[m] = result.peak
        echo(
            f"[ft] autotune: micro-batch {m}: "
            + (f"peak {result.peak / 2**30:.1f} GiB" if result.peak else "out of memory")
        )
        if choose(peaks, gpu_bytes) is not None:
            break
    micro = choose(peaks, gpu_bytes)
    if micro is None:
        return {}, [f"autotune: no micro-batch fit within {TARGET:.0%} of GPU memory; keeping the config's"]
    _save(cache, key, {"micro": micro, "peaks": {str(k): v for k, v in peaks.items()}, "gpu": gpu_name})
    peak = peaks[micro] or 0
    note = (
        f"autotune: micro-batch {micro} peaked at {peak / 2**30:.1f} GiB of {gpu_bytes / 2**30:.0f} GiB "
        f"(target {TARGET:.0%})"
    )
    return updates_for(per, ga, micro, world, note)


def _save(cache: Path, key: str, value: dict[str, Any]) -> None:
    data = files.read_json(cache)
    data = data if isinstance(data, dict) else {}
    data[key] = value
    try:
        files.write_json(cache, data)
    except OSError:
        pass  # a read-only cache only costs the probes next time
