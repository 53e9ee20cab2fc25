"""What an operator sees, with real runs of the tiny model: `status` during a run, after a crash and after
the end; metrics (textfile and HTTP) that move as training goes; the loss curve across a restart;
TensorBoard logs; the webhook against a loopback HTTP server; export for serving; `init`."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
from ft_appliance.result.curve import CURVE_FILE, curve_of
from ft_appliance.state.layout import MARKER, StateDir
from ft_appliance.tools.procs import kill_run

from tests.helpers import SECRET, Hook, last_step, run_cli, start_cli, trainer_state, wait_for

pytestmark = pytest.mark.slow

FAST = ["--nproc", "2", "--backoff", "0.2"]


@pytest.fixture
def hook():
    h = Hook(fail_first=2)
    yield h
    h.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


def status_json(out: Path) -> dict:
    res = run_cli("status", str(out), "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_status_metrics_curve_and_webhook_across_a_crash(make_config, tmp_path: Path, hook: Hook) -> None:
    cfg = make_config(
        "ops", max_steps=300, save_steps=10, logging_steps=2, val_size=0.1, eval_strategy="steps", eval_steps=100,
        report_to="tensorboard",
    )  # fmt: skip
    out = tmp_path / "output" / "ops"
    port = free_port()
    env = {"FT_NOTIFY_URL": hook.url, "FT_NOTIFY_BACKOFF_S": "0.1", "HF_TOKEN": SECRET}
    sup = start_cli("train", str(cfg), *FAST, "--metrics-port", str(port), log=tmp_path / "log1", env=env)
    wait_for(lambda: (out / "checkpoint-10" / MARKER).exists() and last_step(out) >= 14, 240, what="step 14")
    # status.json follows the workers' records at the supervisor's next poll (half a second) or later
    wait_for(lambda: (status_json(out)["status"].get("last_checkpoint") or 0) >= 10, 60, what="status to catch up")
    running = status_json(out)
    assert running["state"] == "running" and running["supervisor_alive"]
    assert running["status"]["progress"]["max_steps"] == 300 and running["status"]["last_checkpoint"] >= 10
    first = scrape(port)
    wait_for(lambda: last_step(out) >= first["ft_step"] + 4, 120, what="more steps")
    wait_for(lambda: scrape(port)["ft_step"] > first["ft_step"], 30, what="the metrics to move")
    assert first["ft_max_steps"] == 300 and first["ft_loss"] > 0 and first["ft_learning_rate"] > 0
    kill_run(sup, out)  # the whole tree, as `docker kill` would: no word to the webhook
    crashed = run_cli("status", str(out), timeout=60)
    assert crashed.stdout.startswith("supervisor gone: ") and "checkpoint-10" in crashed.stdout, crashed.stdout
    killed_at = last_step(out)
    resume = max(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{MARKER}"))

    res = run_cli("train", str(cfg), *FAST, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert SECRET not in res.stdout + res.stderr and "notified 127.0.0.1 (finished, HTTP 200)" in res.stdout
    assert hook.requests == 3 and [b["event"] for b in hook.bodies] == ["finished"]  # two 503s, then delivered
    body = hook.bodies[0]
    assert SECRET not in json.dumps(body) and body["step"] == 300 and body["restarts"] == 1

    done = status_json(out)
    assert done["state"] == "finished" and not done["supervisor_alive"]
    assert done["status"]["restarts"] == 1 and sum(done["status"]["steps_lost"]) == killed_at - resume
    verdicts = {c["name"]: c["verdict"] for c in done["checkpoints"]}
    assert verdicts["checkpoint-300"] == "resume point" and verdicts["checkpoint-10"] == "complete"
    assert done["products"] == [str(out / "adapter_model.safetensors")]
    text = run_cli("status", str(out), timeout=60).stdout
    assert text.startswith(f"finished: {out}") and "step 300/300" in text and "restarts 1; steps lost" in text

    curve = curve_of(StateDir(out))  # the PNG's points: every logged step once, the restart marked
    assert curve.steps == list(range(2, 301, 2)) and curve.restarts == [resume]
    assert curve.eval_steps == [100, 200, 300] and len(curve.lrs) == 150
    from matplotlib.image import imread

    assert imread(out / CURVE_FILE).shape[:2] == (500, 900)
    assert list(out.glob("runs/**/events.out.tfevents.*")), "report_to: tensorboard wrote no event file"
    assert "ft_step" in (StateDir(out).metrics).read_text()
    health = run_cli("health", str(out), timeout=60)
    assert health.returncode == 0 and health.stdout.startswith("finished step 300")


def _logits(model_dir: Path, ids) -> object:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def _base_plus_adapter(base: Path, adapter: Path, ids) -> object:  # noqa: ANN001
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
    )
    with torch.no_grad():
        return model(ids).logits


def test_export_merges_the_adapter_into_weights_that_give_the_same_logits(make_config, demo_root, tmp_path) -> None:
    import torch

    cfg = make_config("exp", max_steps=20, save_steps=5)
    out = tmp_path / "output" / "exp"
    sup = start_cli("train", str(cfg), *FAST, log=tmp_path / "log")
    wait_for(lambda: (out / "checkpoint-10" / MARKER).exists(), 240, what="checkpoint-10")
    kill_run(sup, out)
    refused = run_cli("export", str(out), timeout=120)
    assert refused.returncode != 0 and "has not finished: name a checkpoint with --checkpoint" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    mid = run_cli("export", str(out), "--checkpoint", "checkpoint-10", "--dtype", "float32", timeout=300)
    assert mid.returncode == 0, mid.stderr[-3000:]
    assert run_cli("train", str(cfg), *FAST, timeout=600).returncode == 0
    final = run_cli("export", str(out), str(tmp_path / "served"), "--dtype", "float32", "--json", timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    files = json.loads(final.stdout.strip().splitlines()[-1])["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(files)
    again = run_cli("export", str(out), str(tmp_path / "served"), timeout=120)
    assert again.returncode == 3 and "never overwrites" in again.stderr

    base = demo_root / "models" / "tiny-llama"
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    for merged, adapter in ((tmp_path / "served", out), (out / "export-checkpoint-10", out / "checkpoint-10")):
        want = _base_plus_adapter(base, adapter, ids)
        got = _logits(merged, ids)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    assert trainer_state(out)["global_step"] == 20  # the run itself untouched


def test_init_lays_out_a_volume_once_and_never_overwrites(tmp_path: Path) -> None:
    vol = tmp_path / "data"
    first = run_cli("init", str(vol), timeout=60)
    assert first.returncode == 0, first.stderr
    made = sorted(str(p.relative_to(vol)) for p in vol.rglob("*"))
    assert {"configs/train.example.yaml", "datasets/dataset_info.json", "datasets/my_dataset.json", "models",
            "output", "README.txt"} <= set(made)  # fmt: skip
    info = json.loads((vol / "datasets" / "dataset_info.json").read_text())
    assert json.loads((vol / "datasets" / info["my_dataset"]["file_name"]).read_text())[0]["instruction"]
    assert "# " in (vol / "configs" / "train.example.yaml").read_text()  # commented
    (vol / "README.txt").write_text("mine")
    snapshot = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in vol.rglob("*")}
    second = run_cli("init", str(vol), timeout=60)
    assert second.returncode == 0 and "nothing changed" in second.stdout
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in vol.rglob("*")} == snapshot
    assert (vol / "README.txt").read_text() == "mine"
