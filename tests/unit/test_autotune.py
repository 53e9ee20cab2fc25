"""Batch autotune: candidates keep the effective batch; the largest fitting probe wins; decisions cached."""

from __future__ import annotations

from pathlib import Path

from ft_appliance.autotune import autotune, candidates, choose
from ft_appliance.config import Plan

GiB = 2**30


def test_candidates_keep_the_effective_batch() -> None:
    assert candidates(4, 2) == [(8, 1), (4, 2), (2, 4), (1, 8)]
    assert candidates(3, 1) == [(3, 1), (1, 3)]


def test_choose_largest_within_target() -> None:
    assert choose({8: None, 4: 62 * GiB}, 80 * GiB) == 4  # 8 ran out of memory
    assert choose({8: 70 * GiB, 4: 40 * GiB}, 80 * GiB) == 4  # 8 fits but above 80%
    assert choose({8: 60 * GiB, 4: 40 * GiB}, 80 * GiB) == 8
    assert choose({2: None}, 80 * GiB) is None


def _plan(tmp_path: Path) -> Plan:
    args = {
        "model_name_or_path": "/m",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "cutoff_len": 2048,
        "output_dir": str(tmp_path / "out"),
    }
    return Plan(tmp_path / "c.yaml", args, tmp_path / "out", 1, tmp_path)


def test_probes_from_the_largest_down_then_cache(tmp_path: Path) -> None:
    probed: list[int] = []

    def probe(plan: Plan) -> int | None:  # the injected probe: a recorded memory profile of a card
        micro = plan.args["per_device_train_batch_size"]
        probed.append(micro)
        assert plan.args["gradient_accumulation_steps"] == 1 and plan.args["max_steps"] == 2
        assert plan.output_dir != tmp_path / "out" and plan.args["save_strategy"] == "no"
        return None if micro > 4 else micro * 15 * GiB

    cache = tmp_path / "autotune.json"
    updates, notes = autotune(_plan(tmp_path), "NVIDIA H100 80GB HBM3", 80 * GiB, 1, cache, probe, lambda _: None)
    assert probed == [8, 4]
    assert updates == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    assert "effective batch 8 kept" in notes[0]
    probed.clear()
    updates2, notes2 = autotune(_plan(tmp_path), "NVIDIA H100 80GB HBM3", 80 * GiB, 1, cache, probe, lambda _: None)
    assert probed == [] and updates2 == updates and "from the cache" in notes2[0]
    # another card is another key
    autotune(_plan(tmp_path), "NVIDIA A10G", 22 * GiB, 1, cache, probe, lambda _: None)
    assert probed == [8, 4, 2, 1]  # 15 GiB per micro-batch: only 1 fits within 80% of 22 GiB
