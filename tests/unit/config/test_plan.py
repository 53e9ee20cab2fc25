from __future__ import annotations

from pathlib import Path

import pytest
from ft_appliance.config.plan import apply_policy, build_plan, parse_overrides, read_yaml
from ft_appliance.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        (None, "missing.yaml", "does not exist"),
        ("a: 1\n b: [\n", "c.yaml", "not valid YAML at line 2"),
        ("", "c.yaml", "is empty"),
        ("- a\n- b\n", "c.yaml", "must be a mapping"),
        ('{"a": 1}', "c.json", "is JSON"),
        ("out: ${nope}\n", "c.yaml", "cannot be read as a LlamaFactory config"),
    ],
)
def test_read_yaml_errors_name_the_file(tmp_path: Path, text: str | None, name: str, expected: str) -> None:
    path = tmp_path / name if text is None else write(tmp_path, text, name)
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    assert expected in err.value.message
    assert str(path) in err.value.message
    assert "\n" not in err.value.message


def test_read_yaml_reads_numbers_like_llamafactory(tmp_path: Path) -> None:
    # PyYAML alone reads 2e-4 as a string; LlamaFactory (OmegaConf) reads a number.
    data = read_yaml(write(tmp_path, "learning_rate: 2e-4\nlora_rank: 8\nbf16: true\nname: x\n"))
    assert data == {"learning_rate": 2e-4, "lora_rank": 8, "bf16": True, "name": "x"}


def test_overrides_are_typed_and_win(tmp_path: Path) -> None:
    assert parse_overrides(["max_steps=10", "bf16=false", "learning_rate=1e-3", "template=llama3"]) == {
        "max_steps": 10,
        "bf16": False,
        "learning_rate": 1e-3,
        "template": "llama3",
    }
    cfg = write(tmp_path, "output_dir: out\nmax_steps: 100\nlora_rank: 8\n")
    plan = build_plan(cfg, ["max_steps=5"], nproc=2, workdir=tmp_path)
    assert plan.args["max_steps"] == 5
    assert plan.args["lora_rank"] == 8


@pytest.mark.parametrize("bad", ["max_steps", "=5", "max_steps 5"])
def test_override_without_equals_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides([bad])


def test_policy_forces_resumable_output_and_absolute_path(tmp_path: Path) -> None:
    cfg = write(tmp_path, "output_dir: out/run\noverwrite_output_dir: true\n")
    plan = build_plan(cfg, [], nproc=1, workdir=tmp_path)
    assert plan.args["overwrite_output_dir"] is False
    assert plan.output_dir == tmp_path / "out" / "run"
    assert plan.args["output_dir"] == str(tmp_path / "out" / "run")
    assert any("overwrite_output_dir forced off" in n for n in plan.notes)


def test_policy_keeps_every_other_key_unchanged() -> None:
    args = {"output_dir": "/x", "lora_rank": 8, "template": "llama3", "bf16": True}
    out, notes = apply_policy(args, Path("/x"))
    assert out == {**args, "overwrite_output_dir": False}
    assert notes == []


def test_missing_output_dir_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no output_dir"):
        build_plan(write(tmp_path, "lora_rank: 8\n"), [], nproc=1, workdir=tmp_path)
