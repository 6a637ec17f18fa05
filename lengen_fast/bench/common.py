"""Shared benchmark runner: warm-up, median with p20/p80, one CSV row per measurement.

Every bench_<op>.py uses :func:`measure` and :func:`record`. Rows go to the results CSV chosen with
``--out DIR`` (DIR/results.csv; default ./lengen_bench) or $LENGEN_RESULTS, with date, device, versions
and the config as JSON.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DEFAULT_OUT = Path("lengen_bench")  # relative to the working directory: never inside the installed package


def proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status ("RssAnon", "VmRSS") in MiB; NaN where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def results_path() -> Path:
    """The CSV rows go to: $LENGEN_RESULTS (set by ``--out``), else ./lengen_bench/results.csv."""
    return Path(os.environ.get("LENGEN_RESULTS") or DEFAULT_OUT / "results.csv")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """``--out DIR`` and ``--quick``, shared by every bench module and ``lengen-bench``."""
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"write results.csv here (default: $LENGEN_RESULTS's folder, else ./{DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run (also LENGEN_BENCH_QUICK=1)")


def apply_common_args(args: argparse.Namespace) -> bool:
    """Point results_path() at ``--out`` and return whether this is a quick run."""
    if args.out is not None:
        os.environ["LENGEN_RESULTS"] = str(Path(args.out) / "results.csv")
    if args.quick:
        os.environ["LENGEN_BENCH_QUICK"] = "1"
    return quick()


def quick() -> bool:
    return os.environ.get("LENGEN_BENCH_QUICK", "0") == "1"
FIELDS = ["date", "device", "torch", "triton", "lengen", "op", "config", "provider",
          "median_ms", "p20_ms", "p80_ms", "throughput", "unit", "ratio_to_peak", "note"]


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} x{os.cpu_count()}"


def versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = ""
    try:
        from importlib.metadata import version
        lv = version("lengen_fast")
    except Exception:
        lv = "dev"
    return {"torch": torch.__version__, "triton": tv, "lengen": lv}


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    times_ms: list
    # minor page faults per timed call (this process): fresh large outputs can be faulted in on every call,
    # depending on the allocator's state, which doubled one CPU attention backward (notes/attention.md)
    minflt_per_call: float = 0.0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_GPU_WARM: set = set()


def gpu_warmup(device, seconds: float = 1.0) -> None:
    """Keep the GPU busy with bf16 matmuls for ``seconds`` once per process and device: an idle H100 sits at a
    low clock, so the first configs timed after start-up ran slow (RoPE at 16k tokens: 38% of the copy bandwidth)."""
    device = torch.device(device)
    if device.type != "cuda" or device in _GPU_WARM:
        return
    _GPU_WARM.add(device)
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize(device)


def _minflt() -> int:
    """Minor page faults of this process so far (0 where the resource module is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn: Callable[[], object], *, device="cpu", warmup: int = 2, reps: int = 10,
            min_time_s: float = 0.0, max_time_s: float = 30.0) -> Timing:
    """Run fn warmup times, then at least reps times (until min_time_s); return quantiles in ms."""
    gpu_warmup(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    flt0 = _minflt()
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start) < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_time_s and len(times) >= 3:
            break
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    flt = (_minflt() - flt0) / len(times)
    return Timing(statistics.median(times), q[1], q[7], times, flt)


def record(op: str, config: dict, provider: str, t: Timing, *, device="cpu",
           throughput: float | None = None, unit: str = "", ratio_to_peak: float | None = None,
           note: str = "", path: Path | None = None) -> dict:
    """Append one measurement row to results.csv and return it."""
    path = Path(path or results_path())
    row = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": device_name(device),
           **versions(), "op": op, "config": json.dumps(config, sort_keys=True),
           "provider": provider, "median_ms": f"{t.median_ms:.4f}", "p20_ms": f"{t.p20_ms:.4f}",
           "p80_ms": f"{t.p80_ms:.4f}",
           "throughput": "" if throughput is None else f"{throughput:.4g}", "unit": unit,
           "ratio_to_peak": "" if ratio_to_peak is None else f"{ratio_to_peak:.3f}", "note": note}
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    return row


def print_table(rows: list[dict], baseline: str | None = None) -> None:
    """Print rows of one config side by side with the ratio to ``baseline`` (provider name)."""
    base = None
    if baseline is not None:
        for r in rows:
            if r["provider"] == baseline:
                base = float(r["median_ms"])
    print(f"{'provider':<34}{'median ms':>12}{'p20':>10}{'p80':>10}{'throughput':>14}  ratio")
    for r in rows:
        ratio = f"{base / float(r['median_ms']):.2f}x" if base else ""
        tp = f"{r['throughput']} {r['unit']}" if r["throughput"] else ""
        print(f"{r['provider']:<34}{float(r['median_ms']):>12.3f}{float(r['p20_ms']):>10.3f}"
              f"{float(r['p80_ms']):>10.3f} {tp:>13}  {ratio}")
