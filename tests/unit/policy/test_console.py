"""The console filter, by a table of real lines from LlamaFactory, transformers, DeepSpeed and torchrun."""

from __future__ import annotations

import pytest
from ft_appliance.policy.console import message_key, shown

LINES = [
    ("[ft-appliance worker] blockdiag-attention: 2 layers -> flex", True),
    ("[rank0]: [ft-appliance worker] warning: 3 MiB free on the output volume", True),
    (
        "[WARNING|2026-12-02 01:45:26] llamafactory.hparams.parser:149 >> We recommend enable mixed precision.",
        True,
    ),
    ("[WARNING|logging.py:333] 2026-12-02 01:45:27,149 >> `torch_dtype` is deprecated! Use `dtype` instead!", True),
    ("[ERROR|2026-12-02 01:45:26] llamafactory.data.loader:80 >> Cannot find dataset.", True),
    ("[2026-12-02 01:45:10,534] [WARNING] [real_accelerator.py:183:get_accelerator] Setting accelerator to CPU.", True),
    ("[INFO|2026-12-02 01:45:26] llamafactory.hparams.parser:468 >> Process rank: 0, world size: 2", False),
    ("[INFO|configuration_utils.py:667] 2026-12-02 01:45:26,958 >> loading configuration file config.json", False),
    ('  "hidden_size": 64,', False),
    ("E1202 01:48:47.321000 25214 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)", False),
    ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", False),
    ("Traceback (most recent call last):", False),
    ("W1202 01:45:09.000000 1 torch/distributed/run.py:803] Setting OMP_NUM_THREADS environment variable", False),
    ("{'loss': 5.98, 'grad_norm': 0.5, 'learning_rate': 0.004, 'epoch': 0.3}", False),
]


@pytest.mark.parametrize(("line", "keep"), LINES, ids=[line[:40] for line, _ in LINES])
def test_which_lines_reach_the_console(line: str, keep: bool) -> None:
    assert shown(line) is keep


def test_each_ranks_copy_of_a_message_is_one_message() -> None:
    a = "[2026-12-02 01:45:29,065] [WARNING] [real_accelerator.py:183:get_accelerator] Setting accelerator to CPU."
    b = "[2026-12-02 01:45:29,090] [WARNING] [real_accelerator.py:183:get_accelerator] Setting accelerator to CPU."
    assert message_key(a) == message_key(b)
    assert message_key("[rank1]: [ft-appliance worker] x") == message_key("[rank0]: [ft-appliance worker] x")
    assert message_key(a) != message_key("[WARNING|logging.py:333] 2026-12-02 01:45:27,149 >> other")
