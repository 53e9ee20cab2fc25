from __future__ import annotations

import time
import types

from ft_appliance.worker.setup_clock import SetupClock


def _workflow() -> types.ModuleType:
    module = types.ModuleType("llamafactory.train.sft.workflow")

    def load_model(seconds: float) -> str:
        time.sleep(seconds)
        return "model"

    def get_dataset() -> list[int]:
        return [1, 2]

    module.load_model, module.get_dataset, module.other = load_model, get_dataset, load_model
    return module


def test_wraps_the_phases_of_workflow_modules_once_and_keeps_their_results() -> None:
    seconds: dict[str, float] = {}
    sft, unrelated = _workflow(), _workflow()
    modules = {"llamafactory.train.sft.workflow": sft, "llamafactory.data.loader": unrelated}
    clock = SetupClock(seconds)
    assert clock.install(modules) == 2  # load_model and get_dataset; not other, not another package
    assert clock.install(modules) == 0  # already wrapped
    assert unrelated.load_model.__name__ == "load_model" and not hasattr(unrelated.load_model, "ft_setup_clock")

    assert sft.load_model(0.05) == "model" and sft.load_model(0.05) == "model" and sft.get_dataset() == [1, 2]
    assert 0.1 <= seconds["load_model"] < 1.0  # two calls summed
    assert set(seconds) == {"load_model", "get_dataset"}


def test_a_failing_phase_is_timed_and_still_raises() -> None:
    module = types.ModuleType("llamafactory.train.pt.workflow")

    def load_tokenizer() -> None:
        raise OSError("no tokenizer")

    module.load_tokenizer = load_tokenizer
    seconds: dict[str, float] = {}
    SetupClock(seconds).install({"llamafactory.train.pt.workflow": module})
    try:
        module.load_tokenizer()
    except OSError as exc:
        assert str(exc) == "no tokenizer"
    else:
        raise AssertionError("the error was swallowed")
    assert "load_tokenizer" in seconds
