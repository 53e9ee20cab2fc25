"""DeepSpeed's import, paid where a run uses DeepSpeed and nowhere else.

accelerate's unwrap_model, which the Trainer calls in its __init__ (and at every save), imports
deepspeed whenever the package is installed, only to add DeepSpeedEngine to the wrapper types it
strips (accelerate 1.11, utils/other.py extract_model_from_parallel). That import pulls in torch's
inductor and compiles DeepSpeed's scripted helpers: 1.3 s on the CI machine, more on a cold one, at
every start and restart, on the spare too (it imports only the stack), for runs with no engine to
strip. A run whose arguments name no DeepSpeed config cannot have one, so the check is left out.
A run that does use DeepSpeed has its spare import deepspeed while it waits (worker/ahead.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def uses_deepspeed(args: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> bool:
    """The `deepspeed` key LlamaFactory passes to the Trainer, or accelerate's own switch for it."""
    env = os.environ if environ is None else environ
    return bool(args.get("deepspeed")) or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def skip_engine_lookup() -> bool:
    """Tell accelerate's unwrapping that deepspeed is not there (that module's name only; every other
    caller still sees the package); False where accelerate's layout differs and nothing was changed."""
    try:
        from accelerate.utils import other
    except ImportError:
        return False
    if not callable(getattr(other, "is_deepspeed_available", None)):
        return False
    other.is_deepspeed_available = _not_available
    return True


def _not_available() -> bool:
    return False
