"""worker/model_lookup.py against transformers' own keys(), with the real transformers: the same answer
for every config class it knows, a look-alike, a registered custom model and a non-class; and the
question LlamaFactory asks about a Llama imports no configuration module."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ft_appliance.worker import model_lookup
from transformers import (
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoModelForTextToWaveform,
    LlamaConfig,
    PretrainedConfig,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

AUTOS = [AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoModelForTextToWaveform]


class LlavaConfig(PretrainedConfig):  # the name of a transformers image-text config, not the class
    model_type = "ft-test-lookalike"


def candidates() -> list[object]:
    known = []
    for model_type in CONFIG_MAPPING:
        try:
            known.append(CONFIG_MAPPING[model_type])
        except (ImportError, AttributeError, ValueError):  # a model type whose optional package is absent
            continue
    return [*known, LlavaConfig, LlamaConfig, None, "llava", 3]


@pytest.mark.parametrize("auto", AUTOS, ids=lambda a: a.__name__)
def test_membership_is_the_full_lists(auto: type) -> None:
    mapping = auto._model_mapping
    full = type(mapping).keys(mapping)
    rows = candidates()
    assert sum(model_lookup.member(mapping, c) for c in rows) > 0
    for c in rows:
        assert model_lookup.member(mapping, c) == (c in full), c


def test_a_registered_custom_model_is_a_member() -> None:
    class FtTestConfig(PretrainedConfig):
        model_type = "ft-test-custom"

    mapping = AutoModelForSeq2SeqLM._model_mapping
    assert not model_lookup.member(mapping, FtTestConfig)
    mapping.register(FtTestConfig, object, exist_ok=True)
    try:
        assert model_lookup.member(mapping, FtTestConfig) and FtTestConfig in type(mapping).keys(mapping)
    finally:
        del mapping._extra_content[FtTestConfig]


def test_installed_keys_answer_like_a_list() -> None:
    model_lookup.install()
    for auto in AUTOS:
        mapping = auto._model_mapping
        keys, full = mapping.keys(), type(mapping).keys(mapping)
        assert list(keys) == full and len(keys) == len(full) and keys[0] is full[0]
        assert (LlamaConfig in keys) == (LlamaConfig in full)
        assert bool(mapping) == bool(full)  # __bool__ and __iter__ go through keys()
        assert list(iter(mapping)) == full


ASK = """
import sys
from ft_appliance.worker import model_lookup
from transformers import AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoModelForTextToWaveform, LlamaConfig
model_lookup.install()
before = {m for m in sys.modules if ".configuration_" in m}
autos = (AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoModelForTextToWaveform)
answers = [LlamaConfig in a._model_mapping.keys() for a in autos]
print(answers, sorted({m for m in sys.modules if ".configuration_" in m} - before))
"""


def test_llamafactorys_question_about_a_llama_imports_no_configuration_module() -> None:
    res = subprocess.run([sys.executable, "-c", ASK], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[False, False, False] []"
