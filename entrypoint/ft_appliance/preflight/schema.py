"""LlamaFactory's own argument schema, and the pure check of a config against it.

LlamaFactory rejects unknown keys only after importing the stack, and never checks value types:
`lora_rank: "8"` fails deep in training and a quoted `bf16: "false"` is truthy. The schema is read
from LlamaFactory's argument dataclasses, so it follows the installed version.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .problems import Problem

SCALARS = ("bool", "int", "float", "str")


@dataclass(frozen=True)
class ArgSpec:
    name: str
    kinds: frozenset[str]
    """Accepted scalar kinds ("bool", "int", "float", "str"); "any" for containers and objects."""
    choices: tuple[str, ...] = ()


def _kinds_of(tp: Any) -> tuple[set[str], tuple[str, ...]]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        kinds: set[str] = set()
        choices: tuple[str, ...] = ()
        for sub in typing.get_args(tp):
            k, c = _kinds_of(sub)
            kinds |= k
            choices += c
        return kinds, choices
    if origin is typing.Literal:
        return {"str"}, tuple(str(a) for a in typing.get_args(tp))
    if tp is type(None):
        return {"none"}, ()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"str"}, tuple(str(m.value) for m in tp)
    if tp in (bool, int, float, str):
        return {tp.__name__}, ()
    return {"any"}, ()


def load_schema() -> dict[str, ArgSpec]:
    """Read the train-time argument dataclasses of the installed LlamaFactory (imports torch)."""
    from llamafactory.hparams.parser import _TRAIN_ARGS  # the list `llamafactory-cli train` parses

    schema: dict[str, ArgSpec] = {}
    for cls in _TRAIN_ARGS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            kinds, choices = _kinds_of(hints[f.name])
            # A str-or-enum field also accepts free strings ("linear" for SchedulerType | str).
            if "str" in kinds and choices and len(typing.get_args(hints[f.name])) > 1:
                choices = () if _accepts_free_str(hints[f.name]) else choices
            schema[f.name] = ArgSpec(f.name, frozenset(kinds), choices)
    return schema


def _accepts_free_str(tp: Any) -> bool:
    return any(a is str for a in typing.get_args(tp))


def _is_number_text(text: str, kind: str) -> bool:
    try:
        (int if kind == "int" else float)(text)
    except ValueError:
        return False
    return True


def _check_value(spec: ArgSpec, value: Any) -> str | None:
    kinds = spec.kinds
    if "any" in kinds or value is None:
        return None
    if isinstance(value, bool):
        return None if "bool" in kinds else f"is a boolean ({value}) but LlamaFactory expects {_expected(kinds)}"
    if isinstance(value, int):
        if kinds & {"int", "float"}:
            return None
        if "str" in kinds:
            return None if not spec.choices else _choice_message(spec, str(value))
        return f"is a number ({value}) but LlamaFactory expects {_expected(kinds)}"
    if isinstance(value, float):
        if "float" in kinds:
            return None
        if "int" in kinds and value.is_integer():
            return f"is {value} but must be a whole number: write {int(value)}"
        return f"is {value} but LlamaFactory expects {_expected(kinds)}"
    if isinstance(value, str):
        if "bool" in kinds and "str" not in kinds:
            if value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "0", "1"):
                return f"is the string {value!r}, which counts as true: write {value.strip().lower()} without quotes"
            return f"is the string {value!r} but must be true or false"
        for kind in ("int", "float"):
            if kind in kinds and "str" not in kinds:
                if _is_number_text(value, kind):
                    return f"is the string {value!r}: write {value.strip()} without quotes"
                return f"is the string {value!r} but must be a number"
        if "str" in kinds and spec.choices and value not in spec.choices:
            return _choice_message(spec, value)
        return None
    # Lists and mappings: LlamaFactory takes lists where it takes comma-separated strings.
    return None


def _choice_message(spec: ArgSpec, value: str) -> str:
    near = difflib.get_close_matches(value, spec.choices, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"is {value!r}, not one of {', '.join(spec.choices)}{hint}"


def _expected(kinds: frozenset[str]) -> str:
    names = {"bool": "true/false", "int": "a whole number", "float": "a number", "str": "a string"}
    return " or ".join(names[k] for k in SCALARS if k in kinds) or "another type"


# Keys transformers 5 removed, with the spelling that replaced them (LlamaFactory's older examples and
# many users' configs still carry them; the generic "unknown key" line would not say what to write).
RENAMED = {
    "fsdp_transformer_layer_cls_to_wrap": "fsdp_config: {{transformer_layer_cls_to_wrap: [{value}]}}",
    "fsdp_min_num_params": "fsdp_config: {{min_num_params: {value}}}",
}


def check_args(args: Mapping[str, Any], schema: Mapping[str, ArgSpec], source: str) -> list[Problem]:
    """Unknown keys (with a did-you-mean) and values of the wrong type, in file order."""
    problems: list[Problem] = []
    for key, value in args.items():
        spec = schema.get(key)
        if spec is None and key in RENAMED:
            spelling = RENAMED[key].format(value=value)
            message = f"{source}: {key} was removed in transformers 5: write {spelling} instead"
            problems.append(Problem("config.unknown_key", message))
            continue
        if spec is None:
            near = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.75)
            hint = f": did you mean {near[0]!r}?" if near else ": remove it or check its spelling"
            problems.append(Problem("config.unknown_key", f"{source}: unknown key {key!r}{hint}"))
            continue
        why = _check_value(spec, value)
        if why:
            problems.append(Problem("config.type", f"{source}: {key} {why}"))
    return problems
