#!/usr/bin/env bash
# Every GPU check in one command, for a machine with a CUDA GPU (and no network); budget: under 8 minutes.
#   bash bench/gpu_check.sh
# 0. installs the cuDNN frontend wheel carried in .gpu_wheels/ (scripts/fetch_gpu_wheels.sh downloads it) for this
#    Python's tag into build/gpu_site (on PYTHONPATH; the system site-packages are not touched), printing the tag,
# 1. builds the extensions in place (_cuda too when nvcc exists; falls back to _C only, then to pip install -e),
# 2. runs the GPU tests (pytest -m gpu python_tests),
# 3. runs the attention peer benchmark (ours, FA2, cuDNN, our dispatch, torch varlen_attn, FlexAttention; layouts
#    a, b, c; hdim 64 and 128; bf16; fwd and bwd), cross-checking outputs and gradients against the reference,
#    appending rows to bench/results.csv, and writing the dispatch table lengen_fast/attention/dispatch_table.json,
# 4. runs the RoPE benchmark (ONLY=...,rope; not in the default set: it does not fit the budget with the rest),
# 5. copies the new results.csv rows, the dispatch table, the cross-checks, the autotune cache and every log to
#    $OUT when it is set (else build/gpu_check).
# Triton's compile cache (build/triton_cache) and our autotune results ($LOGS/autotune.json) persist across steps.
# Each step has its own time limit (seconds; env STEP_TIMEOUT_BUILD / _TESTS / _ATTN / _ROPE) so a hang cannot eat
# the rest. ONLY=tests,attn,rope picks steps (default tests,attn; build always runs).
# PYTEST_K (a -k expression) and BENCH_ATTN_ARGS (e.g. '--gpu-runs 128:b') narrow a re-check.
# DRY_RUN=1 runs every step's command on this CPU machine with tiny sizes (fp32, the Triton interpreter), writing
# only under build/gpu_check_dry: it checks the script, not the GPU.
# Exit status: 0 when every step passed, else 1 (the logs say which).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
  OUTDIR=${OUT:-build/gpu_check_dry}
  export TRITON_INTERPRET=1 LENGEN_RESULTS=$OUTDIR/results_dry.csv
  TABLE=$OUTDIR/dispatch_table.json
else
  OUTDIR=${OUT:-build/gpu_check}
  TABLE=lengen_fast/attention/dispatch_table.json
fi
LOGS=$OUTDIR/gpu_check_logs
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton_cache}
export LENGEN_AUTOTUNE_CACHE=$LOGS/autotune.json
RESULTS=${LENGEN_RESULTS:-bench/results.csv}
export LENGEN_RESULTS=$RESULTS   # where lengen_fast.bench.common appends its rows
start_rows=$( [ -f "$RESULTS" ] && wc -l < "$RESULTS" || echo 0 )
status=0
T0=$SECONDS

step() {  # step NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (at $((SECONDS - T0)) s): $*" | tee -a "$LOGS/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$LOGS/$name.log"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOGS/summary.txt"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# ---- 0. the cuDNN frontend wheel for this Python (carried: the GPU machine has no network)
PYTAG=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEEL=$(ls .gpu_wheels/nvidia_cudnn_frontend-*-"$PYTAG"-"$PYTAG"-*.whl 2>/dev/null | head -n 1)
echo "python tag: $PYTAG; cuDNN frontend wheel: ${WHEEL:-none in .gpu_wheels/ (run scripts/fetch_gpu_wheels.sh)}" \
  | tee -a "$LOGS/summary.txt"
if [ -n "$WHEEL" ]; then
  SITE=$PWD/build/gpu_site
  step wheel 120 python -m pip install --no-deps --no-index --no-compile --upgrade --target "$SITE" "$WHEEL" \
    && export PYTHONPATH="$PYTHONPATH:$SITE"
fi

# ---- 1. build
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true
if [ "$DRY" = 1 ]; then
  step build "${STEP_TIMEOUT_BUILD:-300}" env LENGEN_CUDA=OFF bash scripts/dev_build.sh
else
  step build "${STEP_TIMEOUT_BUILD:-150}" env LENGEN_CUDA=AUTO bash scripts/dev_build.sh \
    || step build_without_cuda_ext 150 env LENGEN_CUDA=OFF bash scripts/dev_build.sh \
    || step build_pip 300 python -m pip install --no-build-isolation --no-deps -e .
fi
step describe 120 python -c "import json, lengen_fast; print(json.dumps(lengen_fast.backends.describe(), indent=1))"
cat "$LOGS/describe.log" 2>/dev/null | head -n 40

ONLY=${ONLY:-tests,attn}
want() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---- 2. GPU tests (pytest-xdist, when installed, runs them in parallel: Triton compiles dominate their time)
par=(); python -c "import xdist" 2>/dev/null && par=(-n "${PYTEST_WORKERS:-8}")
tmo=(); python -c "import pytest_timeout" 2>/dev/null && tmo=(--timeout "${PYTEST_TIMEOUT:-150}")
if want tests; then
  if [ "$DRY" = 1 ]; then   # on CPU every gpu test skips: this checks that they collect and that the marker works
    step pytest_gpu "${STEP_TIMEOUT_TESTS:-300}" python -m pytest -m gpu python_tests -q -rs -p no:cacheprovider \
      ${PYTEST_K:+-k "$PYTEST_K"}
  else
    step pytest_gpu "${STEP_TIMEOUT_TESTS:-170}" python -m pytest -m gpu python_tests -q -rfEx \
      -p no:cacheprovider "${par[@]}" "${tmo[@]}" ${PYTEST_K:+-k "$PYTEST_K"}
  fi
fi

# ---- 3. the attention peer benchmark and the dispatch table
if want attn; then
  if [ "$DRY" = 1 ]; then
    step bench_attention "${STEP_TIMEOUT_ATTN:-600}" python -m lengen_fast.bench.bench_attention --peer-dry-run \
      --gpu-runs "${DRY_RUNS:-64:b,64:c}" --flex-runs "" --write-table "$TABLE" \
      --crosscheck "$LOGS/crosscheck.json" ${BENCH_ATTN_ARGS:-}
  else
    # FlexAttention compiles per config: timed on the hdim-128 runs only, to fit the budget
    step bench_attention "${STEP_TIMEOUT_ATTN:-230}" python -m lengen_fast.bench.bench_attention --gpu-only \
      --flex-runs "${FLEX_RUNS:-128:a,128:b,128:c}" --write-table "$TABLE" --crosscheck "$LOGS/crosscheck.json" \
      ${BENCH_ATTN_ARGS:-}
  fi
  [ -f "$TABLE" ] && cp "$TABLE" "$LOGS/dispatch_table.json"
fi
if want rope; then
  step bench_rope "${STEP_TIMEOUT_ROPE:-90}" env LENGEN_BENCH_QUICK="$DRY" python -m lengen_fast.bench.bench_rope
fi

# ---- 5. results
if [ -f "$RESULTS" ]; then
  { head -n 1 "$RESULTS"; tail -n +"$((start_rows + 1))" "$RESULTS" | grep -v '^date,'; } > "$LOGS/results_gpu.csv"
  echo "new results rows: $(( $(wc -l < "$LOGS/results_gpu.csv") - 1 )) -> $LOGS/results_gpu.csv"
fi
echo "total: $((SECONDS - T0)) s" | tee -a "$LOGS/summary.txt"
cat "$LOGS/summary.txt"
exit "$status"
