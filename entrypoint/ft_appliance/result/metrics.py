"""Prometheus metrics of a run, from its StatusRecord (the same record `status` and the progress lines
read): a textfile on the volume for node exporters' textfile collector, and an optional HTTP endpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..state.records import RunState, StatusRecord

PREFIX = "ft"
# name -> (help, the value from a StatusRecord and the time now; None when not known yet)
GAUGES: dict[str, tuple[str, Callable[[StatusRecord, float], float | None]]] = {
    "step": ("Optimizer steps done (each counted once across restarts).", lambda s, _: _p(s, "step")),
    "max_steps": ("Optimizer steps the run trains in all.", lambda s, _: _p(s, "max_steps")),
    "loss": ("Latest logged training loss.", lambda s, _: _p(s, "loss")),
    "learning_rate": ("Latest logged learning rate.", lambda s, _: _p(s, "learning_rate")),
    "tokens_per_second": ("Real (non-padding) tokens per second, all ranks.", lambda s, _: _p(s, "tokens_per_s")),
    "eta_seconds": ("Estimated seconds to the last step.", lambda s, _: _p(s, "eta_s")),
    "restarts": ("Restarts of the run so far (by any supervisor).", lambda s, _: float(s.restarts)),
    "steps_lost": ("Steps redone because of restarts, in all.", lambda s, _: float(sum(s.steps_lost))),
    "last_checkpoint_step": ("Step of the newest complete checkpoint.", lambda s, _: _f(s.last_checkpoint)),
    "last_checkpoint_age_seconds": (
        "Seconds since the newest complete checkpoint was marked.",
        lambda s, now: now - s.last_checkpoint_time if s.last_checkpoint_time else None,
    ),
    "updated_timestamp_seconds": ("When the supervisor last wrote the run's status.", lambda s, _: s.updated),
}


def _f(value: Any) -> float | None:
    return None if value is None else float(value)


def _p(st: StatusRecord, name: str) -> float | None:
    return _f(getattr(st.progress, name)) if st.progress is not None else None


def values(st: StatusRecord, now: float) -> dict[str, float]:
    """The metrics a record gives, by name (unknown ones are left out rather than exported as 0)."""
    out = {name: fn(st, now) for name, (_, fn) in GAUGES.items()}
    return {k: v for k, v in out.items() if v is not None}


class StatusCollector:
    """A prometheus_client collector over whatever record `current` returns at scrape time."""

    def __init__(self, current: Callable[[], StatusRecord | None]) -> None:
        self.current = current

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        st = self.current()
        if st is None:
            return
        run = Path(st.output_dir).name
        for name, value in values(st, time.time()).items():
            family = GaugeMetricFamily(f"{PREFIX}_{name}", GAUGES[name][0], labels=["run"])
            family.add_metric([run], value)
            yield family
        state = GaugeMetricFamily(f"{PREFIX}_state", "1 for the run's current state.", labels=["run", "state"])
        for s in RunState:
            state.add_metric([run, s.value], 1.0 if s is st.state else 0.0)
        yield state


def registry_for(current: Callable[[], StatusRecord | None]) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(current))
    return registry


def write_textfile(path: Path, registry: Any) -> None:
    """Atomic (prometheus_client writes a temporary file and renames it), as the textfile collector needs."""
    from prometheus_client import write_to_textfile

    write_to_textfile(str(path), registry)


def serve(port: int, registry: Any, addr: str = "0.0.0.0") -> Any:
    """The /metrics endpoint in a daemon thread; returns the server (shutdown() stops it)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
