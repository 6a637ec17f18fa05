"""``lengen-bench``: run every benchmark in bench/ (CPU ones, plus GPU ones when a GPU is present)."""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path


def _bench_dir(arg: str | None) -> Path:
    candidates = [Path(arg)] if arg else [Path.cwd() / "bench", Path(__file__).resolve().parent.parent / "bench"]
    for c in candidates:
        if (c / "common.py").exists():
            return c
    raise SystemExit("lengen-bench: cannot find the bench/ folder; run it from a checkout of "
                     "lengen_fast or pass --bench-dir PATH")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lengen-bench", description=__doc__)
    p.add_argument("--bench-dir", default=None)
    p.add_argument("--only", default=None, help="comma-separated ops, e.g. data,rope,attention")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args, rest = p.parse_known_args(argv)
    bench = _bench_dir(args.bench_dir)
    sys.path.insert(0, str(bench))
    scripts = sorted(bench.glob("bench_*.py"))
    if args.only:
        keep = {f"bench_{o.strip()}.py" for o in args.only.split(",")}
        scripts = [s for s in scripts if s.name in keep]
    if args.quick:
        os.environ["LENGEN_BENCH_QUICK"] = "1"
    for s in scripts:
        print(f"\n=== {s.name} ===", flush=True)
        sys.argv = [str(s), *rest]
        runpy.run_path(str(s), run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
