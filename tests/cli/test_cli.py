"""The CLI's contract: help everywhere, FT_* mirrors, one line and a distinct exit code per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from ft_appliance.cli import cli

from tests.helpers import run_cli


@pytest.mark.parametrize("command", [[], ["train"], ["demo"], ["status"]])
def test_help_everywhere(command: list[str]) -> None:
    res = CliRunner().invoke(cli, [*command, "--help"])
    assert res.exit_code == 0
    assert "Usage:" in res.output


def test_help_lists_env_vars_and_exit_codes() -> None:
    out = CliRunner().invoke(cli, ["train", "--help"]).output
    for var in ("FT_NPROC", "FT_MAX_RESTARTS", "FT_STOP_GRACE_S", "FT_HANG_TIMEOUT_S", "FT_JSON"):
        assert var in out
    assert "FT_CONFIG" in out  # named in the docstring: Click shows no envvar for an argument
    assert "143" in out and "stopped by SIGTERM" in out


def _one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines, res.stdout
    assert "Traceback" not in res.stderr
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_missing_config_file(tmp_path: Path) -> None:
    res = run_cli("train", str(tmp_path / "nope.yaml"), "--nproc", "1")
    assert res.returncode == 3
    line = _one_error_line(res)
    assert line.startswith("ft-appliance: error: config file") and "nope.yaml does not exist" in line


def test_default_config_from_env(tmp_path: Path) -> None:
    res = run_cli("train", "--nproc", "1", env={"FT_CONFIG": str(tmp_path / "env.yaml")})
    assert res.returncode == 3
    assert "env.yaml does not exist" in _one_error_line(res)


def test_unreadable_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model_name_or_path: x\n  lora_rank: [\n")
    res = run_cli("train", str(cfg), "--nproc", "1")
    assert res.returncode == 3
    assert "bad.yaml is not valid YAML at line 2" in _one_error_line(res)


def test_unknown_key_with_suggestion_before_any_process_starts(make_config) -> None:
    cfg = make_config(lora_rnak=8)
    res = run_cli("train", str(cfg), "--nproc", "2")
    assert res.returncode == 3
    assert "unknown key 'lora_rnak': did you mean 'lora_rank'?" in _one_error_line(res)
    out = Path(__import__("yaml").safe_load(cfg.read_text())["output_dir"])
    assert not (out / ".ft").exists()  # nothing was launched


def test_override_type_error(make_config) -> None:
    res = run_cli("train", str(make_config()), "bf16=maybe", "--nproc", "1")
    assert res.returncode == 3
    assert "bf16 is the string 'maybe' but must be true or false" in _one_error_line(res)


def test_no_gpu_and_no_nproc_says_how_to_fix(make_config) -> None:
    res = run_cli("train", str(make_config()), env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 4
    line = _one_error_line(res)
    assert "no GPU visible" in line and "--gpus all" in line and "--nproc" in line


def test_nproc_env_mirror_is_validated(make_config) -> None:
    res = run_cli("train", str(make_config()), env={"FT_NPROC": "0"})
    assert res.returncode == 2
    assert (
        "Invalid value for '--nproc' / '--gpus' (env var: 'FT_NPROC', 'FT_GPUS'): 0 is not in the range" in res.stderr
    )


def test_status_without_state(tmp_path: Path) -> None:
    res = run_cli("status", str(tmp_path))
    assert res.returncode == 3
    assert "no run state" in _one_error_line(res)


def test_cpu_is_asked_for_even_on_a_gpu_host(make_config, monkeypatch) -> None:
    from tests.helpers import INVENTORIES

    monkeypatch.setenv("FT_GPU_INVENTORY", str(INVENTORIES / "h100.json"))  # a recorded GPU host
    gpu = run_cli("check", str(make_config()), "--json")
    assert gpu.returncode == 0 and json.loads(gpu.stdout)["inventory"]["count"] >= 1
    res = run_cli("check", str(make_config()), "--json", env={"FT_CPU": "1"})
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["inventory"] is None and report["nproc"] == 1


def test_gpus_is_an_alias_of_nproc_with_its_env_mirror(make_config) -> None:
    res = run_cli("check", str(make_config()), "--json", env={"FT_GPUS": "2"})
    assert res.returncode == 0, res.stderr
    assert '"nproc": 2' in res.stdout
    res = run_cli("check", str(make_config()), "--gpus", "1", "--json")
    assert '"nproc": 1' in res.stdout


def test_health_reads_the_supervisors_heartbeat(tmp_path: Path) -> None:
    import json
    import time

    beat = tmp_path / "hb.json"
    env = {"FT_HEARTBEAT_FILE": str(beat)}
    assert CliRunner().invoke(cli, ["health"], env=env).exit_code == 1  # none yet
    beat.write_text(json.dumps({"state": "training", "step": 7, "time": time.time()}))
    res = CliRunner().invoke(cli, ["health"], env=env)
    assert res.exit_code == 0 and "training step 7" in res.output
    beat.write_text(json.dumps({"state": "training", "step": 7, "time": time.time() - 600}))
    res = CliRunner().invoke(cli, ["health"], env=env)
    assert res.exit_code == 1 and "the supervisor is stuck" in res.stderr
    beat.write_text(json.dumps({"state": "finished", "step": 30, "time": time.time() - 600}))
    assert CliRunner().invoke(cli, ["health"], env=env).exit_code == 0


def test_status_watch_refreshes_until_interrupted(tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    from ft_appliance.state.layout import StateDir, write_record
    from ft_appliance.state.records import Progress, RunState, StatusRecord

    from tests.helpers import cli_argv

    sd = StateDir(tmp_path / "run")
    sd.root.mkdir(parents=True)

    def at(step: int) -> None:
        p = Progress(step, 100, step * 10, 50.0, 0.2, 1.0, 1.0 / step, 1.0)
        write_record(sd.status, StatusRecord(RunState.FINISHED, str(sd.output_dir), progress=p, updated=time.time()))

    at(7)
    proc = subprocess.Popen(cli_argv("status", str(sd.output_dir), "--watch", "0.5"), stdout=subprocess.PIPE, text=True)
    time.sleep(2.5)  # the interpreter starts, then a refresh every half second
    at(42)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert out.count("finished: ") >= 3 and "step 7/100" in out and "step 42/100" in out
