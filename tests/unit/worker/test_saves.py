"""The background saver (worker/saves.py) on real tensors, real files and its real thread: host copies
are the state at the copy, tied tensors stay tied, buffers are reused, a checkpoint being written is
never judged complete, and a failed write raises in the training thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from ft_appliance.state import checkpoints
from ft_appliance.state.layout import MARKER
from ft_appliance.worker.saves import PENDING_SUFFIX, BackgroundSaver
from safetensors.torch import save_file


def test_copies_are_the_state_at_the_copy_tied_stay_tied_and_buffers_are_reused() -> None:
    saver = BackgroundSaver(print)
    w = torch.arange(6.0).reshape(2, 3)
    tree = {"embed": w, "head": w, "step": torch.tensor(3), "groups": [{"lr": 0.1, "params": [0, 1]}]}
    first = saver.copy("model", tree)
    w.add_(100)  # training moves on
    assert torch.equal(first["embed"], torch.arange(6.0).reshape(2, 3)) and first["step"].item() == 3
    assert first["embed"] is first["head"]  # save_pretrained finds ties by storage
    assert first["groups"] == tree["groups"] and first["groups"] is not tree["groups"]
    second = saver.copy("model", tree)
    assert second["embed"] is first["embed"] and torch.equal(second["embed"], w)  # same buffer, new values


def test_prepare_lays_every_distinct_tensor_out_in_one_arena_that_the_copies_use() -> None:
    saver = BackgroundSaver(print)
    w, m = torch.ones(3, 5), torch.zeros(7, dtype=torch.bfloat16)
    model = {"embed": w, "head": w, "norm": torch.ones(4)}
    optimizer = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": m}}, "param_groups": [{"lr": 1e-5}]}
    saver.prepare({"model": model, "optimizer": optimizer})
    saver.begin(lambda: 0)  # waits for the arena
    base, end = saver.arena.data_ptr(), saver.arena.data_ptr() + saver.arena.numel()
    host = saver.copy("model", model), saver.copy("optimizer", optimizer)
    copies = [host[0]["embed"], host[0]["norm"], host[1]["state"][0]["step"], host[1]["state"][0]["exp_avg"]]
    assert all(base <= t.data_ptr() < end for t in copies) and host[0]["head"] is host[0]["embed"]
    assert saver.arena.numel() == 192 + 14  # embed (tied, once) 60 B, norm at 64, step at 128, exp_avg at 192
    assert host[1]["state"][0]["step"].item() == 2.0 and host[1]["state"][0]["exp_avg"].dtype == torch.bfloat16


def _checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"global_step": 4}')
    torch.save({"x": torch.zeros(2)}, ckpt / "rng_state_0.pth")
    return ckpt


def test_a_checkpoint_being_written_is_not_complete_until_its_marker(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    saver = BackgroundSaver(print)
    release = threading.Event()
    weights = saver.copy("model", {"w": torch.ones(64, 64)})

    def write() -> None:
        release.wait(10)
        save_file(weights, str(ckpt / "model.safetensors"))

    saver.jobs.append(write)
    saver.hold(ckpt / "trainer_state.json")
    saver.start(lambda: checkpoints.write_marker(ckpt, step=4, world_size=1))
    complete, reason, _ = checkpoints.judge(ckpt)
    assert not complete and "trainer_state.json" in reason  # what a crash now would leave: set aside
    assert (ckpt / f"trainer_state.json{PENDING_SUFFIX}").exists()
    release.set()
    saver.wait()
    assert checkpoints.judge(ckpt) == (True, "", True)
    assert (ckpt / "trainer_state.json").exists()


def test_a_failed_write_raises_at_the_next_wait_and_leaves_no_marker(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    saver = BackgroundSaver(print)

    def full() -> None:
        raise OSError(28, "No space left on device")

    saver.jobs.append(full)
    saver.hold(ckpt / "trainer_state.json")
    saver.start(lambda: checkpoints.write_marker(ckpt, step=4, world_size=1))
    with pytest.raises(OSError, match="No space left"):
        saver.wait()
    assert not (ckpt / MARKER).exists() and not checkpoints.judge(ckpt)[0]
    saver.wait()  # raised once


def test_settle_reports_a_failed_write_instead_of_raising(tmp_path: Path) -> None:
    said: list[str] = []
    saver = BackgroundSaver(said.append)
    saver.jobs.append(lambda: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    saver.start(lambda: None)
    saver.settle()
    assert said == ["background save failed too: OSError: [Errno 5] Input/output error"]


def test_a_save_that_waits_for_the_previous_write_says_so() -> None:
    said: list[str] = []
    saver = BackgroundSaver(said.append)
    saver.jobs.append(lambda: time.sleep(1.1))  # a write longer than the interval between two saves
    saver.start(lambda: None)
    saver.begin(lambda: 0)
    assert said and said[0].startswith("this save waited 1 s for the previous checkpoint's write")
    assert "raise save_steps" in said[0] and saver.deferring


def test_the_optimizer_is_written_without_crc32_and_reads_back(tmp_path: Path) -> None:
    import zipfile

    from ft_appliance.worker.saves import _write_optimizer

    state = {"state": {0: {"exp_avg": torch.randn(8, 8)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    _write_optimizer(str(tmp_path), state, {"last_epoch": 3})
    assert torch.serialization.get_crc32_options()  # put back for the rest of the process
    back = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert {i.CRC for i in zipfile.ZipFile(tmp_path / "optimizer.pt").infolist()} == {0}
    assert checkpoints.check_zip(tmp_path / "optimizer.pt") is None
    assert torch.load(tmp_path / "scheduler.pt", weights_only=True) == {"last_epoch": 3}


def test_settle_gives_up_on_a_write_that_hangs() -> None:
    said: list[str] = []
    saver = BackgroundSaver(said.append)
    release = threading.Event()
    saver.jobs.append(lambda: release.wait(10))
    saver.start(lambda: None)
    saver.settle(timeout_s=0.2)
    assert said == ["background save still writing after 0 s: its checkpoint stays unmarked"]
    release.set()


def test_begin_turns_background_saves_off_when_the_copy_would_not_fit() -> None:
    said: list[str] = []
    saver = BackgroundSaver(said.append)
    saver.begin(lambda: 2**60)
    assert not saver.deferring and saver.off and said[0].startswith("background saves off: the training state")
    saver.begin(lambda: 1)  # off for the rest of the run, said once
    assert not saver.deferring and len(said) == 1
    on = BackgroundSaver(said.append)
    on.begin(lambda: 1)
    assert on.deferring
