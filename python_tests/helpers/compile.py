"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU: the interpreter never lowers them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def compile_for_sm90(script: str, timeout: int = 600) -> None:
    """Run ``script`` (it compiles kernels with ``triton.compile(..., target=GPUTarget("cuda", 90, ...))`` and
    prints "compiled") in a fresh process without TRITON_INTERPRET; skip when triton has no NVIDIA backend."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
