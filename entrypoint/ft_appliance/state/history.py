"""What earlier supervisors of a run left behind: whether it finished, and how its attempts ended."""

from __future__ import annotations

from pathlib import Path

from . import files
from .layout import StateDir, read_record_or_none
from .records import AttemptOutcome, Completion


def is_finished(output_dir: Path) -> bool:
    """Finished by the appliance (its completion record), or by plain LlamaFactory (its final results)."""
    sd = StateDir(output_dir)
    if read_record_or_none(sd.completed, Completion) is not None:
        return True
    results = files.read_json(output_dir / "all_results.json")
    return isinstance(results, dict) and "train_runtime" in results


def earlier_outcomes(sd: StateDir) -> list[AttemptOutcome]:
    """Attempts of this run in order, whichever process saw them: a crash loop is a crash loop
    across container restarts too. Unreadable outcomes (a supervisor killed mid-write) are skipped."""
    found = (read_record_or_none(sd.outcome_file(n), AttemptOutcome) for n in sd.attempt_numbers())
    return [o for o in found if o is not None]
