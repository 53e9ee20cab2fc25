"""The loss curve as a PNG in the output folder, redrawn at every checkpoint and at the end, from the
run's own log records (policy/curve.py decides which points survive restarts)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..policy.curve import Curve, build_curve
from ..state.checkpoints import step_of
from ..state.layout import StateDir, read_record_or_none, read_records
from ..state.records import LogRecord, RunFile

CURVE_FILE = "loss_curve.png"


def curve_of(sd: StateDir) -> Curve:
    resumed = {}
    for n in sd.attempt_numbers():
        run = read_record_or_none(sd.run_file(n), RunFile)
        resumed[n] = (step_of(run.resume_from) or 0) if run else 0
    return build_curve(read_records(sd.log, LogRecord), resumed)


def draw(curve: Curve, path: Path, title: str) -> Path:
    """Training loss, evaluation loss, the learning rate on a second axis, a dashed line per restart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: safe outside the main thread

    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(curve.steps, curve.losses, color="tab:blue", linewidth=1.2, label="train loss")
    if curve.eval_steps:
        ax.plot(curve.eval_steps, curve.eval_losses, "o-", color="tab:green", label="eval loss")
    for i, step in enumerate(curve.restarts):
        ax.axvline(step, color="tab:red", linestyle="--", linewidth=0.8, label="restart" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if curve.lrs:
        lr = ax.twinx()
        lr.plot(curve.lr_steps, curve.lrs, color="tab:orange", linewidth=0.8, label="learning rate")
        lr.set_ylabel("learning rate")
        h2, l2 = lr.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def redraw(sd: StateDir) -> Path | None:
    curve = curve_of(sd)
    if not curve:
        return None
    last = curve.steps[-1] if curve.steps else 0
    return draw(curve, sd.output_dir / CURVE_FILE, f"{sd.output_dir.name}: {last} steps")


class CurveDrawer:
    """Redraws off the supervisor's thread, one drawing at a time; a request during a drawing is kept
    for one more. Errors (a full volume, say) are reported once and never stop the run."""

    def __init__(self, sd: StateDir, warn: Callable[[str], None]) -> None:
        self.sd = sd
        self.warn = warn
        self._lock = threading.Lock()
        self._pending = False
        self._thread: threading.Thread | None = None
        self._warned = False

    def request(self) -> None:
        with self._lock:
            self._pending = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="ft-curve", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                self._pending = False
            self._draw()

    def _draw(self) -> None:
        try:
            redraw(self.sd)
        except Exception as exc:  # a plot must never cost a run
            if not self._warned:
                self._warned = True
                self.warn(f"cannot draw the loss curve ({type(exc).__name__}: {exc}); training carries on")

    def finish(self) -> None:
        """At the end: wait for a drawing in flight, then draw the final curve."""
        thread = self._thread
        if thread is not None:
            thread.join(60)
        self._draw()
