"""The barrier timeout while rank 0 tokenises a large dataset, with a slow tokenisation for real: plain
LlamaFactory under torchrun dies in the barrier; the appliance raises the process-group timeout for
the attempt that tokenises, and the attempt after a crash finds the dataset cached, skips
tokenisation and keeps the configured timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ft_appliance.state.layout import MARKER, StateDir
from ft_appliance.tools.demo import make_examples

from tests.helpers import kill_training, last_step, start_cli, wait_for

pytestmark = pytest.mark.slow

# Enough examples that tokenising them takes several times the configured timeout on two cores.
EXAMPLES = 60_000
TIMEOUT_S = 3


@pytest.fixture
def big_config(make_config, tmp_path: Path) -> Path:
    data = tmp_path / "datasets"
    data.mkdir()
    (data / "big.json").write_text(json.dumps(make_examples(EXAMPLES, seed=1)))
    (data / "dataset_info.json").write_text(json.dumps({"big": {"file_name": "big.json"}}))
    return make_config(
        "big", dataset="big", dataset_dir=str(data), ddp_timeout=TIMEOUT_S, max_steps=30, save_steps=5, logging_steps=5
    )


def test_plain_llamafactory_dies_in_the_barrier_while_rank_0_tokenises(big_config: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-plain"), "DISABLE_VERSION_CHECK": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", "29747", "-m", "llamafactory.launcher", str(big_config)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode != 0
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in res.stdout + res.stderr


def test_the_appliance_waits_out_tokenisation_once_then_keeps_the_configured_timeout(
    big_config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "output" / "big"
    sd = StateDir(out)
    env = {"HF_HOME": str(tmp_path / "hf")}
    sup = start_cli(
        "train", str(big_config), "--nproc", "2", "--backoff", "0.2", "--no-spare", "--startup-timeout", "600",
        log=tmp_path / "train.log", env=env,
    )  # fmt: skip
    # The supervisor marks the dataset cached when it sees the attempt's first step.
    wait_for(lambda: (out / "checkpoint-5" / MARKER).exists() and sd.data_ready.exists(), 300, what="step 5")
    kill_training(out)  # a crash: the supervisor starts attempt 2
    assert sup.wait(400) == 0
    log = (tmp_path / "train.log").read_text()
    first, second = (json.loads(sd.run_file(n).read_text())["args"] for n in (1, 2))
    assert first["ddp_timeout"] == 600 and second["ddp_timeout"] == TIMEOUT_S
    assert log.count(f"ddp_timeout {TIMEOUT_S} s -> 600 s (the startup limit) for this attempt") == 1
    assert "Running tokenizer on dataset" in sd.output_log(1).read_text()
    assert "Running tokenizer on dataset" not in sd.output_log(2).read_text()  # cached: skipped
    assert last_step(out) == 30 and not (sd.attempts / "3").exists()
