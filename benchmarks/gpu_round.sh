#!/usr/bin/env bash
# One device call's measurements, within the call's time limit: the carried wheels installed over the
# machine's torch, the image's package set (these machines add scikit-learn and scipy), the GPU tests
# named by -k, the attention and GEMM micro-benchmarks, then bench.py's cases on an empty workdir (the
# first case is a first start: no kernels, no autotune decision). Also benchmarks/cuda_context.py, one round.
#   OUT=... bash benchmarks/gpu_round.sh [-k PYTEST_EXPR] [--budget SECONDS] [-- BENCH_ARGS...]
#   e.g. bash benchmarks/gpu_round.sh -k "host or blockdiag" --budget 560 -- --steps 12 profile profile-hostpieces
set -uo pipefail
OUT="${OUT:-/tmp/ft-out}"; mkdir -p "$OUT"
tests="" budget=580
while [ $# -gt 0 ]; do
  case "$1" in
    -k) tests="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( budget - ($(date +%s) - start) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip uninstall -y -q scikit-learn scipy 2>/dev/null
export PYTHONPATH="/tmp/site:$PWD/entrypoint:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.csv"
say "set up"
if [ -n "$tests" ]; then
  timeout 120 python3 -m pytest -p no:cacheprovider -q tests/gpu -k "$tests" 2>&1 | tee "$OUT/pytest.log" | tail -8
  say "tests"
fi
timeout 60 python3 benchmarks/attention_kernels.py 2>&1 | tee "$OUT/attention.txt" | tail -7
timeout 40 python3 benchmarks/gemm_shapes.py 2>&1 | tee "$OUT/gemm.txt"
timeout 60 python3 benchmarks/cuda_context.py 1 2>&1 | tee "$OUT/cuda_context.txt"
say "micro-benchmarks"
if [ $# -gt 0 ]; then
  OUT="$OUT" timeout "$(left)" python3 benchmarks/bench.py --workdir /tmp/bench "$@" > "$OUT/bench.log" 2>&1
  say "bench rc=$?"
  tail -12 "$OUT/bench.log"
fi
