"""The process-group timeout of an attempt: raised to the startup limit while the dataset is not yet
tokenised and cached, the configured one after."""

from __future__ import annotations

import pytest
from ft_appliance.policy.timeouts import DEFAULT_DDP_TIMEOUT_S, attempt_timeout, data_key


@pytest.mark.parametrize(
    ("args", "cached", "startup", "want", "noted"),
    [
        ({}, False, 3600, 3600, True),  # transformers' 1800 s is shorter than the startup limit
        ({}, True, 3600, DEFAULT_DDP_TIMEOUT_S, False),
        ({"ddp_timeout": 3}, False, 600, 600, True),
        ({"ddp_timeout": 3}, True, 600, 3, False),  # cached: a hung collective is still noticed early
        ({"ddp_timeout": 180000000}, False, 3600, 180000000, False),  # LlamaFactory's examples' value wins
        ({"ddp_timeout": None}, True, 3600, DEFAULT_DDP_TIMEOUT_S, False),
    ],
)
def test_attempt_timeout(args: dict, cached: bool, startup: float, want: int, noted: bool) -> None:
    got, note = attempt_timeout(args, cached, startup)
    assert got == want and (note is not None) == noted
    if note:
        assert note.startswith(f"ddp_timeout {args.get('ddp_timeout') or DEFAULT_DDP_TIMEOUT_S} s -> {want} s")


def test_the_data_key_changes_with_what_tokenisation_reads_and_only_that() -> None:
    base = {"dataset": "a", "cutoff_len": 1024, "template": "llama3", "learning_rate": 1e-4, "max_steps": 10}
    assert data_key(base) == data_key({**base, "learning_rate": 5e-5, "max_steps": 99, "ddp_timeout": 3})
    for change in ({"dataset": "b"}, {"cutoff_len": 2048}, {"template": "qwen"}, {"packing": True}):
        assert data_key({**base, **change}) != data_key(base)
