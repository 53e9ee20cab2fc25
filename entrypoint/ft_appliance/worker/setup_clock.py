"""Where a worker's setup goes between its imports and train_begin.

LlamaFactory's workflows (llamafactory.train.<stage>.workflow) call load_tokenizer, get_dataset and
load_model (which also builds the adapter) by the names they import. Replacing those names in each
loaded workflow module with timed wrappers measures the phases without changing what they do; the
rest, up to train_begin, is the Trainer's setup (optimizer, a resumed checkpoint's state). Rank 0
records the seconds with its train_begin event (benchmarks/bench.py's startup breakdown).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PHASES = ("load_tokenizer", "get_dataset", "load_model")


@dataclass
class SetupClock:
    seconds: dict[str, float] = field(default_factory=dict)
    """Phase name -> seconds, summed over calls (a workflow with a reference model loads twice)."""

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            began = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - began, 2)

        call.ft_setup_clock = self  # type: ignore[attr-defined]
        return call

    def install(self, modules: dict[str, Any] | None = None) -> int:
        """Wrap the phases in every imported workflow module (run_exp's import loads them all);
        returns how many names were wrapped. Wrapping twice is a no-op."""
        wrapped = 0
        for name, module in list((sys.modules if modules is None else modules).items()):
            if not (name.startswith("llamafactory.train.") and name.endswith(".workflow")):
                continue
            for phase in PHASES:
                fn = getattr(module, phase, None)
                if callable(fn) and getattr(fn, "ft_setup_clock", None) is None:
                    setattr(module, phase, self.timed(phase, fn))
                    wrapped += 1
        return wrapped
