"""Shared fixtures: an offline environment and the tiny model built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import helpers


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    # datasets caches tokenised data under HF_HOME: keep it inside the test tree, and never reach a hub.
    home = tmp_path_factory.mktemp("hf-home")
    os.environ.update(helpers.offline_env(home))


@pytest.fixture(autouse=True)
def no_gpus_outside_gpu_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tests mean CPU on any machine: they judge a recorded inventory with no GPU instead of the
    host's NVML (the only faked part, behind its interface), so a GPU host does not change them."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("FT_GPU_INVENTORY", str(helpers.INVENTORIES / "none.json"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A /data-style layout with the tiny Llama and the demo dataset (built once, read-only by convention)."""
    from ft_appliance.tools.demo import build_demo

    root = tmp_path_factory.mktemp("data")
    build_demo(root)
    return root


@pytest.fixture
def make_config(demo_root: Path, tmp_path: Path):
    """Write a config for the tiny model with its own output_dir; returns its path."""

    def make(name: str = "run", **overrides: object) -> Path:
        return helpers.write_config(demo_root, tmp_path, name, **overrides)

    return make
