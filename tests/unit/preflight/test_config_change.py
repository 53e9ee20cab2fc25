"""A config changed between starts, by table: keys that break the checkpoint and keys the resume
would ignore are refused (warnings with --allow-config-change), the rest are reported."""

from __future__ import annotations

import pytest
from ft_appliance.preflight.checks import Report, check_config_change, settings_of

BEFORE = settings_of({"model_name_or_path": "/m", "lora_rank": 8, "learning_rate": 1e-4, "max_steps": 100})


def judged(allow: bool = False, resume: int | None = 40, **changed: object) -> list[tuple[str, str]]:
    report = Report()
    args = {"model_name_or_path": "/m", "lora_rank": 8, "learning_rate": 1e-4, "max_steps": 100, **changed}
    check_config_change(BEFORE, args, resume, allow, report)
    return [(p.severity, p.message) for p in report.problems]


@pytest.mark.parametrize(
    ("changed", "severity", "needle"),
    [
        (
            {"lora_rank": 16},
            "error",
            "lora_rank changed from 8 to 16 since this run's checkpoint-40, which cannot load",
        ),
        ({"model_name_or_path": "/other"}, "error", "restore model_name_or_path: '/m', or use a new output_dir"),
        ({"finetuning_type": "full"}, "error", "finetuning_type changed from None to 'full'"),
        ({"learning_rate": 1e-3}, "error", "the saved optimizer and scheduler state win on resume"),
        ({"dataset": "other"}, "warning", "dataset changed from None to 'other'"),
        ({"max_steps": 30}, "error", "max_steps 30 is not beyond this run's checkpoint-40: nothing would train"),
    ],
)
def test_changes(changed: dict, severity: str, needle: str) -> None:
    found = judged(**changed)
    assert any(s == severity and needle in m for s, m in found), found


def test_allow_turns_refusals_into_warnings_and_nothing_matters_without_a_checkpoint() -> None:
    assert [s for s, _ in judged(allow=True, lora_rank=16)] == ["warning"]
    assert judged(resume=None, lora_rank=16) == []
    assert judged() == []
