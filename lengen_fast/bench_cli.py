"""``lengen-bench``: run every benchmark of the installed package (lengen_fast.bench) and plot the results.

CPU benchmarks always run; the GPU ones too when a CUDA GPU is present. Rows go to DIR/results.csv and one
PNG per (device, op, config) to DIR/plots, where DIR is ``--out`` (default ./lengen_bench). Works from any
folder: the suite ships inside the wheel.

    lengen-bench --out /tmp/bench --quick          # smoke run: small sizes, the slowest peers left out
    lengen-bench --out DIR --only data,rope        # a subset of ops
    python -m lengen_fast.bench.bench_attention --gpu-only --out DIR   # one op with its own options
"""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

OPS = ("attention", "data", "rope", "lm")  # one module per op: lengen_fast.bench.bench_<op> (lm: a training step)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lengen-bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--out", default="lengen_bench", metavar="DIR",
                   help="folder for results.csv and plots/ (default: ./lengen_bench)")
    p.add_argument("--only", default=None, help=f"comma-separated ops, any of {','.join(OPS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = p.parse_args(argv)
    ops = list(OPS) if args.only is None else [o.strip() for o in args.only.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        p.error(f"--only: unknown ops {unknown}; choose from {list(OPS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Before the bench modules are imported: they read these at import time too.
    os.environ["LENGEN_RESULTS"] = str(out / "results.csv")
    if args.quick:
        os.environ["LENGEN_BENCH_QUICK"] = "1"
    common_args = ["--out", str(out)] + (["--quick"] if args.quick else [])
    for op in ops:
        print(f"\n=== lengen_fast.bench.bench_{op} ===", flush=True)
        importlib.import_module(f"lengen_fast.bench.bench_{op}").main(common_args)
    results = out / "results.csv"
    print(f"\nresults: {results}")
    if not args.no_plots and results.exists():
        from lengen_fast.bench import plot
        plot.main(["--results", str(results), "--out", str(out / "plots")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
