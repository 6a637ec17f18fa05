#!/usr/bin/env bash
# Development build: compiles lengen_fast/_C (and _cuda when LENGEN_CUDA=AUTO/ON and nvcc exists)
# straight into the source tree, so `PYTHONPATH=. pytest` works without reinstalling.
# Usage: bash scripts/dev_build.sh            (CPU only, fast)
#        LENGEN_CUDA=AUTO bash scripts/dev_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B build/dev "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DLENGEN_INPLACE=ON \
  -DLENGEN_CUDA="${LENGEN_CUDA:-OFF}" -DPython_EXECUTABLE="$(command -v $PY)" \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >/dev/null
cmake --build build/dev -j"${JOBS:-2}"
