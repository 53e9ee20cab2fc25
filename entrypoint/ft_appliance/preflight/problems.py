"""A finding of a check: one line saying what is wrong and how to fix it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Problem:
    check: str
    """Short stable id of the check ("config.unknown_key", "gpu.count", ...)."""
    message: str
    severity: Severity = "error"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]
