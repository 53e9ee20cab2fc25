"""Full fine-tuning's background saves, with real LlamaFactory and 2 CPU processes: the files are those
an in-step save writes, resume reads them, and a stop waits for them before it reports its checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from ft_appliance.state.files import read_jsonl
from ft_appliance.state.layout import MARKER
from safetensors.torch import load_file

from tests.helpers import last_step, run_cli, start_cli, trainer_state, wait_for

pytestmark = pytest.mark.slow

FAST = ["--nproc", "2", "--backoff", "0.2"]
FULL = {"finetuning_type": "full", "lora_rank": None, "lora_target": None, "logging_steps": 2}
BACKGROUND = "saves: weights and optimizer copied to host memory in the step, written to disk in the background"


def _out(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["output_dir"])


def _train(cfg: Path, *extra: str) -> str:
    res = run_cli("train", str(cfg), *FAST, *extra, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    return res.stdout


def _same_files(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(p / "optimizer.pt", weights_only=False) for p in (a, b))
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        assert all(torch.equal(v, ob["state"][i][k]) for k, v in state.items())
    sa, sb = (torch.load(p / "scheduler.pt", weights_only=False) for p in (a, b))
    assert sa == sb


def test_background_saves_write_what_in_step_saves_write(make_config) -> None:
    bg = make_config("bg", max_steps=12, save_steps=6, **FULL)
    sync = make_config("sync", max_steps=12, save_steps=6, **FULL)
    assert BACKGROUND in _train(bg)
    assert BACKGROUND not in _train(sync, "--sync-saves")
    for step in (6, 12):
        a, b = _out(bg) / f"checkpoint-{step}", _out(sync) / f"checkpoint-{step}"
        assert (a / MARKER).exists() and (a / "trainer_state.json").exists()
        assert not list(a.glob("*.ft-pending"))
        _same_files(a, b)  # the host copy is the state at the save's step, not a later one
    saves = [e["data"] for e in read_jsonl(_out(bg) / ".ft" / "events.jsonl") if e["event"] == "save"]
    assert [s["step"] for s in saves] == [6, 12] and all(0 <= s["stalled"] <= s["seconds"] for s in saves)


def test_a_stop_waits_for_the_background_write_and_resume_reads_it(make_config, tmp_path: Path) -> None:
    cfg = make_config("stop", max_steps=400, save_steps=50, **FULL)
    out = _out(cfg)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log")
    wait_for(lambda: last_step(out) >= 8, 180, what="step 8")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(120) == 143, (tmp_path / "log").read_text()[-3000:]
    s = json.loads((out / ".ft" / "stopped.json").read_text())["step"]
    ckpt = out / f"checkpoint-{s}"
    assert (ckpt / MARKER).exists() and (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == s
    assert BACKGROUND in (tmp_path / "log").read_text()
    assert f"resuming from checkpoint-{s}" in _train(cfg, f"max_steps={s + 4}")
    assert trainer_state(out)["global_step"] == s + 4


def test_training_goes_on_during_a_write_and_a_crash_mid_write_sets_the_checkpoint_aside(
    make_config, tmp_path: Path
) -> None:
    from ft_appliance.tools.procs import worker_ranks

    cfg = make_config("mid-write", max_steps=80, save_steps=20, **FULL)
    out = _out(cfg)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log")
    wait_for(lambda: (out / "checkpoint-20" / MARKER).exists(), 180, what="checkpoint-20")
    # checkpoint-40's optimizer state goes to a named pipe nobody reads: its background write blocks
    # in open(), as on a volume that stopped answering (torch.save opens the path itself).
    assert last_step(out) < 35
    (out / "checkpoint-40").mkdir()
    os.mkfifo(out / "checkpoint-40" / "optimizer.pt")
    wait_for(lambda: last_step(out) >= 45, 180, what="step 45, past the save at 40")  # training went on
    ckpt = out / "checkpoint-40"
    assert not (ckpt / MARKER).exists() and (ckpt / "trainer_state.json.ft-pending").exists()
    assert not (ckpt / "trainer_state.json").exists()  # what the resume's content check reads

    worker_ranks(out, 1)[-1].send_signal(signal.SIGKILL)  # a crash while the write hangs
    assert sup.wait(300) == 0, (tmp_path / "log").read_text()[-3000:]
    log = (tmp_path / "log").read_text()
    assert "set aside checkpoint-40" in log
    assert json.loads((out / ".ft" / "attempts" / "2" / "run.json").read_text())["args"][
        "resume_from_checkpoint"
    ].endswith("checkpoint-20")
    aside = [p for p in (out / "ft-set-aside").iterdir() if p.name.startswith("checkpoint-40.")]
    assert len(aside) == 1 and (aside[0] / "trainer_state.json.ft-pending").exists()  # kept, not deleted
    assert (out / "checkpoint-40" / MARKER).exists() and trainer_state(out)["global_step"] == 80
