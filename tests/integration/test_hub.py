"""Hub models staged once, before any worker starts, from a hub of our own on loopback (HF_ENDPOINT):
then training runs offline. Refusals (gated, missing, no network, offline) are one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fakes.hub import FakeHub
from tests.helpers import run_cli, trainer_state

pytestmark = pytest.mark.slow

FAST = ["--nproc", "2", "--backoff", "0.2"]
REPO = "acme/tiny-llama"
GATED = "acme/gated-llama"
TOKEN = "hf_goodtokenforthetests"


@pytest.fixture
def hub(demo_root: Path):
    h = FakeHub()
    h.add(REPO, demo_root / "models" / "tiny-llama")
    h.add(GATED, demo_root / "models" / "tiny-llama", token=TOKEN)
    yield h
    h.close()


def online(hub: FakeHub, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0", "FT_HUB_BACKOFF_S": "0.05", "HF_HUB_DISABLE_XET": "1", **extra}  # fmt: skip


def test_a_hub_model_is_staged_once_by_the_head_and_trains_offline(make_config, tmp_path: Path, hub) -> None:
    cfg = make_config("hub", model_name_or_path=REPO, max_steps=10, save_steps=5)
    res = run_cli("train", str(cfg), *FAST, env=online(hub, tmp_path), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"staged {REPO}@{hub.sha(REPO)[:12]}" in res.stdout
    files = [p.name for p in hub.files(REPO)]
    gets = {k: n for k, n in hub.requests.items() if k.startswith("GET /acme/tiny-llama/resolve/")}
    assert sorted(k.rsplit("/", 1)[1] for k in gets) == sorted(files) and set(gets.values()) == {1}  # once each
    assert trainer_state(tmp_path / "output" / "hub")["global_step"] == 10
    before = sum(hub.requests.values())
    again = run_cli("train", str(cfg), "max_steps=15", *FAST, env=online(hub, tmp_path), timeout=600)
    assert again.returncode == 0 and "downloading" not in again.stdout, again.stdout[-2000:]
    assert sum(hub.requests.values()) == before  # staged: the restart sent nothing to the hub


@pytest.mark.parametrize(
    ("repo", "args", "extra", "code", "needle"),
    [
        (GATED, [], {}, 9, f"{GATED} is a gated repo and no HF_TOKEN is set: accept its terms"),
        (GATED, [], {"HF_TOKEN": "hf_wrong"}, 9, "is a gated repo and HF_TOKEN has no access to it"),
        ("acme/nothing", [], {}, 9, "acme/nothing is not a repo on the hub (or it is private: set HF_TOKEN)"),
        (REPO, ["--revision", "v9"], {}, 9, f"{REPO} has no revision 'v9'"),
        (REPO, [], {"HF_ENDPOINT": "http://127.0.0.1:9"}, 8, f"cannot reach the hub to download {REPO}"),
        (REPO, [], {"HF_HUB_OFFLINE": "1"}, 8, "the hub is off here"),
    ],
)
def test_hub_refusals_are_one_line(hub, tmp_path: Path, repo, args, extra, code, needle) -> None:
    res = run_cli("pull", repo, *args, env=online(hub, tmp_path, **extra), timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == code and len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
    assert "hf_wrong" not in res.stdout + res.stderr


def test_pull_stages_a_gated_model_with_its_token(hub, tmp_path: Path) -> None:
    res = run_cli("pull", GATED, "--json", env=online(hub, tmp_path, HF_TOKEN=TOKEN), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["revision"] == hub.sha(GATED) and (Path(got["path"]) / "config.json").exists()
    assert TOKEN not in res.stdout + res.stderr


def test_progress_lines_off_a_terminal_say_how_far_the_download_got(tmp_path: Path, monkeypatch) -> None:
    import time

    from ft_appliance.stage.hub import ProgressLines

    blobs = tmp_path / "models--acme--big" / "blobs"
    blobs.mkdir(parents=True)
    lines: list[str] = []
    with ProgressLines(blobs.parent, 4 * 2**20, lines.append, every_s=0.2):
        (blobs / "a.incomplete").write_bytes(b"\0" * 2**20)
        time.sleep(0.5)
        (blobs / "b").write_bytes(b"\0" * 2**21)
        time.sleep(0.5)
    assert "downloading models--acme--big: 1 of 4 MiB (25%)" in lines
    assert lines[-1] == "downloading models--acme--big: 3 of 4 MiB (75%)"


def test_a_downloaded_model_is_checked_before_any_worker_starts(make_config, tmp_path: Path, hub, demo_root) -> None:
    import shutil

    torn = tmp_path / "torn-llama"
    shutil.copytree(demo_root / "models" / "tiny-llama", torn)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a repo with a torn upload
    hub.add("acme/torn-llama", torn)
    cfg = make_config("torn", model_name_or_path="acme/torn-llama", max_steps=10)
    res = run_cli("train", str(cfg), *FAST, env=online(hub, tmp_path), timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 9 and len(lines) == 1 and "model.safetensors" in lines[0], res.stderr[-2000:]
    assert "staged acme/torn-llama@" in res.stdout
    assert not (tmp_path / "output" / "torn" / ".ft" / "attempts").exists()  # nothing launched


DATASET = "acme/sums"


def hub_dataset(demo_root: Path, tmp_path: Path, hub: FakeHub) -> Path:
    """A dataset repo on the hub of our own (its data file is the demo's), and a dataset_dir whose
    dataset_info.json names it by hf_hub_url only."""
    repo = tmp_path / "repo"
    repo.mkdir()
    info = json.loads((demo_root / "datasets" / "dataset_info.json").read_text())
    (repo / "train.json").write_bytes((demo_root / "datasets" / next(iter(info.values()))["file_name"]).read_bytes())
    hub.add(DATASET, repo)
    data = tmp_path / "datasets"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"sums": {"hf_hub_url": DATASET}}))
    return data


def test_a_hub_dataset_is_staged_once_by_the_head_and_the_workers_load_it_offline(
    make_config, demo_root: Path, tmp_path: Path, hub
) -> None:
    data = hub_dataset(demo_root, tmp_path, hub)
    cfg = make_config("hubds", dataset="sums", dataset_dir=str(data), max_steps=6, save_steps=3)
    env = online(hub, tmp_path, HF_DATASETS_OFFLINE="1")  # as the image sets it
    res = run_cli("train", str(cfg), *FAST, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"staged dataset 'sums' from {DATASET}@{hub.sha(DATASET)[:12]}" in res.stdout
    gets = [k for k in hub.requests if k.startswith("GET /datasets/acme/sums/resolve/")]
    assert [g.rsplit("/", 1)[1] for g in gets] == ["train.json"] and hub.requests[gets[0]] == 1  # once, not per rank
    assert trainer_state(tmp_path / "output" / "hubds")["global_step"] == 6
    before = sum(hub.requests.values())
    again = run_cli("train", str(cfg), "max_steps=9", *FAST, env=env, timeout=600)
    assert again.returncode == 0 and "staged dataset" not in again.stdout, again.stdout[-2000:]
    assert sum(hub.requests.values()) == before  # cached: the restart asked the hub nothing


def test_a_hub_dataset_with_the_hub_off_is_one_line(make_config, demo_root: Path, tmp_path: Path, hub) -> None:
    data = hub_dataset(demo_root, tmp_path, hub)
    cfg = make_config("hubds", dataset="sums", dataset_dir=str(data))
    res = run_cli("train", str(cfg), *FAST, env=online(hub, tmp_path, HF_HUB_OFFLINE="1"), timeout=300)
    assert res.returncode == 8, res.stdout[-2000:] + res.stderr[-2000:]
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("ft-appliance:")]
    assert f"dataset 'sums' comes from the hub ({DATASET}) and the hub is off here" in line
    assert not hub.requests
