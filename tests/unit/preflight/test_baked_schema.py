"""The schema the image's build bakes (preflight/gate.bake, FT_BAKED_CACHE): a fresh volume's first
check reads it instead of importing LlamaFactory's arguments. Fresh interpreters, the real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ft_appliance.preflight import gate

FIRST_CHECK = """
import json, sys
from ft_appliance.preflight.gate import schema_and_templates
schema, templates = schema_and_templates()
print(json.dumps({"imported": "llamafactory.hparams" in sys.modules, "fields": sorted(schema),
                  "lora_rank": sorted(schema["lora_rank"].kinds), "templates": len(templates)}))
"""


def first_check(tmp_path: Path, baked: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FT_CACHE_DIR", "FT_BAKED_CACHE")}
    env["HF_HOME"] = str(tmp_path / "fresh-volume-hf")  # nothing cached on the volume yet
    if baked is not None:
        env["FT_BAKED_CACHE"] = str(baked)
    res = subprocess.run([sys.executable, "-c", FIRST_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("baked")
    path = gate.bake(directory)
    assert path.parent == directory and path.name.startswith("schema-llamafactory-")
    return directory


def test_a_fresh_volume_reads_the_baked_schema_without_importing_llamafactory(tmp_path: Path, baked: Path) -> None:
    without = first_check(tmp_path / "a", None)
    with_baked = first_check(tmp_path / "b", baked)
    assert without["imported"] is True and with_baked["imported"] is False
    assert with_baked["fields"] == without["fields"] and len(with_baked["fields"]) > 200
    assert with_baked["lora_rank"] == without["lora_rank"] == ["int"]
    assert with_baked["templates"] == without["templates"] > 10


def test_a_baked_schema_of_other_versions_is_not_read(tmp_path: Path, baked: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (path,) = baked.iterdir()
    (other / path.name.replace("schema-llamafactory-", "schema-llamafactory-0.0.1-x")).write_bytes(path.read_bytes())
    assert first_check(tmp_path, other)["imported"] is True
