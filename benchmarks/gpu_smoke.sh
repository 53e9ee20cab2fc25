#!/usr/bin/env bash
# On a GPU machine without network: install carried wheels (.whl/) over the machine's own torch,
# record the NVML inventory, run the GPU tests, and copy the evidence to $OUT.
#   bash benchmarks/gpu_smoke.sh
set -uo pipefail
OUT="${OUT:-/tmp/ft-out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/entrypoint:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=/tmp/hf PYTHONUNBUFFERED=1
# Bytecode for the whole stack, as the image has it (pip compiles at build); these machines' Python
# has none and writes none, and every test launch would compile torch again (benchmarks/bench.py).
export PYTHONPYCACHEPREFIX=/tmp/pycache
python3 -c 'import sys; sys.path.insert(0, "benchmarks"); from pathlib import Path; from bench import compile_bytecode; compile_bytecode(Path("/tmp/pycache"))'
python3 - <<'PY' > "$OUT/versions.txt"
import importlib.metadata as m, torch
for p in ["torch", "torchaudio", "transformers", "tokenizers", "accelerate", "peft", "trl", "datasets", "llamafactory", "liger-kernel", "triton"]:
    try: print(p, m.version(p))
    except Exception as e: print(p, "missing")
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
cat "$OUT/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c "import json; from ft_appliance.preflight.gpus import read_nvml; print(json.dumps(read_nvml().to_dict(), indent=1))" | tee "$OUT/inventory.json"
python3 -m pytest -p no:cacheprovider -q tests/gpu 2>&1 | tee "$OUT/pytest.log" | tail -15
