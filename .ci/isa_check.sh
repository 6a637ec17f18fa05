#!/usr/bin/env bash
# Evidence that the default (portable) build runs on a CPU without AVX2 / AVX-512:
# builds lengen_fast/_C exactly as the wheel does (Release, LENGEN_NATIVE=OFF) but without the
# strip step, so its local functions keep their names, then lists every function whose code
# touches a ymm (AVX/AVX2) or zmm / mask (AVX-512) register. It fails when one of them is not a
# run-time-dispatched variant (a name ending in _avx2 / _avx512, one in an avx2:: or avx512:: namespace, or a
# helper compiled with the same target attribute), i.e. when an AVX instruction could run on a CPU
# that lacks it.
# Usage: bash .ci/isa_check.sh [BUILD_DIR]    (default build/isa_check; 1-4 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/isa_check}
PY=${PYTHON:-python}
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DLENGEN_CUDA=OFF -DLENGEN_NATIVE=OFF \
  -DCMAKE_STRIP=/bin/true -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >/dev/null
cmake --build "$dir" -j"${JOBS:-2}" >/dev/null
so=$(find "$dir" -name '_C*.so' | head -n 1)
echo "object: $so"
# One line per function that uses wide registers: "<ymm count> <zmm/k count> <name>".
objdump -d --no-show-raw-insn "$so" | c++filt | awk '
  /^[0-9a-f]+ <.*>:$/ { fn = substr($0, index($0, "<")) }
  /%ymm/ { y[fn]++ }
  /%zmm|%k[1-7]/ { z[fn]++ }
  END { for (f in y) all[f] = 1; for (f in z) all[f] = 1;
        for (f in all) printf "%6d %6d %s\n", y[f], z[f], f }' | sort -k3 > "$dir/isa_functions.txt"
printf "%6s %6s %s\n" ymm zmm/k function
cut -c1-180 "$dir/isa_functions.txt"
# Allowed: the dispatched variants and the helpers that carry the same target attribute.
allowed='_avx2\(|_avx512\(|store_first\(|multishift_ctrl\(|add_bit_counts\(|::avx2::|::avx512::'
bad=$(grep -v -E "$allowed" "$dir/isa_functions.txt" || true)
if [ -n "$bad" ]; then
  echo "FAIL: wide-register instructions outside the dispatched variants:"; echo "$bad"; exit 1
fi
echo "OK: every AVX2 / AVX-512 instruction lies in a run-time-dispatched variant"
