#!/usr/bin/env bash
# Download the wheels a lent GPU machine (no network) installs from the working tree: nvidia-cudnn-frontend 1.16.0
# (~2 MB, no dependencies; drives the cuDNN that CUDA torch ships) for CPython 3.10-3.12 into .gpu_wheels/
# (git-ignored; bench/gpu_check.sh picks the one matching the device's Python tag). Later frontend versions pull
# the CuTe DSL (~100 MB), too big for one device call's 64 MiB carry.
# Usage: bash scripts/fetch_gpu_wheels.sh [python versions, default "3.10 3.11 3.12"]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels
for v in ${*:-3.10 3.11 3.12}; do
  python -m pip download --no-deps --only-binary=:all: --python-version "$v" \
    --platform manylinux_2_28_x86_64 -d .gpu_wheels nvidia-cudnn-frontend==1.16.0
done
ls -l .gpu_wheels
