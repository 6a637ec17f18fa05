"""Render a results.csv as PNGs: one bar chart per (device, op, config) group.

Each chart shows the latest row of every provider in the group, as throughput when the rows
carry one (same unit), else as median time with p20/p80 whiskers.

    python -m lengen_fast.bench.plot [--results lengen_bench/results.csv] [--out RESULTS_DIR/plots] [--op data]
    python -m lengen_fast.bench.plot --results bench/results.csv --out bench/plots   (the published figures)
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lengen_fast.bench.common import results_path  # noqa: E402


def load(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def groups(rows: list[dict], op: str | None = None) -> dict:
    """{(device, op, config): {provider: latest row}} (later rows replace earlier ones)."""
    out: dict = {}
    for r in rows:
        if op and r["op"] != op:
            continue
        out.setdefault((r["device"], r["op"], r["config"]), {})[r["provider"]] = r
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40]


def plot_group(key, provs: dict, out_dir: Path) -> Path:
    device, op, config = key
    rows = list(provs.values())
    units = {r["unit"] for r in rows if r["throughput"]}
    use_tp = len(units) == 1 and all(r["throughput"] for r in rows)
    names = [r["provider"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.6))
    if use_tp:
        vals = [float(r["throughput"]) for r in rows]
        ax.barh(names, vals, color="tab:blue")
        ax.set_xlabel(f"throughput ({units.pop()}), higher is better")
    else:
        med = [float(r["median_ms"]) for r in rows]
        lo = [m - float(r["p20_ms"]) for m, r in zip(med, rows)]
        hi = [float(r["p80_ms"]) - m for m, r in zip(med, rows)]
        ax.barh(names, med, xerr=[lo, hi], color="tab:orange", capsize=3)
        ax.set_xlabel("median ms (p20-p80), lower is better")
        if max(med) / max(min(med), 1e-9) > 100:
            ax.set_xscale("log")
    if use_tp and max(vals) / max(min(vals), 1e-12) > 100:
        ax.set_xscale("log")
    ax.invert_yaxis()
    cfg = json.loads(config) if config.startswith("{") else {}
    cfg_txt = ", ".join(f"{k}={v}" for k, v in cfg.items())
    ax.set_title(f"{op}: {cfg_txt}\n{device} ({rows[0]['date']})", fontsize=9)
    fig.tight_layout()
    h = hashlib.blake2b(f"{device}|{config}".encode(), digest_size=4).hexdigest()
    path = out_dir / f"{op}_{_slug(cfg_txt)}_{h}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lengen_fast.bench.plot", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(results_path()), help="the CSV to plot (default: %(default)s)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: plots/ next to the CSV)")
    p.add_argument("--op", default=None, help="only this op")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.results).parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    for key, provs in groups(load(Path(args.results)), args.op).items():
        print(plot_group(key, provs, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
