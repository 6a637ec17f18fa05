#!/usr/bin/env bash
# Every GPU check in one command, for a machine with a CUDA GPU (and no network):
#   bash bench/gpu_check.sh
# 1. builds the extensions in place (_cuda too when nvcc exists; falls back to _C only, then to pip install -e),
# 2. runs the GPU tests (pytest -m gpu python_tests),
# 3. runs the GPU benchmarks (python -m lengen_fast.bench.bench_attention --gpu-only, ...bench_rope), appending rows
#    to bench/results.csv (the record of the published figures),
# 4. copies the new results.csv rows and every log into $OUT when it is set.
# Each step has its own time limit (seconds; env STEP_TIMEOUT_BUILD / _TESTS / _ATTN / _ROPE) so a hang cannot eat the
# rest; the defaults fit one 10-minute call of a lent GPU machine. ONLY=tests,attn,rope picks steps (build always runs),
# e.g. ONLY=tests bash bench/gpu_check.sh, then ONLY=attn,rope bash bench/gpu_check.sh in a second call.
# PYTEST_K (a -k expression, e.g. "short or variants") and BENCH_ATTN_ARGS (e.g. '--gpu-runs 128:b') narrow a re-check.
# Exit status: 0 when every step passed, else 1 (the logs say which).
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-build/gpu_check}/gpu_check_logs
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=bench/results.csv
start_rows=$( [ -f "$RESULTS" ] && wc -l < "$RESULTS" || echo 0 )
status=0

step() {  # step NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOGS/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$LOGS/$name.log"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOGS/summary.txt"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true
ONLY=${ONLY:-tests,attn,rope}
want() { [[ ",$ONLY," == *",$1,"* ]]; }
step build "${STEP_TIMEOUT_BUILD:-240}" env LENGEN_CUDA=AUTO bash scripts/dev_build.sh \
  || step build_without_cuda_ext 600 env LENGEN_CUDA=OFF bash scripts/dev_build.sh \
  || step build_pip 900 python -m pip install --no-build-isolation --no-deps -e .
step describe 120 python -c "import json, lengen_fast; print(json.dumps(lengen_fast.backends.describe()))"
# pytest-xdist (when installed) runs the tests in parallel processes: Triton compiles dominate their time
par=(); python -c "import xdist" 2>/dev/null && par=(-n "${PYTEST_WORKERS:-8}")
tmo=(); python -c "import pytest_timeout" 2>/dev/null && tmo=(--timeout "${PYTEST_TIMEOUT:-240}")
want tests && step pytest_gpu "${STEP_TIMEOUT_TESTS:-200}" python -m pytest -m gpu python_tests -q -rfEx \
  -p no:cacheprovider "${par[@]}" "${tmo[@]}" ${PYTEST_K:+-k "$PYTEST_K"}
want attn && step bench_attention "${STEP_TIMEOUT_ATTN:-120}" python -m lengen_fast.bench.bench_attention --gpu-only \
  --out bench ${BENCH_ATTN_ARGS:-}
want rope && step bench_rope "${STEP_TIMEOUT_ROPE:-90}" python -m lengen_fast.bench.bench_rope --out bench

if [ -f "$RESULTS" ]; then
  { head -n 1 "$RESULTS"; tail -n +"$((start_rows + 1))" "$RESULTS" | grep -v '^date,'; } > "$LOGS/results_gpu.csv"
  echo "new results rows: $(( $(wc -l < "$LOGS/results_gpu.csv") - 1 )) -> $LOGS/results_gpu.csv"
fi
cat "$LOGS/summary.txt"
exit "$status"
