#!/usr/bin/env bash
# Development build: compiles lengen_fast/_C (and _cuda when LENGEN_CUDA=AUTO/ON and nvcc exists)
# straight into the source tree, so `PYTHONPATH=. pytest` works without reinstalling.
# Needs cmake on PATH and pybind11 in the Python that runs it (`pip install ".[test]"` brings pybind11).
# Usage: bash scripts/dev_build.sh            (CPU only, fast)
#        LENGEN_CUDA=AUTO bash scripts/dev_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
command -v cmake >/dev/null || { echo "dev_build.sh: cmake is not on PATH (pip install cmake, or your OS package)" >&2; exit 2; }
pb=$("$PY" -m pybind11 --cmakedir 2>/dev/null) || {
  echo "dev_build.sh: pybind11 is not installed in $(command -v "$PY") (pip install \".[test]\" or pip install pybind11)" >&2
  exit 2; }
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B build/dev "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DLENGEN_INPLACE=ON \
  -DLENGEN_CUDA="${LENGEN_CUDA:-OFF}" -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$pb" >/dev/null
cmake --build build/dev -j"${JOBS:-2}"
