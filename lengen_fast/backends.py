"""The one place that chooses an implementation per op: cuda, triton, cpu or reference, and for attention also the
installed peers fa2 (torch's FA2) and cudnn (cuDNN through nvidia-cudnn-frontend).

Order of precedence: the ``backend=`` argument (strict: an impossible request raises), then the
``LENGEN_BACKEND`` environment variable (for the ops that implement it and can run it here), then
the op's default order for the tensor's device. No other module branches on
backend; op modules keep a ``{name: impl}`` table and call :func:`select` (attention: :func:`select_attention`).

Attention on CUDA: a call with ``max_seqlen`` hints may go to a peer, chosen per pass (fwd, bwd) from the measured
table ``lengen_fast/attention/dispatch_table.json`` (written by ``bench/gpu_check.sh``; ``$LENGEN_DISPATCH_TABLE``
overrides the path), keyed on device class, dtype, head dim, mask kind and short/long documents. A call without
hints, a key the table does not hold, or a peer that cannot run the call's features goes to ours (Triton), so the
default never syncs the host. A missing table means ours everywhere; a corrupt or stale one warns once and is ignored.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference", "fa2", "cudnn")
PEERS = ("fa2", "cudnn")          # attention only: other kernels we route to (lengen_fast/attention/peers.py)
PEER_DEVICES = ("cuda",)          # device types the peers run on (CPU tests add "cpu" to run stand-ins)

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
    if backend in PEERS:
        return op == "attention" and device.type in PEER_DEVICES and peer_missing(backend) is None
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
        # a peer in the environment is honoured by select_attention, which checks the call's features
        if env in supported and env not in PEERS and available(op, env, device):
            return env
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend={requested!r} is not one of {BACKENDS}")
        if requested not in supported:
            raise ValueError(f"backend={requested!r} is not implemented for op {op!r} "
                             f"(implemented: {supported})")
        if not available(op, requested, device):
            if requested in PEERS:
                raise ValueError(f"backend={requested!r} cannot run {op!r} on device {device.type!r}: "
                                 f"{peer_missing(requested) if device.type in PEER_DEVICES else 'it needs a CUDA tensor'}")
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


def peer_missing(name: str) -> Optional[str]:
    """Why attention peer ``name`` cannot run here (package, build, device), or None (attention/peers.py)."""
    return importlib.import_module("lengen_fast.attention.peers").missing(name)


def peer_unsupported(name: str, call: "AttentionCall", pass_: Optional[str] = None) -> Optional[str]:
    """The feature of ``call`` that peer ``name`` cannot run in ``pass_`` (None: fwd and bwd), or None."""
    return importlib.import_module("lengen_fast.attention.peers").unsupported(name, call, pass_)


# ================================================================================================ attention

SHORT_DOCS_MAX = 64     # the short/long document class of the dispatch table (= triton_sched.SHORT_MAX)


@dataclass(frozen=True)
class AttentionCall:
    """What the dispatch needs to know about one varlen attention call (no tensor data: nothing syncs)."""
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    heads: int
    kv_heads: int
    causal: bool
    window_left: int          # -1 = unbounded
    window_right: int         # -1 = unbounded; 0 when causal
    softcap: float
    deterministic: bool
    max_seqlen_q: Optional[int]
    max_seqlen_k: Optional[int]

    @property
    def mask_kind(self) -> str:
        """causal, causal_window (causal with a left window), full, or window (any other band)."""
        if self.causal:
            return "causal" if self.window_left < 0 else "causal_window"
        return "full" if self.window_left < 0 and self.window_right < 0 else "window"

    @property
    def has_hints(self) -> bool:
        return self.max_seqlen_q is not None and self.max_seqlen_k is not None

    @property
    def docs(self) -> str:
        return "short" if max(self.max_seqlen_q, self.max_seqlen_k) <= SHORT_DOCS_MAX else "long"


def device_class(device: torch.device) -> str:
    """The table's device key: the GPU family named in the device name (H100, H200, A100, ...), else the name."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    for fam in ("GB200", "B200", "H200", "H100", "H800", "H20", "A100", "A800", "L40S", "L4", "A10"):
        if fam in name.replace("-", " ").split() or f" {fam} " in f" {name} ":
            return fam
    return name


DISPATCH_TABLE = Path(__file__).resolve().parent / "attention" / "dispatch_table.json"
TABLE_VERSION = 1
TABLE_ROUTES = ("triton", "fa2", "cudnn")


def table_path() -> Path:
    return Path(os.environ.get("LENGEN_DISPATCH_TABLE") or DISPATCH_TABLE)


def table_key(device_cls: str, dtype: torch.dtype, head_dim: int, mask: str, docs: str, pass_: str) -> str:
    return f"{device_cls}|{str(dtype).removeprefix('torch.')}|{head_dim}|{mask}|{docs}|{pass_}"


def _torch_minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


@functools.lru_cache(maxsize=8)
def _load_table(path: str, mtime: float) -> tuple[dict, str]:
    """({key: route}, status). status: "absent", "ok: N entries", or why the table was ignored (warned once)."""
    p = Path(path)
    if not p.exists():
        return {}, "absent (not measured yet): CUDA attention uses ours (triton)"
    try:
        doc = json.loads(p.read_text())
        if not isinstance(doc, dict) or doc.get("version") != TABLE_VERSION:
            raise ValueError(f"version {doc.get('version') if isinstance(doc, dict) else None!r}, "
                             f"expected {TABLE_VERSION}")
        entries = doc["entries"]
        if not isinstance(entries, dict):
            raise ValueError("'entries' is not an object")
        for key, e in entries.items():
            if len(key.split("|")) != 6 or not isinstance(e, dict) or e.get("best") not in TABLE_ROUTES:
                raise ValueError(f"bad entry {key!r}: {e!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:      # json.JSONDecodeError is a ValueError
        msg = f"corrupt dispatch table {p}: {e}; CUDA attention uses ours (triton)"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return {}, "ignored: " + msg
    written, running = doc.get("torch", ""), _torch_minor(torch.__version__)
    if _torch_minor(written) != running:
        msg = (f"stale dispatch table {p}: measured with torch {written!r}, running {torch.__version__} "
               f"(peer speeds change with torch); CUDA attention uses ours (triton). Re-run bench/gpu_check.sh.")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return {}, "ignored: " + msg
    return {k: e["best"] for k, e in entries.items()}, f"ok: {len(entries)} entries from {p}"


def dispatch_table() -> tuple[dict, str]:
    p = table_path()
    try:
        mtime = p.stat().st_mtime
    except OSError:
        mtime = -1.0
    return _load_table(str(p), mtime)


def build_dispatch_table(measured: list[dict], device_cls: str, path) -> dict:
    """Write the dispatch table from one benchmark run and return it (bench/bench_attention.py --write-table).

    ``measured``: one dict per (layout, pass, route) with dtype, head_dim, mask, docs ("short"/"long"), pass, route,
    median_ms and ok (the route's outputs and gradients passed the cross-check against the reference). Per key the
    best route is the one with the smallest summed time over the key's layouts, among routes that were measured and
    passed on every one of them (a route that fails a check is never chosen). Entries of other device classes in an
    existing valid table with the same torch minor version are kept."""
    groups: dict[str, dict[str, list]] = {}
    for m in measured:
        key = table_key(device_cls, getattr(torch, m["dtype"]) if isinstance(m["dtype"], str) else m["dtype"],
                        m["head_dim"], m["mask"], m["docs"], m["pass"])
        groups.setdefault(key, {}).setdefault(m["route"], []).append(m)
    entries = {}
    for key, by_route in groups.items():
        n_layouts = max(len({m["layout"] for m in ms}) for ms in by_route.values())
        ms = {r: sum(m["median_ms"] for m in v) for r, v in by_route.items()
              if all(m["ok"] for m in v) and len({m["layout"] for m in v}) == n_layouts}
        if ms:
            best = min(ms, key=ms.get)
            entries[key] = {"best": best, "ms": {r: round(t, 4) for r, t in sorted(ms.items())},
                            "layouts": sorted({m["layout"] for v in by_route.values() for m in v})}
    path = Path(path)
    old, status = ({}, "absent") if not path.exists() else _load_table(str(path), path.stat().st_mtime)
    doc = {"version": TABLE_VERSION, "torch": torch.__version__, "written_by": "bench/bench_attention.py --write-table",
           "entries": {}}
    if status.startswith("ok"):
        prev = json.loads(path.read_text())["entries"]
        doc["entries"] = {k: e for k, e in prev.items() if not k.startswith(device_cls + "|")}
    doc["entries"].update(entries)
    doc["entries"] = dict(sorted(doc["entries"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def select_attention(call: AttentionCall, pass_: str, backend: Optional[str] = None,
                     supported: Iterable[str] = BACKENDS) -> str:
    """The route of one attention pass ("fwd" or "bwd"): an explicit ``backend=`` (strict: a peer that is missing or
    cannot run the call's features raises ValueError naming the package or feature), then ``LENGEN_BACKEND``
    (non-strict), then for a CUDA call with max_seqlen hints the measured table, else :func:`select`'s order."""
    supported = tuple(supported)
    if backend in PEERS:
        why = peer_missing(backend) if call.device.type in PEER_DEVICES else None
        why = why or peer_unsupported(backend, call)
        if why is not None:
            raise ValueError(f"backend={backend!r} cannot run this attention call: {why}")
        return backend
    if backend is not None:
        return select("attention", call.device, backend, supported)
    env = os.environ.get("LENGEN_BACKEND") or None
    if env in PEERS:
        if available("attention", env, call.device) and peer_unsupported(env, call, pass_) is None:
            return env
        env = None
    if env is None and call.device.type in PEER_DEVICES and call.has_hints:
        table, _ = dispatch_table()
        route = table.get(table_key(device_class(call.device), call.dtype, call.head_dim, call.mask_kind, call.docs,
                                    pass_))
        if route in PEERS and available("attention", route, call.device) \
                and peer_unsupported(route, call, pass_) is None:
            return route
        if route == "triton" and "triton" in supported and available("attention", "triton", call.device):
            return route
    return select("attention", call.device, None, supported)


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
        "attention_peers": {name: peer_missing(name) or "available" for name in PEERS},
        "attention_dispatch_table": dispatch_table()[1],
    }
