"""Does a finished experiment's answer survive a re-run? ``lengen-train replicate DIR``.

It re-runs the experiment recorded in DIR/report.json with a disjoint seed set (by default: as many seeds, all
above the old ones), or with the same seeds and one other thing changed (``--threads``, ``--workers`` or
``--isa``, which sets LENGEN_CPU_ISA for the re-run), then prints the two verdict tables side by side and counts
the verdicts that moved (holds <-> inconclusive, holds <-> opposite, inconclusive <-> opposite) and the point
estimates that fall outside the other run's 95% interval. The comparison is written to OUT/replication.md and
OUT/replication.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ..fsio import atomic_write_text

MOVES = (("holds", "inconclusive"), ("holds", "opposite"), ("inconclusive", "opposite"))


def load_report(path: Path) -> dict:
    """report.json of a finished run, with a clear error naming the file."""
    from .engine import REPORT_VERSION
    f = path / "report.json" if path.is_dir() else path
    if not f.is_file():
        raise ValueError(f"replicate: {str(f)!r} does not exist: give the --out directory of a finished "
                         "lengen-train run (it holds report.json)")
    try:
        rep = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"replicate: {str(f)!r} is not readable JSON: {e}") from None
    if not isinstance(rep, dict) or rep.get("version") != REPORT_VERSION:
        got = rep.get("version") if isinstance(rep, dict) else type(rep).__name__
        raise ValueError(f"replicate: {str(f)!r} is a report of version {got!r}; this lengen_fast writes and reads "
                         f"version {REPORT_VERSION}: re-run the experiment with this version first")
    for key in ("config", "comparisons", "seeds"):
        if key not in rep:
            raise ValueError(f"replicate: {str(f)!r} has no {key!r}: it is not a finished run's report")
    return rep


def compare_reports(a: dict, b: dict) -> dict:
    """Verdicts of every comparison in both reports, side by side, with the counts."""
    ca = {c["key"]: c for c in a["comparisons"]}
    cb = {c["key"]: c for c in b["comparisons"]}
    rows, counts = [], {f"{x} <-> {y}": 0 for x, y in MOVES}
    outside = 0
    both = [k for k in ca if k in cb]
    for k in both:
        x, y = ca[k], cb[k]
        va, vb = x["verdict"], y["verdict"]
        move = next((f"{p} <-> {q}" for p, q in MOVES if {va, vb} == {p, q}), None)
        if move:
            counts[move] += 1
        da, db = x["diff"], y["diff"]
        out = [not math.isnan(d["lo"]) and not math.isnan(e["mean"]) and not d["lo"] <= e["mean"] <= d["hi"]
               for d, e in ((da, db), (db, da))]
        outside += sum(out)
        rows.append({"key": k, "group": x["group"], "a": va, "b": vb, "a_diff": da, "b_diff": db, "moved": move,
                     "outside": out})
    head = [r for r in rows if r["group"] == "headline"]
    return {"rows": rows, "compared": len(both), "moved": counts, "outside_other_interval": outside,
            "headline": {"compared": len(head), "moved": sum(r["moved"] is not None for r in head),
                         "holds_a": sum(r["a"] == "holds" for r in head),
                         "holds_survived": sum(r["a"] == "holds" and r["b"] == "holds" for r in head),
                         "holds_to_opposite": sum({r["a"], r["b"]} == {"holds", "opposite"} for r in head)}}


def markdown(res: dict, a_dir, b_dir, what: str) -> str:
    from .stats import fmt_ci
    h = res["headline"]
    lines = [f"# Replication of {a_dir}\n", f"Re-run: {b_dir} ({what}).\n",
             f"- comparisons in both: {res['compared']} (headline {h['compared']})",
             *[f"- verdicts moved {k}: {v}" for k, v in res["moved"].items()],
             f"- point estimates outside the other run's 95% interval: {res['outside_other_interval']} "
             f"(of {2 * res['compared']} estimates)",
             f"- headline: {h['holds_a']} held in the original, {h['holds_survived']} still hold; {h['moved']} of "
             f"{h['compared']} verdicts moved, {h['holds_to_opposite']} of them between holds and opposite\n",
             "| comparison | metric | checkpoint | original | verdict | re-run | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mark = " ⚠" if r["moved"] else ""
        lines.append(f"| {r['key']}{' (headline)' if r['group'] == 'headline' else ''} | {fmt_ci(r['a_diff'], 3, True)}"
                     f" | {r['a']} | {fmt_ci(r['b_diff'], 3, True)} | {r['b']}{mark} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lengen-train replicate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="the --out directory of a finished lengen-train run (holds report.json)")
    ap.add_argument("--out", default=None, help="where the re-run writes (default: DIR/replicate)")
    ap.add_argument("--seeds", default=None, help="the re-run's seeds, comma-separated (default: as many as the "
                    "original, all above its largest seed: a disjoint set)")
    ap.add_argument("--same-seeds", action="store_true", help="keep the original seeds (to change only --threads, "
                    "--workers or --isa) (default: off)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: the original's)")
    ap.add_argument("--workers", type=int, default=None, help="seed worker processes (default: the original's)")
    ap.add_argument("--isa", default=None, help="LENGEN_CPU_ISA for the re-run: portable, avx2 or avx512 "
                    "(default: unset)")
    ap.add_argument("--no-progress", action="store_true", help="no progress output (default: off)")
    args = ap.parse_args(argv)
    from .cli import plan_printing_warnings, run_plan
    from .config import RunConfig
    try:
        a_dir = Path(args.dir)
        orig = load_report(a_dir)
        cfg = RunConfig.from_dict(orig["config"])
        old = orig["seeds"]["list"]
        changed = []
        if args.seeds:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
            if set(seeds) & set(old) and not args.same_seeds:
                raise ValueError(f"--seeds {seeds} overlap the original seeds {old}: a replication needs a disjoint "
                                 "set (or --same-seeds to change something else)")
        elif args.same_seeds:
            seeds = list(old)
        else:
            seeds = [max(old) + 1 + i for i in range(len(old))]
        if seeds != old:
            changed.append(f"seeds {old} -> {seeds}")
        cfg.train.seeds, cfg.train.seeds_auto = seeds, False
        for name in ("threads", "workers"):
            v = getattr(args, name)
            if v is not None:
                changed.append(f"{name} {getattr(cfg.train, name)} -> {v}")
                setattr(cfg.train, name, v)
        if args.isa:
            os.environ["LENGEN_CPU_ISA"] = args.isa
            changed.append(f"LENGEN_CPU_ISA={args.isa}")
        if not changed:
            raise ValueError("replicate: nothing changes (same seeds, threads, workers and ISA); give a disjoint "
                             "--seeds, or drop --same-seeds")
        cfg.out, cfg.resume = str(Path(args.out) if args.out else a_dir / "replicate"), False
        cfg.progress = not args.no_progress
        plan = plan_printing_warnings(cfg, "lengen-train replicate " + " ".join(argv or sys.argv[1:]),
                                      orig.get("mode", "run"))
        run_plan(plan)
        res = compare_reports(orig, load_report(Path(cfg.out)))
    except (ValueError, TypeError, OSError) as e:
        print(f"lengen-train replicate: error: {e}", file=sys.stderr)
        return 2
    what = "; ".join(changed)
    md = markdown(res, a_dir, cfg.out, what)
    atomic_write_text(Path(cfg.out) / "replication.md", md)
    atomic_write_text(Path(cfg.out) / "replication.json", json.dumps(res | {"changed": changed}, indent=1,
                                                                      default=float))
    print(md)
    return 0
