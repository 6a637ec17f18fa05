"""Data pipeline benchmarks: decomposition, BFD packing, batch assembly from a memory-mapped file.

Each provider of one table runs in the same process, one after another, and the tables print
ratios to our implementation. Rows go to --out DIR/results.csv (see common.py). The note column carries the
process CPU seconds and the 1-minute load average, because the 2-core CI machine is shared:
wall-clock times there depend on the neighbours, CPU seconds much less.

    python -m lengen_fast.bench.bench_data --out DIR            # full sizes (10M documents)
    python -m lengen_fast.bench.bench_data decompose --out DIR  # one section (decompose, bfd, gather)
    python -m lengen_fast.bench.bench_data --quick --out DIR    # small sizes
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lengen_fast import backends
from lengen_fast.bench.common import (Timing, add_common_args, apply_common_args, measure, print_table,
                                      proc_status_mib, quick, record)
from lengen_fast.data import (LoaderConfig, PackedLoader, concat_chunk, decompose, decompose_numpy, decompose_ref,
                              open_tokens, pack_bfd, pack_bfd_ref, pack_first_fit_ref, synthetic_lengths,
                              synthetic_table, write_arrow)

QUICK = quick()


def _load() -> str:
    return f"load1={os.getloadavg()[0]:.1f}"


def timed(fn, reps, warmup=1):
    """measure() plus the process CPU seconds per call (median wall, mean CPU)."""
    c0 = time.process_time()
    t = measure(fn, warmup=warmup, reps=reps)
    cpu = (time.process_time() - c0) / (warmup + len(t.times_ms))
    return t, cpu


def _decompose_other_isas(lengths, cfg) -> list[dict]:
    """The same call on every slower instruction-set path this CPU has (LENGEN_CPU_ISA), down to the portable one
    that a CPU without AVX2 runs: what the run-time dispatch buys here."""
    ext = backends.cpu_ext()
    levels = ["portable", "avx2", "avx512"]
    best = ext.cpu_isa()
    rows = []
    saved = os.environ.get("LENGEN_CPU_ISA")
    try:
        for level in levels[:levels.index(best)]:
            os.environ["LENGEN_CPU_ISA"] = level
            t, cpu = timed(lambda: decompose(lengths, 256, 8192, backend="cpu"), reps=15, warmup=2)
            rows.append(record("decompose", cfg, f"lengen C++ ({level}, threads)", t,
                               throughput=len(lengths) / t.median_ms / 1e3, unit="Mdocs/s",
                               note=f"LENGEN_CPU_ISA={level}; cpu_s={cpu:.3f} threads={ext.num_threads()} {_load()}"))
    finally:
        if saved is None:
            os.environ.pop("LENGEN_CPU_ISA", None)
        else:
            os.environ["LENGEN_CPU_ISA"] = saved
    return rows


def bench_decompose():
    n = 200_000 if QUICK else 10_000_000
    sub = 20_000 if QUICK else 200_000
    lengths = synthetic_lengths(n, "lognormal", seed=0, mean=1000, sigma=1.2)
    cfg = {"n_docs": n, "dist": "lognormal(mean=1000, sigma=1.2)", "min_len": 256, "max_len": 8192}
    rows = []
    ours = None
    if backends.cpu_ext() is not None:
        ours = f"lengen C++ ({backends.cpu_ext().cpu_isa()}, threads)"  # the instruction set chosen at run time
        # The first call is timed on its own: its 85 MB of output pages are new to the process. On the
        # CI VM new pages are backed lazily by the host, which costs up to 4x the steady state for the
        # first few calls, so 4 more warm-up calls precede the 15 timed ones.
        t0 = time.perf_counter()
        decompose(lengths, 256, 8192, backend="cpu")
        first_ms = (time.perf_counter() - t0) * 1e3
        t, cpu = timed(lambda: decompose(lengths, 256, 8192, backend="cpu"), reps=15, warmup=4)
        rows.append(record("decompose", cfg, ours, t, throughput=n / t.median_ms / 1e3,
                           unit="Mdocs/s", note=f"first call {first_ms:.1f} ms; cpu_s={cpu:.3f} "
                                            f"threads={backends.cpu_ext().num_threads()} {_load()}"))
        rows += _decompose_other_isas(lengths, cfg)
    t, cpu = timed(lambda: decompose_numpy(lengths, 256, 8192), reps=5, warmup=2)
    rows.append(record("decompose", cfg, "numpy vectorized", t, throughput=n / t.median_ms / 1e3, unit="Mdocs/s",
                       note=f"cpu_s={cpu:.3f} {_load()}"))
    small = lengths[:sub]
    t, cpu = timed(lambda: decompose_ref(small, 256, 8192), reps=5, warmup=1)
    scale = n / sub
    t.median_ms *= scale
    t.p20_ms *= scale
    t.p80_ms *= scale
    rows.append(record("decompose", cfg, "python loop (DD paper algorithm)", t, throughput=n / t.median_ms / 1e3,
                       unit="Mdocs/s", note=f"timed on the first {sub:,} docs and scaled x{scale:.0f}; "
                                            f"cpu_s={cpu * scale:.2f} (scaled) {_load()}"))
    print(f"\ndecompose {n:,} lognormal lengths (256..8192)")
    print_table(rows, baseline=ours)
    return rows


def bench_bfd():
    n = 200_000 if QUICK else 10_000_000
    sub = 3_000 if QUICK else 10_000
    cap = 4096
    lengths = synthetic_lengths(n, "lognormal", seed=1, mean=1000, sigma=1.2)
    cfg = {"n_docs": n, "capacity": cap, "dist": "lognormal(mean=1000, sigma=1.2)"}
    rows = []
    if backends.cpu_ext() is not None:
        res = {}
        t, cpu = timed(lambda: res.setdefault("p", pack_bfd(lengths, cap, backend="cpu")), reps=3)
        eff = res["p"].efficiency
        rows.append(record("pack", cfg, "lengen BFD C++ (segment tree)", t, throughput=n / t.median_ms / 1e3,
                           unit="Mdocs/s", note=f"padding={eff['padding_pct']:.3f}% bins={eff['bins']} "
                                                f"cpu_s={cpu:.3f} {_load()}"))
    res = {}
    t, cpu = timed(lambda: res.setdefault("p", concat_chunk(lengths, cap)), reps=3)
    eff = res["p"].efficiency
    rows.append(record("pack", cfg, "concat-chunk (numpy)", t, throughput=n / t.median_ms / 1e3, unit="Mdocs/s",
                       note=f"padding={eff['padding_pct']:.3f}% (but documents cut at row ends) cpu_s={cpu:.3f} "
                            f"{_load()}"))
    print(f"\npacking {n:,} lognormal documents into {cap}-token bins")
    print_table(rows, baseline="lengen BFD C++ (segment tree)" if backends.cpu_ext() is not None else None)
    # efficiency against first-fit on a subset the O(N * bins) Python packers can handle
    small = lengths[:sub]
    cfg_s = {**cfg, "n_docs": sub}
    srows = []
    for name, fn in (("lengen BFD C++ (segment tree)", lambda: pack_bfd(small, cap)),
                     ("python BFD (linear scan reference)", lambda: pack_bfd_ref(small, cap)),
                     ("python first-fit (document order)", lambda: pack_first_fit_ref(small, cap)),
                     ("concat-chunk (numpy)", lambda: concat_chunk(small, cap))):
        res = {}
        t, cpu = timed(lambda: res.setdefault("p", fn()), reps=1, warmup=0)
        eff = res["p"].efficiency
        srows.append(record("pack", cfg_s, name, t, throughput=sub / t.median_ms / 1e3, unit="Mdocs/s",
                            note=f"padding={eff['padding_pct']:.3f}% bins={eff['bins']} {_load()}"))
    print(f"\npacking efficiency on the first {sub:,} documents (padding % in the note column)")
    print_table(srows, baseline="lengen BFD C++ (segment tree)")
    for r in srows:
        print(f"  {r['provider']:<36} {r['note']}")
    return rows + srows


def _timing(times_s) -> Timing:
    ms = sorted(t * 1e3 for t in times_s)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) >= 2 else [ms[0]] * 9
    return Timing(statistics.median(ms), q[1], q[7], ms)


def bench_gather():
    """Batch assembly (flat ids + labels + positions, int64) from a memory-mapped Arrow IPC file.

    Each step times one batch and then one memcpy, alternating, so both see the same machine load.
    Batch bytes = tokens read (4 B) + ids, labels, positions written (3 x 8 B) = 28 B per token;
    the memcpy moves the same bytes (14 B per token read + 14 B written) between two reused
    buffers, as the loader reuses its output buffers. The batch time includes the loader's
    planning and buffer handling.
    """
    sizes_mb = (16, 64) if QUICK else (256, 1024)
    tpb = 1 << 18 if QUICK else 1 << 20
    reps = 10 if QUICK else 30
    buf = np.ones(tpb * 14, dtype=np.uint8)  # read + write = the batch's 28 B per token
    dst = np.empty_like(buf)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mb in sizes_mb:
            n_tok = mb << 18  # int32 tokens
            lengths = synthetic_lengths(n_tok // 1500, "lognormal", seed=2, mean=1500, sigma=1.0)
            path = write_arrow(synthetic_table(lengths, vocab_size=50000, seed=3), Path(d) / f"tok{mb}.arrow")
            np.copyto(dst, buf)  # touch the memcpy buffers before the RSS baseline
            gc.collect()
            anon0, rss0 = proc_status_mib("RssAnon"), proc_status_mib("VmRSS")
            src = open_tokens(path)
            loader = PackedLoader(src, LoaderConfig(strategy="pack", tokens_per_batch=tpb, max_len=8192, prefetch=0))
            loader.make_batch(0, 0)
            tg, tm = [], []
            for s in range(1, min(reps, len(loader) - 1) + 1):
                t0 = time.perf_counter()
                loader.make_batch(0, s)
                t1 = time.perf_counter()
                np.copyto(dst, buf)
                tm.append(time.perf_counter() - t1)
                tg.append(t1 - t0)
            anon1, rss1 = proc_status_mib("RssAnon"), proc_status_mib("VmRSS")
            t_g, t_m = _timing(tg), _timing(tm)
            memcpy_gbs = 2 * buf.nbytes / t_m.median_ms / 1e6
            gbs = tpb * (4 + 24) / t_g.median_ms / 1e6
            cfg = {"file_mb": mb, "tokens_per_batch": tpb, "max_len": 8192, "strategy": "pack"}
            rows.append(record("gather", cfg, f"memcpy {buf.nbytes >> 20} MiB (numpy copyto)", t_m, throughput=memcpy_gbs, unit="GB/s",
                               note=f"read+write bytes, interleaved with the batches {_load()}"))
            rows.append(record("gather", cfg, "lengen gather C++ (mmap Arrow IPC)", t_g, throughput=gbs, unit="GB/s",
                               ratio_to_peak=gbs / memcpy_gbs,
                               note=f"ratio_to_peak = share of memcpy bandwidth; after open + {len(tg) + 1} batches: "
                                    f"RssAnon +{anon1 - anon0:.1f} MiB, VmRSS +{rss1 - rss0:.1f} MiB (file-backed "
                                    f"page cache mapped by the kernel) for a {mb} MiB file {_load()}"))
            del loader, src
            os.remove(path)
    print(f"\nbatch assembly, {tpb:,} tokens per batch from a memory-mapped Arrow IPC file")
    for r in rows:
        print(f"  {r['provider']:<36} {r['config']}: {r['throughput']} GB/s (median {float(r['median_ms']):.2f} ms)"
              + (f", {float(r['ratio_to_peak']):.2f} of memcpy; {r['note']}" if r["ratio_to_peak"] else ""))
    return rows


SECTIONS = ("decompose", "bfd", "gather")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lengen_fast.bench.bench_data", description=__doc__.splitlines()[0])
    p.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)")
    add_common_args(p)
    args = p.parse_args(argv)
    global QUICK
    QUICK = apply_common_args(args)
    sections = {"decompose": bench_decompose, "bfd": bench_bfd, "gather": bench_gather}
    names = args.sections or list(SECTIONS)
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    print(backends.describe())
    for name in names:
        sections[name]()


if __name__ == "__main__":
    main()
