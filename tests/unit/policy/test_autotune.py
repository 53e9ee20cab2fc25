"""Batch autotune: candidates keep the effective batch; the largest fitting probe wins; decisions cached."""

from __future__ import annotations

from pathlib import Path

from ft_appliance.config.plan import Plan
from ft_appliance.policy.autotune import candidates, choose
from ft_appliance.run.probe import ProbeResult, autotune
from ft_appliance.run.signals import Shutdown

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

    def probe(plan: Plan, _shutdown: Shutdown) -> ProbeResult:  # a recorded memory profile of a card
        micro = plan.args["per_device_train_batch_size"]
        probed.append(micro)
        assert plan.args["gradient_accumulation_steps"] == 1 and plan.args["max_steps"] == 2
        assert plan.output_dir != tmp_path / "out" and plan.args["save_strategy"] == "no"
        return ProbeResult(oom=True) if micro > 4 else ProbeResult(peak=micro * 15 * GiB)

    cache = tmp_path / "autotune.json"
    stop = Shutdown()

    def tune(card: str, mem: int):
        return autotune(_plan(tmp_path), card, mem, 1, cache, stop, lambda _: None, probe=probe)

    updates, notes = tune("NVIDIA H100 80GB HBM3", 80 * GiB)
    assert probed == [8, 4]
    assert updates == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    assert "effective batch 8 kept" in notes[0]
    probed.clear()
    updates2, notes2 = tune("NVIDIA H100 80GB HBM3", 80 * GiB)
    assert probed == [] and updates2 == updates and "from the cache" in notes2[0]
    # another card is another key
    tune("NVIDIA A10G", 22 * GiB)
    assert probed == [8, 4, 2, 1]  # 15 GiB per micro-batch: only 1 fits within 80% of 22 GiB


def test_a_probe_that_fails_for_another_reason_stops_autotune(tmp_path: Path) -> None:
    import pytest
    from ft_appliance.errors import ApplianceError

    def probe(plan: Plan, _shutdown: Shutdown) -> ProbeResult:
        return ProbeResult(error="DatasetGenerationError: bad row", log=tmp_path / "probe.log")

    with pytest.raises(ApplianceError, match="autotune probe of micro-batch 8 failed: DatasetGenerationError"):
        autotune(_plan(tmp_path), "H100", 80 * GiB, 1, tmp_path / "c.json", Shutdown(), lambda _: None, probe=probe)
