"""DeepSpeed ZeRO-3 through the appliance on 2 CPU processes (DeepSpeed's CPU accelerator over gloo):
full fine-tuning trains, survives a SIGKILL and a torn optimizer shard, and resumes to the weights of
an uninterrupted run; its checkpoint exports through the gather."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ft_appliance.state.layout import MARKER
from ft_appliance.tools.procs import kill_run

from tests.helpers import REPO, read_adapter, run_cli, start_cli, wait_for, write_config
from tests.integration.test_operator import _logits

pytestmark = pytest.mark.slow

FAST = ["--nproc", "2", "--backoff", "0.2"]
DS3 = REPO / "configs" / "deepspeed" / "ds_z3_config.json"
Z3 = {"finetuning_type": "full", "deepspeed": str(DS3), "max_steps": 16, "save_steps": 4, "lora_rank": None,
      "lora_target": None}  # fmt: skip


@pytest.fixture(scope="module")
def reference(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("z3-reference")
    res = run_cli("train", str(write_config(demo_root, tmp, "z3-ref", **Z3)), *FAST, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    return tmp / "output" / "z3-ref"


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _kill_tear_and_resume(cfg: Path, out: Path, tmp_path: Path) -> None:
    """SIGKILL the tree once checkpoint-8 is marked, tear rank 1's optimizer shard of the newest
    checkpoint, and restart: that checkpoint is set aside and the one before it resumed, to the end."""
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log")
    wait_for(lambda: (out / "checkpoint-8" / MARKER).exists(), 600, what="checkpoint-8 marked")
    kill_run(sup, out)
    newest = max(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{MARKER}"))
    assert newest < 16, "the run finished before the kill"
    [shard] = (out / f"checkpoint-{newest}" / f"global_step{newest}").glob("*rank_1_mp_rank_00_optim_states.pt")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a torn write of rank 1
    res = run_cli("train", str(cfg), *FAST, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"set aside checkpoint-{newest}: global_step{newest}/{shard.name}" in res.stdout
    assert f"resuming from checkpoint-{newest - 4}" in res.stdout


def test_zero3_survives_a_sigkill_and_a_torn_shard_and_resumes_to_exact_weights(
    make_config, tmp_path: Path, reference: Path
) -> None:
    cfg = make_config("z3", **Z3)
    out = tmp_path / "output" / "z3"
    _kill_tear_and_resume(cfg, out, tmp_path)
    a, b = _weights(out), _weights(reference)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_zero3_checkpoint_without_consolidated_weights_exports_through_the_gather(
    tmp_path: Path, reference: Path
) -> None:
    """The reference's checkpoint holds DeepSpeed's shards and the 16-bit consolidation DeepSpeed wrote
    at save time; a copy without the consolidation must export, through the gather, to the same logits."""
    import torch

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    (copy / "checkpoint-4" / "model.safetensors").unlink()  # as with stage3_gather_16bit_weights_on_model_save off
    (copy / "checkpoint-4" / MARKER).unlink()
    gathered = run_cli("export", str(copy), "--checkpoint", "checkpoint-4", "--dtype", "float32", timeout=600)
    assert gathered.returncode == 0 and "gathering the ZeRO-3 shards of" in gathered.stdout, gathered.stderr[-3000:]
    direct = run_cli("export", str(reference), "--checkpoint", "checkpoint-4", "--dtype", "float32", timeout=600)
    assert direct.returncode == 0, direct.stderr[-3000:]
    assert not list(copy.glob(".export-*zero3-gathered*"))  # the scratch copy is gone
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    got, want = _logits(copy / "export-checkpoint-4", ids), _logits(reference / "export-checkpoint-4", ids)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_zero3_lora_survives_a_sigkill_and_a_torn_shard_and_resumes_to_the_exact_adapter(
    make_config, tmp_path: Path
) -> None:
    lora = {"deepspeed": str(DS3), "max_steps": 16, "save_steps": 4}
    cfg = make_config("z3-lora", **lora)
    out = tmp_path / "output" / "z3-lora"
    _kill_tear_and_resume(cfg, out, tmp_path)
    ref = run_cli("train", str(make_config("z3-lora-ref", **lora)), *FAST, timeout=900)
    assert ref.returncode == 0, ref.stdout[-3000:]
    a, b = read_adapter(out), read_adapter(tmp_path / "output" / "z3-lora-ref")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
