"""LM training-step throughput per arm (the corpus workload's knobs), interleaved step by step in one run.

Each arm is a real engine Run (lengen_fast.train.trainer.Run) on seed 0's training subset of the embedded corpus,
and one timed step is ``Run.train_step()``: the step lengen-train runs (forward, chunked loss, backward, AdamW,
accounting), nothing re-implemented here. Arms take turns step by step, so machine-load swings hit every arm
alike; medians per arm of wall time and of the main thread's CPU seconds (one torch thread, so that is the
compute; it is what a shared 2-core machine leaves least noisy). Rows go to bench/results.csv (op "lm_step"), with
supervised tokens/s in the throughput column and the CPU-second figures in the note.

    python -m lengen_fast.bench.bench_lm --out bench      # the lm_cpu preset's model, L=2048, 6 steps per arm
    python -m lengen_fast.bench.bench_lm --steps 3 --context 1024
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch

from lengen_fast.bench.common import Timing, add_common_args, apply_common_args, print_table, record


def make_runs(preset: str, context: int, arms: list[str], out: str):
    """(plan, [Run]) for ``arms`` of the corpus workload under ``preset`` (lengen-train lm's)."""
    from lengen_fast.train.cli import config_from_args
    from lengen_fast.train.engine import workload
    from lengen_fast.train.plan import make_plan
    from lengen_fast.train.trainer import Run
    argv = ["lm", "--preset", preset, "--arms", ",".join(arms), "--seeds", "1", "--no-extend", "--out", out,
            "--no-progress"] + (["--context", str(context)] if context else [])
    _, cfg = config_from_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # one seed: no interval (nothing is compared here)
        plan = make_plan(cfg, "bench_lm", "run")
    W = workload(plan)
    runs = [Run(plan, arm, 0, W.source(0, arm), os.path.join(out, arm.name), budget=plan.budget,
                seq_len=plan.seq_len, lr=cfg.train.lr, validate=W.validator(0),
                cycles=cfg.corpus.subset_factor) for arm in plan.arms]
    return plan, runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="lm_cpu")
    p.add_argument("--context", type=int, default=0, help="0 = the preset's")
    p.add_argument("--steps", type=int, default=6, help="timed steps per arm (after one warm-up step)")
    p.add_argument("--arms", default="concat,concat_docmask,dd_natural,dd_grow_p2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-record", action="store_true")
    add_common_args(p)
    a = p.parse_args(argv)
    if apply_common_args(a):  # smoke run: the tests' tiny model and corpus unless a preset was named
        a.steps = min(a.steps, 2)
        if a.preset == "lm_cpu":
            a.preset = "lm_tiny"
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        plan, runs = make_runs(a.preset, a.context, a.arms.split(","), tmp)
        stats = {r.label: {"wall": [], "cpu": [], "sup": []} for r in runs}

        def step(r):
            before = r.acct["supervised"]
            t0, c0 = time.perf_counter(), time.thread_time()
            r.train_step()
            return time.perf_counter() - t0, time.thread_time() - c0, r.acct["supervised"] - before

        for r in runs:  # warm-up
            step(r)
        load0 = os.getloadavg()[0]
        for _ in range(a.steps):
            for r in runs:
                w, c, n = step(r)
                for k, v in zip(("wall", "cpu", "sup"), (w, c, n)):
                    stats[r.label][k].append(v)
        load1 = os.getloadavg()[0]
    m, tr = plan.cfg.model, plan.cfg.train
    config = {"L": plan.seq_len, "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
              "tokens_per_batch": tr.tokens_per_batch, "corpus": plan.derived["corpus"], "threads": a.threads,
              "steps": a.steps, "preset": a.preset}
    rows = []
    for r in runs:
        s = stats[r.label]
        wall_ms = [x * 1e3 for x in s["wall"]]
        q = statistics.quantiles(wall_ms, n=10) if len(wall_ms) >= 2 else [wall_ms[0]] * 9
        t = Timing(statistics.median(wall_ms), q[1], q[7], wall_ms)
        sup = statistics.mean(s["sup"])
        cpu_med = statistics.median(s["cpu"])
        note = (f"cpu_s_median={cpu_med:.2f} sup_tok_per_cpu_s={sup / cpu_med:.1f} load1={load0:.1f}->{load1:.1f} "
                f"knobs={r.arm.knobs()}")
        rows.append({"provider": r.label, "median_ms": f"{t.median_ms:.1f}", "p20_ms": f"{t.p20_ms:.1f}",
                     "p80_ms": f"{t.p80_ms:.1f}", "throughput": f"{sup / (t.median_ms / 1e3):.1f}",
                     "unit": "sup tok/s", "cpu": cpu_med, "sup": sup})
        if not a.no_record:
            record("lm_step", config, r.label, t, throughput=sup / (t.median_ms / 1e3), unit="sup tok/s", note=note)
    print(f"L={plan.seq_len}, {a.steps} steps per arm interleaved (engine Run.train_step), load {load0:.1f} -> "
          f"{load1:.1f}")
    base = "concat" if any(r["provider"] == "concat" for r in rows) else None
    print_table(rows, baseline=base)
    b = next((r for r in rows if r["provider"] == base), None)
    if b:
        for r in rows:
            print(f"{r['provider']:<20} supervised tok per CPU-s {r['sup'] / r['cpu']:8.1f}   ratio to concat "
                  f"{(r['sup'] / r['cpu']) / (b['sup'] / b['cpu']):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
