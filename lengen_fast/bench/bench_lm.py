"""LM training-step throughput per arm (lengen-train lm's knobs), interleaved step by step in one run.

One optimizer step (forward, chunked loss, backward, AdamW) per arm in turn, on real batches of the
embedded corpus at context L, so machine-load swings hit every arm alike; medians per arm of wall
time and of the main thread's CPU seconds (one torch thread, so that is the compute; it is what a
shared 2-core machine leaves least noisy). Rows go to bench/results.csv (op "lm_step"), with
supervised tokens/s in the throughput column and the CPU-second figures in the note.

    python -m lengen_fast.bench.bench_lm --out bench      # CPU default model, L=2048, 6 steps per arm
    python -m lengen_fast.bench.bench_lm --steps 3 --context 1024
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from lengen_fast.bench.common import Timing, add_common_args, apply_common_args, print_table, record
from lengen_fast.train import lm
from lengen_fast.train.distributed import context
from lengen_fast.train.model import Transformer


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
    cfg = lm.LMConfig()
    lm.apply_overrides(cfg, lm.load_preset(a.preset))
    tr = cfg.train
    L = a.context or tr.context
    corpus = lm.load_corpus(cfg.data)
    sub = lm.training_subset(corpus.train, tr.budget_tokens * tr.subset_factor, 0)
    arms = [lm.parse_arm(x) for x in a.arms.split(",")]
    state = []
    for arm in arms:
        torch.manual_seed(0)
        model = Transformer(cfg.model, corpus.vocab_size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = lm.make_loader(sub, arm, tr, L, tr.tokens_per_batch, 0, context(), False)
        state.append({"arm": arm, "model": model, "opt": opt, "it": iter(loader), "wall": [], "cpu": [], "sup": []})

    def step(s):
        b = next(s["it"])
        tok, cu, ms, pos, lab = lm.arm_inputs(b, s["arm"])
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = s["model"](tok, cu, ms, pos, labels=lab, loss_chunk=tr.loss_chunk)
        (loss / max(1, int((lab != -100).sum()))).backward()
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.thread_time() - c0, int((lab != -100).sum())

    for s in state:  # warm-up
        step(s)
    load0 = os.getloadavg()[0]
    for _ in range(a.steps):
        for s in state:
            w, c, n = step(s)
            s["wall"].append(w)
            s["cpu"].append(c)
            s["sup"].append(n)
    load1 = os.getloadavg()[0]
    rows = []
    config = {"L": L, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads,
              "tokens_per_batch": tr.tokens_per_batch, "corpus": corpus.name, "threads": a.threads,
              "steps": a.steps}
    for s in state:
        wall_ms = [x * 1e3 for x in s["wall"]]
        q = statistics.quantiles(wall_ms, n=10) if len(wall_ms) >= 2 else [wall_ms[0]] * 9
        t = Timing(statistics.median(wall_ms), q[1], q[7], wall_ms)
        sup = float(np.mean(s["sup"]))
        cpu_med = statistics.median(s["cpu"])
        note = (f"cpu_s_median={cpu_med:.2f} sup_tok_per_cpu_s={sup / cpu_med:.1f} load1={load0:.1f}->{load1:.1f} "
                f"knobs={s['arm'].knobs()}")
        row = {"provider": s["arm"].name, "median_ms": f"{t.median_ms:.1f}", "p20_ms": f"{t.p20_ms:.1f}",
               "p80_ms": f"{t.p80_ms:.1f}", "throughput": f"{sup / (t.median_ms / 1e3):.1f}",
               "unit": "sup tok/s", "cpu": cpu_med, "sup": sup}
        if not a.no_record:
            record("lm_step", config, s["arm"].name, t, throughput=sup / (t.median_ms / 1e3), unit="sup tok/s",
                   note=note)
        rows.append(row)
    print(f"L={L}, {a.steps} steps per arm interleaved, load {load0:.1f} -> {load1:.1f}")
    print_table(rows, baseline="concat" if any(r["provider"] == "concat" for r in rows) else None)
    base = next((r for r in rows if r["provider"] == "concat"), None)
    if base:
        for r in rows:
            print(f"{r['provider']:<20} supervised tok per CPU-s {r['sup'] / r['cpu']:8.1f}   ratio to concat "
                  f"{(r['sup'] / r['cpu']) / (base['sup'] / base['cpu']):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
