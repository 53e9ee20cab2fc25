"""The supervisor, fast: the real CLI, real torchrun and real signals, with a fake worker that speaks the
state protocol (tests/fakes/worker.py) instead of LlamaFactory. Ownership, the tree dying with its
supervisor, stops in every phase, the watchdog, and malformed records."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from ft_appliance.state.layout import MARKER, StateDir

from tests.helpers import REPO, SECRET, Hook, last_step, run_cli, start_cli, steps, training_processes, wait_for


def fake_env(**fake: object) -> dict[str, str]:
    path = f"{REPO}:{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else str(REPO)
    return {"FT_WORKER_MODULE": "tests.fakes.worker", "FT_FAKE": json.dumps(fake), "PYTHONPATH": path}


def output_dir(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["output_dir"])


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def resumed_from(out: Path, attempt: int) -> str | None:
    run = json.loads(StateDir(out).run_file(attempt).read_text())
    ckpt = run["args"].get("resume_from_checkpoint")
    return Path(ckpt).name if ckpt else None


def marked(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{MARKER}"))


FAST = ["--nproc", "1", "--backoff", "0.2"]


def test_a_second_start_on_a_live_run_is_refused_in_one_line(make_config, tmp_path: Path) -> None:
    cfg = make_config("owned", max_steps=120, save_steps=20)
    out = output_dir(cfg)
    env = fake_env(step_s=0.05)
    first = start_cli("train", str(cfg), *FAST, log=tmp_path / "first.log", env=env)
    wait_for(lambda: last_step(out) >= 5, 60, what="step 5")
    second = run_cli("train", str(cfg), *FAST, env=env, timeout=60)
    assert second.returncode == 10
    line = one_line(second.stderr)
    assert f"is in use by a live ft-appliance run (pid {first.pid} on " in line and "choose another output_dir" in line
    assert first.wait(120) == 0, (tmp_path / "first.log").read_text()[-2000:]
    numbers = [r["step"] for r in steps(out)]
    assert numbers == list(range(1, 121))  # one writer: no step twice
    assert StateDir(out).attempt_numbers() == [1]
    assert not StateDir(out).owner.exists()  # released cleanly


def test_a_sigkilled_supervisor_leaves_no_process_and_the_next_start_takes_over(make_config, tmp_path: Path) -> None:
    cfg = make_config("orphan", max_steps=400, save_steps=10)
    out = output_dir(cfg)
    env = fake_env(step_s=0.05)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log", env=env)
    wait_for(lambda: last_step(out) >= 25, 60, what="step 25")
    assert training_processes(out)
    sup.kill()  # the supervisor alone: the OOM killer, kill -9 of the entrypoint
    sup.wait()
    killed = time.monotonic()
    wait_for(lambda: not training_processes(out), 10, what="no training process left")
    assert time.monotonic() - killed < 10
    newest = max(marked(out))
    status = run_cli("status", str(out))
    assert (
        status.returncode == 0
        and status.stdout.startswith("supervisor gone: ")
        and "no longer holds the run" in status.stdout
    )
    res = run_cli("train", str(cfg), *FAST, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"took over {out}: its last owner, pid {sup.pid}" in res.stdout
    assert resumed_from(out, 2) == f"checkpoint-{newest}" and newest >= 20


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_stop_during_training_saves_and_loses_no_step(make_config, tmp_path: Path, sig: int, code: int) -> None:
    cfg = make_config(f"stop-{code}", max_steps=400, save_steps=100)
    out = output_dir(cfg)
    env = fake_env(step_s=0.05)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log", env=env)
    wait_for(lambda: last_step(out) >= 10, 60, what="step 10")
    sup.send_signal(sig)
    assert sup.wait(30) == code, (tmp_path / "log").read_text()[-2000:]
    stopped = json.loads(StateDir(out).stopped.read_text())
    assert stopped["step"] == last_step(out) and (out / f"checkpoint-{stopped['step']}" / MARKER).exists()
    assert not training_processes(out)


def test_sigterm_at_launch_stops_within_30_s(make_config, tmp_path: Path) -> None:
    """Before the workers exist (torchrun still starting) and while they import: they get it too."""
    cfg = make_config("stop-launch", max_steps=100, save_steps=10)
    out = output_dir(cfg)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log", env=fake_env(import_s=20))
    wait_for(lambda: StateDir(out).launch_file(1).exists(), 60, what="the launch")
    sent = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(30) == 143, (tmp_path / "log").read_text()[-2000:]
    assert time.monotonic() - sent < 30
    assert not training_processes(out)
    assert "before a checkpoint could be saved" in (tmp_path / "log").read_text()


def test_sigterm_during_a_save_waits_for_it(make_config, tmp_path: Path) -> None:
    cfg = make_config("stop-save", max_steps=100, save_steps=10)
    out = output_dir(cfg)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log", env=fake_env(save_s=3))
    wait_for(lambda: (out / "checkpoint-10").exists(), 60, what="a save under way")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(60) == 143, (tmp_path / "log").read_text()[-2000:]
    assert (out / "checkpoint-10" / MARKER).exists()
    stopped = json.loads(StateDir(out).stopped.read_text())
    assert (out / f"checkpoint-{stopped['step']}" / MARKER).exists()


def test_sigterm_during_a_restart_wait_ends_the_wait(make_config, tmp_path: Path) -> None:
    cfg = make_config("stop-backoff", max_steps=100, save_steps=10)
    sup = start_cli(
        "train", str(cfg), "--nproc", "1", "--backoff", "60", log=tmp_path / "log", env=fake_env(crash_at=3)
    )
    wait_for(lambda: "restart 1/3 in" in (tmp_path / "log").read_text(), 60, what="the restart wait")
    sent = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(10) == 143
    assert time.monotonic() - sent < 5
    assert "stopped during a restart wait" in (tmp_path / "log").read_text()


def test_an_evaluation_longer_than_the_hang_timeout_is_not_a_hang(make_config, tmp_path: Path) -> None:
    cfg = make_config("long-eval", max_steps=20, save_steps=10)
    res = run_cli(
        "train", str(cfg), *FAST, "--hang-timeout", "2", env=fake_env(eval_at=5, eval_s=6, save_s=3), timeout=120
    )
    assert res.returncode == 0, res.stdout[-2000:]
    assert "hang:" not in res.stdout
    assert StateDir(output_dir(cfg)).attempt_numbers() == [1]


def test_a_silent_rank_is_a_hang_and_is_restarted(make_config, tmp_path: Path) -> None:
    cfg = make_config("hang", max_steps=30, save_steps=10)
    out = output_dir(cfg)
    res = run_cli(
        "train", str(cfg), *FAST, "--hang-timeout", "2", env=fake_env(hang_at=15, fault_attempts=[1]), timeout=120
    )
    assert res.returncode == 0, res.stdout[-2000:]
    assert "hang: no progress for" in res.stdout and "waiting for a step or a beat" in res.stdout
    assert json.loads(StateDir(out).outcome_file(1).read_text())["hung"] is True
    assert resumed_from(out, 2) == "checkpoint-10"


def test_a_torn_failure_record_is_an_unknown_failure_and_retried(make_config, tmp_path: Path) -> None:
    cfg = make_config("torn-failure", max_steps=20, save_steps=10)
    env = fake_env(crash_at=12, fault_attempts=[1], bad_failure_record=True)
    res = run_cli("train", str(cfg), *FAST, env=env, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "failure-rank0.json is malformed" in res.stdout and "treating the failure as unknown" in res.stdout
    outcome = json.loads(StateDir(output_dir(cfg)).outcome_file(1).read_text())
    assert outcome["failure"]["type"] == "UnknownFailure" and outcome["verdict"] == "retry"


@pytest.mark.parametrize(
    ("content", "needle"),
    [("[]", "expected an object, got list"), ("{", "not JSON"), ('{"state": "training"}', "output_dir: missing")],
)
def test_status_on_a_malformed_status_file_is_one_line(tmp_path: Path, content: str, needle: str) -> None:
    sd = StateDir(tmp_path / "out")
    sd.root.mkdir(parents=True)
    sd.status.write_text(content)
    res = run_cli("status", str(sd.output_dir))
    assert res.returncode == 1
    line = one_line(res.stderr)
    assert "status.json is malformed" in line and needle in line


@pytest.mark.parametrize(
    ("beat", "needle"),
    [('{"state": "training", "time": "soon"}', "time: expected float, got str"), ("[]", "expected an object")],
)
def test_health_on_a_malformed_heartbeat_is_one_line(tmp_path: Path, beat: str, needle: str) -> None:
    path = tmp_path / "hb.json"
    path.write_text(beat)
    res = run_cli("health", env={"FT_HEARTBEAT_FILE": str(path)})
    assert res.returncode == 1
    assert needle in one_line(res.stderr)


def test_training_processes_die_with_torchrun_too(make_config, tmp_path: Path) -> None:
    """torchrun killed on its own (its death signal does not cover that): the ranks go with it."""
    cfg = make_config("agent", max_steps=400, save_steps=50)
    out = output_dir(cfg)
    sup = start_cli("train", str(cfg), "--nproc", "2", "--max-restarts", "0", log=tmp_path / "log", env=fake_env())
    wait_for(lambda: last_step(out) >= 5, 60, what="step 5")
    agent = [p for p in training_processes(out, 1) if "torch.distributed.run" in " ".join(p.cmdline())]
    ranks = [p for p in training_processes(out, 1) if p not in agent]
    assert agent and ranks
    agent[0].kill()
    wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in ranks), 10, what="ranks gone")
    assert sup.wait(60) == 6


def test_a_config_changed_between_starts_is_refused_then_allowed(make_config, tmp_path: Path) -> None:
    cfg = make_config("changed", max_steps=400, save_steps=10)
    out = output_dir(cfg)
    env = fake_env(step_s=0.05)
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log", env=env)
    wait_for(lambda: last_step(out) >= 15, 60, what="step 15")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(30) == 143
    res = run_cli("train", str(cfg), "lora_rank=16", *FAST, env=env, timeout=60)
    assert res.returncode == 3
    assert "lora_rank changed from 8 to 16 since this run's checkpoint-" in one_line(res.stderr)
    assert StateDir(out).attempt_numbers() == [1]  # nothing launched
    checked = run_cli("check", str(cfg), "lora_rank=16", "learning_rate=0.05", "--nproc", "1", env=env)
    assert checked.returncode == 3
    assert "lora_rank changed" in checked.stdout and "learning_rate changed from 0.005 to 0.05" in checked.stdout
    res = run_cli("train", str(cfg), "max_steps=40", "--allow-config-change", *FAST, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "max_steps changed from 400 to 40" in res.stdout


@pytest.mark.parametrize(
    ("fake", "opts", "code", "event"),
    [
        ({"crash_at": 3}, ["--crash-loop-limit", "2", "--max-restarts", "5"], 7, "crash_loop"),
        ({"crash_at": 3, "fault_attempts": [1, 2]}, ["--max-restarts", "1", "--crash-loop-limit", "9"], 6, "gave_up"),
    ],
)
def test_the_webhook_tells_each_outcome_once(make_config, tmp_path, fake, opts, code, event) -> None:
    hook = Hook()
    try:
        cfg = make_config(f"hook-{event}", max_steps=20, save_steps=2)  # resumed at 2, dead at 3: no progress
        env = {**fake_env(**fake), "FT_NOTIFY_URL": hook.url, "HF_TOKEN": SECRET}
        res = run_cli("train", str(cfg), *FAST, *opts, env=env, timeout=180)
        assert res.returncode == code, res.stdout[-2000:] + res.stderr[-2000:]
        assert [b["event"] for b in hook.bodies] == [event] and hook.bodies[0]["exit_code"] == code
        assert SECRET not in json.dumps(hook.bodies) + res.stdout + res.stderr
    finally:
        hook.close()


def test_the_webhook_tells_a_stop_and_a_dead_webhook_costs_one_line(make_config, tmp_path: Path) -> None:
    hook = Hook()
    cfg = make_config("hook-stop", max_steps=400, save_steps=50)
    out = output_dir(cfg)
    env = {**fake_env(step_s=0.05), "FT_NOTIFY_URL": hook.url}
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log", env=env)
    wait_for(lambda: last_step(out) >= 5, 60, what="step 5")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(60) == 143
    assert [(b["event"], b["exit_code"]) for b in hook.bodies] == [("stopped", 143)]
    hook.close()  # now nothing listens: the next outcome is a warning, never a different ending
    dead = {**fake_env(step_s=0.01), "FT_NOTIFY_URL": hook.url, "FT_NOTIFY_BACKOFF_S": "0.05"}
    res = run_cli("train", str(cfg), *FAST, "max_steps=60", env=dead, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]
    assert "warning: could not notify 127.0.0.1 (URLError); the run's outcome is unchanged" in res.stdout
    assert SECRET not in res.stdout
