"""How did this run run? The facts a report needs so that two runs can be told apart.

:func:`collect` returns a JSON-ready dict: processes (world size, rank, process-group backend, parallel mode,
launcher), devices (name and count), dtype, the backend each op chose (``lengen_fast.backends``), the versions
of python / torch / triton / transformers / lengen_fast, the exact command line, and the git revision of the
lengen_fast checkout when the package runs from one. :func:`render_header` turns it into the Markdown block that
opens report.md; report.json stores the dict under one key (e.g. ``"run"``).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

OPS = ("attention", "rope", "data")
# peak dense bf16 tensor FLOP/s by GPU name, for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}  # the ops whose backend backends.select() chooses per device


def _version(dist_name: str) -> str | None:
    """The installed version of ``dist_name``, or None when it is not installed."""
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import lengen_fast
    out = {"python": platform.python_version(), "torch": torch.__version__, "lengen_fast": lengen_fast.__version__}
    for name in ("triton", "transformers"):
        out[name] = _version(name)
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def devices(device: str | torch.device) -> dict:
    """Name and count of the devices of ``device``'s type that this process can see (CPU: the CPU model, 1)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "count": torch.cuda.device_count(),
                "index": index}
    return {"type": device.type, "name": cpu_name() if device.type == "cpu" else device.type, "count": 1,
            "cpu_threads": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def processes(parallel: str | None = None) -> dict:
    """World size, rank and process group of this process (1 process when no group is initialized).

    ``parallel``: the data-parallel mode the caller wraps the model with ("ddp", "fsdp"); None asks
    lengen_fast.train.distributed, and is "none" for one process.
    """
    import torch.distributed as dist
    group = dist.is_available() and dist.is_initialized()
    if group:
        world, rank, backend = dist.get_world_size(), dist.get_rank(), str(dist.get_backend())
    else:
        world, rank, backend = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), ""
    if parallel is None:
        parallel = "none"
        if world > 1:
            try:
                from lengen_fast.train import distributed
                parallel = distributed.context().parallel
            except (ImportError, AttributeError):
                parallel = "unknown"
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else ("env" if "WORLD_SIZE" in os.environ else "")
    return {"world_size": world, "rank": rank, "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
            "process_group": backend, "parallel": parallel if world > 1 else "none", "launcher": launcher}


def chosen_backends(device: str | torch.device, requested: dict | None = None) -> dict:
    """{op: backend} as lengen_fast.backends.select() resolves it for ``device`` (honouring LENGEN_BACKEND and
    ``requested[op]``, e.g. the run's ``--attention-backend``), plus the CPU instruction set of the data kernels."""
    from lengen_fast import backends
    device = torch.device(device)
    requested = requested or {}
    out = {}
    for op in OPS:
        # an op implements the backends its default orders name, plus the reference
        supported = {b for order in backends.DEFAULT_ORDER.get(op, {}).values() for b in order} | {"reference"}
        dev = device if op != "data" else torch.device("cpu")  # the data pipeline runs on the host
        try:
            out[op] = backends.select(op, dev, requested.get(op), supported=sorted(supported))
        except ValueError as e:
            out[op] = f"error: {e}"
    ext = backends.cpu_ext()
    out["cpu_isa"] = ext.cpu_isa() if ext is not None and hasattr(ext, "cpu_isa") else None
    return out


def command_line() -> str:
    """The interpreter's own argv (python -m ... / a console script), shell-quoted so it can be pasted."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def git_revision() -> dict | None:
    """{"commit", "dirty"} of the lengen_fast checkout this package was imported from; None for an install."""
    import lengen_fast
    root = Path(lengen_fast.__file__).resolve().parent.parent
    if not (root / ".git").exists():  # a directory, or a file in a git worktree
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def collect(*, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
            parallel: str | None = None, requested_backends: dict | None = None) -> dict:
    """Everything above, as one JSON-ready dict (call it on every rank; rank 0 writes the report)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return {
        "started_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": command_line(),
        "processes": processes(parallel),
        "device": devices(device),
        "dtype": dtype,
        "backends": chosen_backends(device, requested_backends),
        "versions": versions(),
        "git": git_revision(),
        "host": platform.node(),
    }


def render_header(info: dict) -> str:
    """The Markdown block that opens report.md: one line per fact, in the order a reader checks them."""
    p, d, b, v, g = info["processes"], info["device"], info["backends"], info["versions"], info["git"]
    procs = f"{p['world_size']} process{'es' if p['world_size'] != 1 else ''}"
    if p["world_size"] > 1:
        procs += f" ({p['parallel']}, {p['process_group'] or 'no process group'}"
        procs += f", launched by {p['launcher']})" if p["launcher"] else ")"
    dev = f"{d['count']} x {d['name']}" if d["type"] == "cuda" else f"{d['name']} ({d.get('torch_threads')} torch threads)"
    ops = ", ".join(f"{op}: {b[op]}" for op in OPS if op in b)
    if b.get("cpu_isa"):
        ops += f" (C++ data kernels: {b['cpu_isa']})"
    vers = ", ".join(f"{k} {v[k]}" for k in ("lengen_fast", "torch", "triton", "transformers", "python") if v.get(k))
    missing = [k for k in ("triton", "transformers") if not v.get(k)]
    if missing:
        vers += f" ({', '.join(missing)} not installed)"
    rev = "not a git checkout (installed package)" if g is None else \
        f"`{g['commit'][:12]}`" + (" with uncommitted changes" if g["dirty"] else "")
    lines = [
        "## How this ran",
        "",
        f"- command: `{' '.join(info['command'].split())}`",  # one line (report.json keeps it exact)
        f"- processes: {procs}",
        f"- device: {dev}",
        f"- dtype: {info['dtype'] or 'n/a'}",
        f"- backends: {ops}",
        f"- versions: {vers}",
        f"- lengen_fast revision: {rev}",
        f"- started: {info['started_utc']} UTC on {info['host']}",
        "",
    ]
    return "\n".join(lines)
