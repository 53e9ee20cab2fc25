from __future__ import annotations

import pytest
from ft_appliance.preflight.schema import check_args, load_schema
from ft_appliance.tools.demo import demo_config


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def test_demo_config_is_valid(schema, tmp_path) -> None:
    assert check_args(demo_config(tmp_path), schema, "demo.yaml") == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"lora_rnak": 8}, "unknown key 'lora_rnak': did you mean 'lora_rank'?"),
        ({"totally_unknown_thing": 1}, "unknown key 'totally_unknown_thing': remove it or check its spelling"),
        ({"lora_rank": "8"}, "lora_rank is the string '8': write 8 without quotes"),
        ({"bf16": "false"}, "bf16 is the string 'false', which counts as true: write false without quotes"),
        ({"learning_rate": "2.0e-4"}, "learning_rate is the string '2.0e-4': write 2.0e-4 without quotes"),
        ({"stage": "stf"}, "stage is 'stf', not one of pt, sft, rm, ppo, dpo, kto (did you mean 'sft'?)"),
        (
            {"finetuning_type": "qlora"},
            "finetuning_type is 'qlora', not one of lora, oft, freeze, full (did you mean 'lora'?)",
        ),
        ({"max_steps": 10.0}, "max_steps is 10.0 but must be a whole number: write 10"),
        ({"num_train_epochs": "three"}, "num_train_epochs is the string 'three' but must be a number"),
    ],
)
def test_bad_values_give_one_clear_line(schema, args, expected) -> None:
    problems = check_args(args, schema, "c.yaml")
    assert len(problems) == 1
    assert problems[0].message == f"c.yaml: {expected}"


def test_free_strings_where_llamafactory_takes_them(schema) -> None:
    ok = {
        "lr_scheduler_type": "cosine",
        "save_strategy": "steps",
        "report_to": "none",
        "template": "llama3",
        "lora_target": "all",
        "num_train_epochs": 3,
        "learning_rate": 1,
    }
    assert check_args(ok, schema, "c.yaml") == []
