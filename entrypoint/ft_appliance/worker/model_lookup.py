"""LlamaFactory's load_model picks its Auto class with `type(config) in AutoX._model_mapping.keys()` for
three mappings (image-text, seq2seq, text-to-waveform). A mapping's keys() imports the configuration
module of every model type it lists (109 for the three, with their model packages): 0.6 s on the CI
machine and 1.8 s under py-spy on the H200 machine, in every first launch before the weights load.

install() gives those three mappings a keys() whose `in` resolves only the config classes named like
the one asked about, and compares them by identity, which is what `in` on the full list does. Anything
else (iteration, len, indexing) builds the full list as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def member(mapping: Any, item: Any) -> bool:
    """`item in mapping.keys()` for a transformers _LazyAutoMapping, importing only the configuration
    modules whose config class has item's name."""
    if item in mapping._extra_content:  # registered at run time (custom models)
        return True
    name = getattr(item, "__name__", None)
    return any(
        config_name == name
        and model_type in mapping._model_mapping
        and mapping._load_attr_from_module(model_type, config_name) is item
        for model_type, config_name in mapping._config_mapping.items()
    )


class Keys(Sequence):
    """A mapping's keys(): membership by member(), the rest from the full list, built on first need."""

    def __init__(self, mapping: Any, full_keys: Any) -> None:
        self._mapping, self._full_keys, self._list = mapping, full_keys, None

    def __contains__(self, item: object) -> bool:
        return member(self._mapping, item)

    def _full(self) -> list:
        if self._list is None:
            self._list = self._full_keys()
        return self._list

    def __getitem__(self, index: Any) -> Any:
        return self._full()[index]

    def __len__(self) -> int:
        return len(self._full())


def install() -> None:
    """Patch the three mappings LlamaFactory asks (once per process; only these instances)."""
    from transformers import AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoModelForTextToWaveform

    for auto in (AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoModelForTextToWaveform):
        mapping = auto._model_mapping
        if "keys" not in vars(mapping):
            full_keys = type(mapping).keys.__get__(mapping)
            mapping.keys = lambda mapping=mapping, full_keys=full_keys: Keys(mapping, full_keys)
