"""accelerate's unwrapping imports deepspeed only for runs that use it (worker/deepspeed_import.py),
checked in a fresh interpreter with the real accelerate and deepspeed of the lock."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ft_appliance.worker.deepspeed_import import uses_deepspeed

UNWRAP = """
import sys, torch
from accelerate.utils import extract_model_from_parallel
from ft_appliance.worker.deepspeed_import import skip_engine_lookup
if sys.argv[1] == "skip":
    assert skip_engine_lookup()
model = torch.nn.Linear(2, 2)
assert extract_model_from_parallel(torch.nn.DataParallel(model)) is model
print("deepspeed" in sys.modules)
"""


@pytest.mark.parametrize(("mode", "imported"), [("skip", "False"), ("upstream", "True")])
def test_unwrapping_imports_deepspeed_only_without_the_skip(mode: str, imported: str) -> None:
    pytest.importorskip("deepspeed")
    res = subprocess.run([sys.executable, "-c", UNWRAP, mode], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == imported


def test_a_run_uses_deepspeed_by_its_config_key_or_accelerates_switch() -> None:
    rows = [
        ({"deepspeed": "examples/deepspeed/ds_z3_config.json"}, {}, True),
        ({"deepspeed": None}, {}, False),
        ({}, {}, False),
        ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, True),
        ({}, {"ACCELERATE_USE_DEEPSPEED": "false"}, False),
    ]
    for args, env, expected in rows:
        assert uses_deepspeed(args, env) is expected, (args, env)
