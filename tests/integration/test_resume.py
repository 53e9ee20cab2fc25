"""Crash-resume with real processes and real signals: SIGKILL mid-step and mid-save, torn checkpoints,
finished runs, SIGTERM, crash loops, hangs, and bit-exact continuation. 2 CPU processes throughout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from ft_appliance.state.files import read_jsonl
from ft_appliance.state.layout import MARKER
from ft_appliance.tools.procs import for_each_alive, kill_run, worker_ranks
from ft_appliance.tools.soak import fill
from ft_appliance.tools.soak import small_volume as tmpfs

from tests.helpers import (
    killing_every_launch,
    last_step,
    max_abs_diff,
    read_adapter,
    run_cli,
    start_cli,
    status,
    steps,
    trainer_state,
    training_processes,
    wait_for,
)

pytestmark = pytest.mark.slow

FAST = ["--nproc", "2", "--backoff", "0.2"]


def output_dir(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["output_dir"])


def resumed_from(out: Path, attempt: int) -> str | None:
    run = json.loads((out / ".ft" / "attempts" / str(attempt) / "run.json").read_text())
    ckpt = run["args"].get("resume_from_checkpoint")
    return Path(ckpt).name if ckpt else None


def marked_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{MARKER}"))


def attempts(out: Path) -> list[str]:
    return sorted((out / ".ft" / "attempts").iterdir(), key=lambda p: int(p.name))


def assert_no_training_processes(out: Path) -> None:
    wait_for(lambda: not training_processes(out), 15, what="no training process left")


def test_sigkill_of_a_worker_mid_step_restarts_from_newest_complete(make_config, tmp_path: Path) -> None:
    cfg = make_config("kill-step", max_steps=120, save_steps=10, logging_steps=10)
    out = output_dir(cfg)
    proc = start_cli("train", str(cfg), *FAST, log=tmp_path / "log")
    wait_for(lambda: last_step(out) >= 25, 120, what="step 25")
    # A rank dies mid-step (OOM killer, segfault): torchrun takes the group down, the supervisor restarts.
    rank1 = worker_ranks(out, 1)
    killed_at = last_step(out)
    rank1[-1].send_signal(signal.SIGKILL)
    assert proc.wait(240) == 0, (tmp_path / "log").read_text()[-3000:]

    # The restart ran on the spare workers started after attempt 1's first step, not a new launch.
    launch = json.loads((out / ".ft" / "attempts" / "2" / "launch.json").read_text())
    assert launch["spare"] and "--spare" in launch["argv"]
    assert "launch: on the spare workers, importing since the last attempt" in (tmp_path / "log").read_text()
    events = read_jsonl(out / ".ft" / "events.jsonl")
    begun = [e for e in events if e.get("event") == "worker_imports" and e["attempt"] == 2]
    assert begun and begun[0]["data"]["spare"] is True
    # Both attempts timed their setup phases (worker/setup_clock.py), the spare's too.
    for attempt in (1, 2):
        began = [e for e in events if e.get("event") == "train_begin" and e["attempt"] == attempt]
        setup = began[0]["data"]["setup"]
        assert set(setup) == {"load_tokenizer", "get_dataset", "load_model"}, setup
        assert all(s > 0 for s in setup.values()), setup

    newest_complete = max(s for s in marked_steps(out) if s <= killed_at + 1)
    assert resumed_from(out, 2) in {f"checkpoint-{newest_complete}", f"checkpoint-{newest_complete - 10}"}
    st = status(out)
    assert st["state"] == "finished" and st["restarts"] == 1
    assert len(st["steps_lost"]) == 1 and 0 <= st["steps_lost"][0] <= 10
    assert trainer_state(out)["global_step"] == 120
    log = (tmp_path / "log").read_text()
    assert "restart 1/3" in log and "resuming from checkpoint-" in log
    assert_no_training_processes(out)


def _stop_in_save(out: Path, save_steps: int, max_steps: int, last_file: str | None = None) -> int | None:
    """Freeze the whole tree the moment a new checkpoint directory appears (or, with last_file, once
    the Trainer wrote that file into it: where transformers rotates), before its marker.

    Returns the step of the checkpoint caught mid-save, or None when every save finished first."""
    for step in range(2 * save_steps, max_steps, save_steps):  # the first save has nothing to fall back on
        ckpt = out / f"checkpoint-{step}"
        target = ckpt / last_file if last_file else ckpt
        deadline = time.monotonic() + 60
        while not target.exists():
            if time.monotonic() > deadline:
                return None
        procs = training_processes(out)
        for_each_alive(procs, psutil.Process.suspend)
        if not (ckpt / MARKER).exists():
            return step
        for_each_alive(procs, psutil.Process.resume)
    return None


def test_sigkill_of_the_whole_tree_mid_save_then_a_new_start(make_config, tmp_path: Path) -> None:
    """`docker kill` during a checkpoint save: everything dies, a new container starts on the volume."""
    cfg = make_config("kill-save", max_steps=60, save_steps=5, logging_steps=5)
    out = output_dir(cfg)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log1")
    wait_for(lambda: (out / ".ft" / "steps.jsonl").exists(), 120, what="first step")
    caught = _stop_in_save(out, 5, 60)
    assert caught is not None, "no save was caught in flight"
    kill_run(sup, out)
    assert_no_training_processes(out)
    assert not (out / f"checkpoint-{caught}" / MARKER).exists()

    res = run_cli("train", str(cfg), *FAST, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"set aside checkpoint-{caught}" in res.stdout
    assert resumed_from(out, 2) == f"checkpoint-{caught - 5}"
    aside = list((out / "ft-set-aside").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(f"checkpoint-{caught}.")
    assert trainer_state(out)["global_step"] == 60


def _crashed_run(make_config, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A run killed (whole tree, SIGKILL) after checkpoint-20 was marked, stopped short of 40 steps."""
    cfg = make_config(name, max_steps=40, save_steps=10, logging_steps=10)
    out = output_dir(cfg)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / f"{name}.log")
    wait_for(lambda: (out / "checkpoint-20" / MARKER).exists(), 180, what="checkpoint-20")
    kill_run(sup, out)
    assert_no_training_processes(out)
    return cfg, out


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("empty", "empty directory"),
        ("truncated", "optimizer.pt changed size"),
        ("missing", "trainer_state.json listed in the marker is missing"),
    ],
)
def test_torn_newest_checkpoint_is_set_aside(make_config, tmp_path: Path, damage: str, reason: str) -> None:
    cfg, out = _crashed_run(make_config, tmp_path, f"torn-{damage}")
    newest = max(marked_steps(out))
    ckpt = out / f"checkpoint-{newest}"
    if damage == "empty":
        ckpt = out / f"checkpoint-{newest + 10}"
        ckpt.mkdir()
    elif damage == "truncated":
        opt = ckpt / "optimizer.pt"
        opt.write_bytes(opt.read_bytes()[:100])
    else:
        (ckpt / "trainer_state.json").unlink()
    res = run_cli("train", str(cfg), *FAST, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"set aside {ckpt.name}: {reason}" in res.stdout
    expected = newest if damage == "empty" else newest - 10
    assert resumed_from(out, 2) == f"checkpoint-{expected}"
    assert trainer_state(out)["global_step"] == 40
    assert any(p.name.startswith(ckpt.name + ".") for p in (out / "ft-set-aside").iterdir())


def test_relaunching_a_finished_run_touches_nothing(make_config) -> None:
    cfg = make_config("done", max_steps=10, save_steps=5)
    out = output_dir(cfg)
    assert run_cli("train", str(cfg), *FAST, timeout=300).returncode == 0
    before = {p: p.read_bytes() for p in [out / "all_results.json", out / "adapter_model.safetensors"]}
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    res = run_cli("train", str(cfg), *FAST, timeout=120)
    assert res.returncode == 0
    assert "holds a finished run: nothing to do" in res.stdout
    assert all(p.read_bytes() == b for p, b in before.items())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    assert len(attempts(out)) == 1


def test_sigterm_saves_a_checkpoint_and_resumes_with_zero_lost_steps(make_config, tmp_path: Path) -> None:
    cfg = make_config("term", max_steps=80, save_steps=50, logging_steps=10)
    out = output_dir(cfg)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log")
    wait_for(lambda: last_step(out) >= 13, 120, what="step 13")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(120) == 143, (tmp_path / "log").read_text()[-3000:]
    stopped = json.loads((out / ".ft" / "stopped.json").read_text())
    s = stopped["step"]
    assert 13 <= s < 50  # a checkpoint between regular saves
    assert (out / f"checkpoint-{s}" / MARKER).exists()
    assert last_step(out) == s  # no step beyond the checkpoint
    assert_no_training_processes(out)
    assert status(out)["state"] == "stopped"
    assert f"stopped after saving checkpoint-{s}" in (tmp_path / "log").read_text()

    res = run_cli("train", str(cfg), *FAST, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert resumed_from(out, 2) == f"checkpoint-{s}"
    second = [r["step"] for r in steps(out) if r["attempt"] == 2]
    assert second[0] == s + 1  # zero lost steps
    assert trainer_state(out)["global_step"] == 80
    # the restart was a new process (as a new container would be): still counted, honestly
    assert status(out)["restarts"] == 1 and status(out)["steps_lost"] == [0]
    assert "restarts 1; steps lost 0" in res.stdout


def test_crash_loop_is_detected_and_stopped(make_config, tmp_path: Path) -> None:
    cfg = make_config("loop", max_steps=40, save_steps=10)
    out = output_dir(cfg)
    with killing_every_launch(out):
        res = run_cli(
            "train",
            str(cfg),
            "--nproc",
            "2",
            "--backoff",
            "0",
            "--max-restarts",
            "10",
            "--crash-loop-limit",
            "3",
            timeout=300,
        )
    assert res.returncode == 7, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "crash loop: 3 attempts in a row failed at step 0 without progress" in lines[0]
    assert len(attempts(out)) == 3
    assert status(out)["state"] == "failed"


def test_hang_is_detected_killed_and_restarted(make_config, tmp_path: Path) -> None:
    cfg = make_config("hang", max_steps=60, save_steps=10, logging_steps=10)
    out = output_dir(cfg)
    sup = start_cli("train", str(cfg), *FAST, "--hang-timeout", "4", log=tmp_path / "log")
    wait_for(lambda: last_step(out) >= 15, 120, what="step 15")
    frozen = training_processes(out, 1)
    for p in frozen:
        p.suspend()  # a deadlocked collective looks like this from outside: alive, no progress
    assert sup.wait(240) == 0, (tmp_path / "log").read_text()[-3000:]
    log = (tmp_path / "log").read_text()
    assert "hang: no progress for" in log
    outcome = json.loads((out / ".ft" / "attempts" / "1" / "outcome.json").read_text())
    assert outcome["hung"] is True
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in frozen)
    assert trainer_state(out)["global_step"] == 60


def test_resumed_run_equals_uninterrupted_run_exactly(make_config, tmp_path: Path) -> None:
    ref_cfg = make_config("reference", max_steps=40, save_steps=10, logging_steps=10)
    assert run_cli("train", str(ref_cfg), *FAST, timeout=300).returncode == 0
    cfg, out = _crashed_run(make_config, tmp_path, "interrupted")
    res = run_cli("train", str(cfg), *FAST, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = output_dir(ref_cfg)
    assert max_abs_diff(read_adapter(ref), read_adapter(out)) == 0.0
    ref_losses = {e["step"]: e["loss"] for e in trainer_state(ref)["log_history"] if "loss" in e}
    losses = {e["step"]: e["loss"] for e in trainer_state(out)["log_history"] if "loss" in e}
    assert losses and all(ref_losses[s] == v for s, v in losses.items())


def test_error_retrying_cannot_fix_is_not_retried(make_config, tmp_path: Path) -> None:
    # A JSON Lines file broken past the rows preflight samples: the worker fails while loading it,
    # before the first step. Retrying would fail the same way.
    data = tmp_path / "bad-data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"broken": {"file_name": "broken.jsonl"}}))
    row = json.dumps({"instruction": "Add.", "input": "1 + 2", "output": "3"})
    (data / "broken.jsonl").write_text("\n".join([row] * 1500 + ["this is not json {"]) + "\n")
    cfg = make_config("fatal", dataset="broken", dataset_dir=str(data))
    out = output_dir(cfg)
    res = run_cli("train", str(cfg), *FAST, timeout=300)
    assert res.returncode == 5, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "training failed: " in lines[0] and "not retried" in lines[0]
    assert len(attempts(out)) == 1


def test_crash_loop_is_detected_across_container_restarts(make_config) -> None:
    """Each start makes one attempt (as a container under a restart policy would): the third start that
    fails at the same step without progress stops as a crash loop instead of spinning."""
    cfg = make_config("loop-restarts", max_steps=40, save_steps=10)
    out = output_dir(cfg)
    with killing_every_launch(out):
        codes = [
            run_cli(
                "train", str(cfg), "--nproc", "2", "--max-restarts", "0", "--crash-loop-limit", "3", timeout=300
            ).returncode
            for _ in range(3)
        ]
    assert codes == [6, 6, 7]
    assert len(attempts(out)) == 3


@pytest.mark.parametrize("extra", [[], ["--deepspeed"]], ids=["plain", "deepspeed-imported-ahead"])
def test_a_spare_leaves_when_its_supervisor_is_gone(tmp_path: Path, extra: list[str]) -> None:
    """A supervisor killed on its own (not the container) must not leave idle spares behind; a
    DeepSpeed run's spare, which imports deepspeed too before it is ready, the same."""
    supervisor = subprocess.Popen(["sleep", "300"])
    go = tmp_path / "go.json"
    spare = subprocess.Popen(
        [sys.executable, "-m", "ft_appliance.worker", "--spare", str(go), *extra],
        env={**os.environ, "FT_SUPERVISOR_PID": str(supervisor.pid)},
    )
    try:
        wait_for(lambda: (tmp_path / "ready-rank0").exists(), 120, what="the spare imported the stack")
        assert spare.poll() is None  # waiting for go.json
        supervisor.kill()
        supervisor.wait()
        assert spare.wait(120) == 75  # WORKER_EXIT_STOPPED, having run nothing
        assert not go.exists()
    finally:
        for p in (supervisor, spare):
            if p.poll() is None:
                p.kill()


def test_sigkill_of_the_supervisor_alone_takes_its_quiet_workers_with_it(make_config, tmp_path: Path) -> None:
    """The OOM killer or `kill -9` of the entrypoint, outside Docker: with disable_tqdm the workers never
    write to the dead pipe, so only the death signal can stop them. The next start takes over."""
    cfg = make_config("supervisor-kill", max_steps=3000, save_steps=10, logging_steps=10, disable_tqdm=True)
    out = output_dir(cfg)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log1")
    wait_for(lambda: last_step(out) >= 25, 180, what="step 25")
    assert len(worker_ranks(out, 1)) == 2
    sup.kill()
    sup.wait()
    wait_for(lambda: not training_processes(out), 10, what="no training process 10 s after the kill")
    step_after = last_step(out)
    time.sleep(2)
    assert last_step(out) == step_after  # nothing trains on
    newest = max(marked_steps(out))
    res = run_cli("train", str(cfg), "max_steps=60", *FAST, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"took over {out}: its last owner, pid {sup.pid}" in res.stdout
    assert resumed_from(out, 2) == f"checkpoint-{newest}"
    assert trainer_state(out)["global_step"] == 60


def test_a_real_evaluation_longer_than_the_hang_timeout_is_not_a_hang(make_config, demo_root: Path, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    examples = json.loads((demo_root / "datasets" / "ft_demo.json").read_text())
    (data / "train.json").write_text(json.dumps(examples))
    (data / "eval.json").write_text(json.dumps(examples * 12))  # 3072 examples: seconds of evaluation
    (data / "dataset_info.json").write_text(
        json.dumps({"ft_demo": {"file_name": "train.json"}, "ft_eval": {"file_name": "eval.json"}})
    )
    cfg = make_config(
        "long-eval",
        max_steps=12,
        save_steps=12,
        logging_steps=4,
        dataset_dir=str(data),
        eval_dataset="ft_eval",
        eval_strategy="steps",
        eval_steps=6,
        per_device_eval_batch_size=1,
    )
    out = output_dir(cfg)
    res = run_cli("train", str(cfg), *FAST, "--hang-timeout", "3", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "hang:" not in res.stdout
    evals = [e for e in trainer_state(out)["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [6, 12]
    assert max(e["eval_runtime"] for e in evals) > 3  # an evaluation outlasted the hang timeout
    assert [p.name for p in (out / ".ft" / "attempts").iterdir()] == ["1"]


def test_save_total_limit_never_leaves_the_run_without_a_whole_checkpoint(make_config, tmp_path: Path) -> None:
    """The appliance rotates, after the marker: a kill inside a save (or a rotation) leaves the previous
    checkpoint whole, where transformers would already have deleted it before the new one was marked."""
    ref_cfg = make_config("rotate-reference", max_steps=40, save_steps=5, logging_steps=5)
    assert run_cli("train", str(ref_cfg), *FAST, timeout=300).returncode == 0
    cfg = make_config("rotate", max_steps=40, save_steps=5, logging_steps=5, save_total_limit=1)
    out = output_dir(cfg)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log1")
    wait_for(lambda: (out / ".ft" / "steps.jsonl").exists(), 120, what="first step")
    caught = _stop_in_save(out, 5, 40, last_file="trainer_state.json")
    assert caught is not None, "no save was caught between its last file and its marker"
    kill_run(sup, out)
    previous = out / f"checkpoint-{caught - 5}"
    assert (previous / MARKER).exists()  # still there, and whole: not rotated out before the new mark
    res = run_cli("train", str(cfg), *FAST, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert resumed_from(out, 2) == previous.name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-40"]  # save_total_limit held
    rotated = [e for e in read_jsonl(out / ".ft" / "events.jsonl") if e["event"] == "rotate"]
    assert rotated and all(len(e["data"]["deleted"]) == 1 for e in rotated)
    assert max_abs_diff(read_adapter(output_dir(ref_cfg)), read_adapter(out)) == 0.0


def test_a_run_without_a_resumable_checkpoint_starts_again_with_its_leftovers_kept(make_config) -> None:
    """save_strategy "no" killed in its final save: a half-written adapter and no checkpoint, which plain
    LlamaFactory refuses to start on unless told to overwrite (delete) the folder."""
    cfg = make_config("no-ckpt", max_steps=10, save_strategy="no")
    out = output_dir(cfg)
    out.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": ')  # torn
    (out / "adapter_config.json").write_text("{}")
    res = run_cli("train", str(cfg), *FAST, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "no resumable checkpoint: set aside what an earlier attempt left" in res.stdout
    [aside] = (out / "ft-set-aside").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert trainer_state(out)["global_step"] == 10 and (out / "adapter_model.safetensors").stat().st_size > 1000


@pytest.fixture
def small_volume(tmp_path: Path):
    """A 96 MiB tmpfs (mounting needs root: CI and the development machines run as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small volume needs root")
    with tmpfs(tmp_path / "vol", 96) as vol:  # the soak's own mount, unmounted after the test
        yield vol


def test_a_volume_that_fills_up_ends_in_one_line_and_exit_8_then_resumes(make_config, small_volume, tmp_path) -> None:
    cfg = make_config("full", max_steps=400, save_steps=10, logging_steps=10, output_dir=str(small_volume / "run"))
    out = small_volume / "run"
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log")
    wait_for(lambda: (out / "checkpoint-10" / MARKER).exists() and last_step(out) >= 13, 180, what="checkpoint-10")
    ballast = fill(small_volume)  # the volume fills up (another job, logs, a dataset cache)
    assert sup.wait(240) == 8, (tmp_path / "log").read_text()[-3000:]
    lines = [ln for ln in (tmp_path / "log").read_text().splitlines() if ln.startswith("ft-appliance: ")]
    assert len(lines) == 1 and "is full (0 MiB free): free space" in lines[0] and "nothing was deleted" in lines[0]
    assert "Traceback" not in "".join(ln for ln in (tmp_path / "log").read_text().splitlines() if "[ft]" in ln)
    assert (out / "checkpoint-10" / MARKER).exists()
    newest = max(marked_steps(out))
    ballast.unlink()
    res = run_cli("train", str(cfg), "max_steps=40", *FAST, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"resuming from checkpoint-{newest}" in res.stdout
    assert trainer_state(out)["global_step"] == 40
