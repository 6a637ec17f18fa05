"""The one place that chooses an implementation per op: cuda, triton, cpu or reference.

Order of precedence: the ``backend=`` argument (strict: an impossible request raises), then the
``LENGEN_BACKEND`` environment variable (for the ops that implement it and can run it here), then
the op's default order for the tensor's device. No other module branches on
backend; op modules keep a ``{name: impl}`` table and call :func:`select`.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Iterable

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Default preference per op and device type. The first available wins. Benchmarks decide
# these orders (bench/results.csv); change them here and nowhere else.
DEFAULT_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "rope": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    # attention has no CUDA C++ kernel (yet): a real peer joins the order here and the op's _FWD/_BWD tables
    "attention": {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")},
    "data": {"cpu": ("cpu", "reference")},
}

# dtype codes shared with csrc/common/checks.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@functools.lru_cache(maxsize=None)
def cpu_ext():
    """lengen_fast._C, or None when the extension was not built."""
    try:
        return importlib.import_module("lengen_fast._C")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def cuda_ext():
    """lengen_fast._cuda, or None when it was not built (no nvcc at build time)."""
    try:
        return importlib.import_module("lengen_fast._cuda")
    except ImportError:
        return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _ext_has(ext, op: str) -> bool:
    return ext is not None and any(n.startswith(op) for n in dir(ext))


def available(op: str, backend: str, device: torch.device) -> bool:
    """Can ``backend`` run ``op`` on ``device`` in this process?"""
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and _ext_has(cpu_ext(), op)
    if backend == "cuda":
        return device.type == "cuda" and _ext_has(cuda_ext(), op)
    if backend == "triton":
        if not has_triton():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    return False


def select(op: str, device: torch.device, backend: str | None = None,
           supported: Iterable[str] | None = None) -> str:
    """Return the backend name to run ``op`` on ``device``.

    ``supported`` lists the backends the op implements (its table's keys). An explicit request
    (argument or LENGEN_BACKEND) that cannot run raises ValueError naming the reason.
    """
    supported = tuple(supported) if supported is not None else BACKENDS
    requested = backend
    env = os.environ.get("LENGEN_BACKEND") or None
    if requested is None and env is not None:
        if env not in BACKENDS:
            raise ValueError(f"LENGEN_BACKEND={env!r} is not one of {BACKENDS}")
        # the environment applies to every op that can honour it (LENGEN_BACKEND=triton must not
        # break the data loader, which has no Triton path); an explicit backend= is strict
        if env in supported and available(op, env, device):
            return env
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend={requested!r} is not one of {BACKENDS}")
        if requested not in supported:
            raise ValueError(f"backend={requested!r} is not implemented for op {op!r} "
                             f"(implemented: {supported})")
        if not available(op, requested, device):
            why = {
                "cpu": "needs a CPU tensor and the compiled lengen_fast._C extension",
                "cuda": "needs a CUDA tensor and the compiled lengen_fast._cuda extension",
                "triton": "needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)",
            }.get(requested, "")
            raise ValueError(f"backend={requested!r} cannot run {op!r} on device "
                             f"{device.type!r}: it {why}")
        return requested
    order = DEFAULT_ORDER.get(op, {}).get(device.type, ("reference",))
    for name in order:
        if name in supported and available(op, name, device):
            return name
    return "reference"


def describe() -> dict:
    """What this install can run (printed by ``lengen-bench`` and the data demo)."""
    return {
        "torch": torch.__version__,
        "cpu_ext": cpu_ext() is not None,
        "cuda_ext": cuda_ext() is not None,
        "triton": has_triton(),
        "cuda_available": torch.cuda.is_available(),
        "omp_threads": cpu_ext().num_threads() if cpu_ext() is not None else None,
        # the instruction set the C++ data kernels chose at run time (LENGEN_CPU_ISA forces one)
        "cpu_isa": cpu_ext().cpu_isa() if cpu_ext() is not None else None,
    }
