#!/usr/bin/env bash
# Runs the CUDA rope kernel (csrc/rope/rope.cu) on the CPU: each block becomes blockDim std::threads with a
# barrier for __syncthreads (the shim headers here stand in for the CUDA ones), and compares every layout,
# dtype and position mode with the C++ CPU kernel. For machines without a GPU; needs g++ >= 11 (C++20).
# Usage: bash csrc/rope/emu/check.sh      (after bash scripts/dev_build.sh)
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-python}
out=$(mktemp -d)
sed -e 's/\(rope_kernel<[^>]*>\)<<<blocks, threads, smem, stream>>>(\(.*\));/emu_launch(\1, blocks, threads, smem, \2);/' \
    -e 's/extern __shared__ int64_t smem\[\];/int64_t* smem = emu_smem;/' csrc/rope/rope.cu > "$out/rope_emu.cpp"
{ cat csrc/rope/rope_cuda_bind.cpp; echo 'PYBIND11_MODULE(rope_emu, m) { register_rope_cuda(m); }'; } > "$out/bind.cpp"
g++ -O1 -std=c++20 -shared -fPIC -pthread -Icsrc/rope/emu -Icsrc $($PY -m pybind11 --includes) \
    "$out/rope_emu.cpp" "$out/bind.cpp" -o "$out/rope_emu$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
OMP_NUM_THREADS=1 PYTHONPATH=".:$out" $PY csrc/rope/emu/check.py
