"""LlamaFactory stages whose trainers add callbacks of their own: a reward model (`stage: rm`) killed
after a save resumes from its newest checkpoint instead of starting over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ft_appliance.state import checkpoints
from ft_appliance.state.layout import MARKER
from ft_appliance.tools.procs import kill_run

from tests.helpers import max_abs_diff, read_adapter, run_cli, start_cli, trainer_state, wait_for

pytestmark = pytest.mark.slow

FAST = ["--nproc", "2", "--backoff", "0.2"]


def pairs_dataset(root: Path) -> Path:
    """A pairwise (ranking) dataset in LlamaFactory's alpaca layout, its own dataset_dir."""
    data = root / "pairs"
    data.mkdir()
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "", "chosen": str(2 * i + 1), "rejected": str(2 * i)}
        for i in range(64)
    ]
    (data / "pairs.json").write_text(json.dumps(rows))
    columns = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    info = {"pairs": {"file_name": "pairs.json", "ranking": True, "columns": columns}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    return data


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(str(out / "adapter_model.safetensors")), **load_file(str(out / "value_head.safetensors"))}


def test_a_reward_model_resumes_from_its_newest_checkpoint_to_the_uninterrupted_weights(make_config, tmp_path) -> None:
    data = pairs_dataset(tmp_path)
    common = {"stage": "rm", "dataset": "pairs", "dataset_dir": str(data), "max_steps": 60, "save_steps": 5,
              "logging_steps": 5}  # fmt: skip
    cfg = make_config("rm", **common)
    out = tmp_path / "output" / "rm"
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log")
    wait_for(lambda: (out / "checkpoint-10" / MARKER).exists(), 300, what="checkpoint-10 marked")
    kill_run(sup, out)
    ckpt = out / "checkpoint-10"
    assert (ckpt / "value_head.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    marker = json.loads((ckpt / MARKER).read_text())  # written after LlamaFactory's value-head rewrite
    assert "value_head.safetensors" in marker["files"] and "adapter_model.safetensors" in marker["files"]
    assert checkpoints.judge(ckpt)[0], checkpoints.judge(ckpt)
    newest = max(c.step for c in checkpoints.scan(out) if c.complete)
    assert newest < 60, "the run finished before the kill: nothing to resume"
    res = run_cli("train", str(cfg), *FAST, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"resuming from checkpoint-{newest}" in res.stdout and "set aside checkpoint" not in res.stdout
    assert trainer_state(out)["global_step"] == 60
    ref = run_cli("train", str(make_config("rm-ref", **common)), *FAST, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:]
    assert max_abs_diff(_weights(out), _weights(tmp_path / "output" / "rm-ref")) == 0.0


def test_oft_trains_across_two_processes(make_config, tmp_path: Path) -> None:
    """Plain LlamaFactory fails here in the first backward ("Expected to mark a variable ready only
    once"); preflight's non-reentrant checkpointing makes it train."""
    cfg = make_config("oft", finetuning_type="oft", oft_target="all", lora_rank=None, lora_target=None, max_steps=4,
                      save_steps=4)  # fmt: skip
    res = run_cli("train", str(cfg), *FAST, "--max-restarts", "0", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "use_reentrant_gc: false (OFT under DDP" in res.stdout
    assert trainer_state(tmp_path / "output" / "oft")["global_step"] == 4


def test_one_process_runs_without_torchrun_and_resumes_exactly(make_config, tmp_path: Path) -> None:
    """--nproc 1 needs no process group: the worker runs as plain `python -m` (LlamaFactory then allows
    what it refuses to distributed runs, layer-wise GaLore and APOLLO), and crash-resume still holds."""
    one = ["--nproc", "1", "--backoff", "0.2"]
    cfg = make_config("one", max_steps=40, save_steps=5)
    out = tmp_path / "output" / "one"
    sup = start_cli("train", str(cfg), *one, log=tmp_path / "log")
    wait_for(lambda: (out / "checkpoint-10" / MARKER).exists(), 300, what="checkpoint-10 marked")
    kill_run(sup, out)
    launch = json.loads((out / ".ft" / "attempts" / "1" / "launch.json").read_text())
    assert "torch.distributed.run" not in launch["argv"] and launch["argv"][1:3] == ["-m", "ft_appliance.worker"]
    assert "distributed training: False" in (out / ".ft" / "attempts" / "1" / "output.log").read_text()
    res = run_cli("train", str(cfg), *one, timeout=600)
    assert res.returncode == 0 and "resuming from checkpoint-" in res.stdout, res.stdout[-3000:]
    ref = run_cli("train", str(make_config("one-ref", max_steps=40, save_steps=5)), *one, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:]
    assert max_abs_diff(read_adapter(out), read_adapter(tmp_path / "output" / "one-ref")) == 0.0
