"""Varlen document-masked attention vs peers, side by side in one run; one results.csv row per measurement.

CPU (fp32, causal, forward + backward): lengen C++ kernels, SDPA called per document (Python loop), SDPA with a
dense block-diagonal causal mask, the torch eager reference, and FlexAttention (forward only: torch has no CPU
backward for it). GPU (when available; bf16, causal, head dims 64 and 128, fwd and bwd): ours (Triton), the
installed peers through our op (fa2 = torch's FA2, cudnn = cuDNN via nvidia-cudnn-frontend; lengen_fast/attention/
peers.py), our dispatch (whatever the table picks), torch's raw ``varlen_attn``, and FlexAttention compiled with a
document block mask (compile and block-mask times reported as their own rows), in TFLOP/s (flash-attn counting:
forward 4 * sum(s_i^2) * H * D / 2 for causal, backward 2.5x). Every provider gets the same cu_seqlens, FLOP count
and warm-up. Before timing, each provider's output and gradients are cross-checked against the reference on a
slice of the same layout (flash-attn's rule: error <= 2x the same-dtype eager error + atol) and against ours;
``--crosscheck PATH`` writes the result as JSON. ``--write-table PATH`` turns the GPU rows into the dispatch table
(backends.build_dispatch_table: per key the fastest route whose cross-check passed).
Layouts: (a) long-tailed document lengths (8k tokens on CPU, 16k on GPU), (b) 16-token documents (512 on CPU,
1024 on GPU), (c) documents of 1-8k tokens, ~32k tokens in all (GPU).

Usage: python -m lengen_fast.bench.bench_attention [--cpu-only | --gpu-only] [--quick] --out DIR;
--peer-dry-run runs the GPU section's code on CPU with tiny sizes (bench/gpu_check.sh DRY_RUN=1).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import lengen_fast
from lengen_fast import backends
from lengen_fast.bench.common import add_common_args, apply_common_args, measure, print_table, quick, record
from lengen_fast.reference import doc_ids_from_cu_seqlens, varlen_attention_ref

QUICK = quick()
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class Config:
    layout: str        # "a": long-tailed lengths, "b": many short documents, "c": documents of 1-8k tokens
    total: int         # tokens
    H: int
    D: int
    dtype: str
    causal: bool = True


def long_tailed_lengths(total: int, seed: int = 0) -> list[int]:
    """Log-normal lengths (median ~150, a few docs in the thousands) that sum to ``total``."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        x = torch.empty(1).log_normal_(5.0, 1.2, generator=g).item()
        lens.append(int(min(total - sum(lens), max(1.0, x))))
    return lens


def uniform_lengths(total: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Lengths drawn uniformly from [lo, hi] until they sum to ``total`` (the last one is cut to fit)."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(min(total - sum(lens), int(torch.randint(lo, hi + 1, (1,), generator=g))))
    return lens


def layout_lengths(layout: str, total: int) -> list[int]:
    if layout == "a":
        return long_tailed_lengths(total)
    if layout == "c":                       # 1-8k tokens per document (scaled down with total for smoke runs)
        return uniform_lengths(total, max(1, total // 32), max(1, total // 4))
    return [16] * (total // 16)


def cpu_ids() -> str:
    """'family F model M stepping S' of /proc/cpuinfo: the exact part where the model name is generic (VMs)."""
    ids = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model", "stepping") and key not in ids:
                    ids[key] = val.strip()
                if not line.strip():
                    break
    except OSError:
        return ""
    return " ".join(f"{k.split()[-1]} {ids[k]}" for k in ("cpu family", "model", "stepping") if k in ids)


def threads(device: str) -> dict:
    """CPU thread counts (torch intra-op, lengen's OpenMP), the instruction set the C++ kernels run (LENGEN_CPU_ISA
    forces one) and the CPU's family / model: part of each CPU row's config."""
    if device != "cpu":
        return {}
    ext = backends.cpu_ext()
    return {"torch_threads": torch.get_num_threads(), "omp_threads": ext.num_threads() if ext else None,
            "cpu_isa": ext.cpu_isa() if ext else None, "cpu_ids": cpu_ids()}


def attn_flops(lens: list[int], H: int, D: int, causal: bool) -> float:
    """flash-attn counting for the forward pass: 4 * sum(s^2) * H * D, halved when causal."""
    return 4.0 * sum(s * s for s in lens) * H * D / (2.0 if causal else 1.0)


def make_inputs(cfg: Config, lens: list[int], device):
    dtype = getattr(torch, cfg.dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    T = int(sum(lens))
    q, k, v = (torch.randn(T, cfg.H, cfg.D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(T, cfg.H, cfg.D, device=device, dtype=dtype)
    return q, k, v, dout, cu


# --------------------------------------------------------------------------------------------- providers
# Each returns (fwd, dout): fwd() runs the forward pass and returns the output; dout matches its layout.

def lengen_fwd(q, k, v, dout, cu, lens, backend=None):
    max_len = max(lens)
    return lambda: lengen_fast.varlen_attention(q, k, v, cu, None, max_len, max_len, causal=True,
                                                backend=backend), dout


def torch_varlen_fwd(q, k, v, dout, cu, lens):
    """torch's own varlen_attn (FA2 inside torch), called as a user would: causal is window_size=(-1, 0)."""
    from torch.nn.attention.varlen import varlen_attn
    max_len = max(lens)
    return lambda: varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0)), dout


# GPU providers; the lengen_* and peer rows all run through our op (same checks, same output contract)
PEER_PROVIDERS = {
    "lengen_triton": functools.partial(lengen_fwd, backend="triton"),
    "fa2": functools.partial(lengen_fwd, backend="fa2"),
    "cudnn": functools.partial(lengen_fwd, backend="cudnn"),
    "lengen_dispatch": lengen_fwd,
    "torch_varlen_attn": torch_varlen_fwd,
}
ROUTE_OF = {"lengen_triton": "triton", "fa2": "fa2", "cudnn": "cudnn"}     # providers the dispatch table chooses from


def sdpa_per_doc_fwd(q, k, v, dout, cu, lens):
    """torch.split (its backward is one cat; slicing q[a:b] would add a full-size zero gradient per document)."""
    def fwd():
        outs = [F.scaled_dot_product_attention(qd.transpose(0, 1), kd.transpose(0, 1), vd.transpose(0, 1),
                                               is_causal=True).transpose(0, 1)
                for qd, kd, vd in zip(q.split(lens), k.split(lens), v.split(lens)) if qd.shape[0]]
        return torch.cat(outs)
    return fwd, dout


def dense_mask(cu, T, device):
    doc = doc_ids_from_cu_seqlens(cu, T)
    i = torch.arange(T, device=device)
    return (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])            # (T, T) causal block-diagonal


def sdpa_dense_fwd(q, k, v, dout, cu, lens):
    mask = dense_mask(cu, q.shape[0], q.device)
    return lambda: F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                  attn_mask=mask), dout.transpose(0, 1)


def reference_fwd(q, k, v, dout, cu, lens):
    return lambda: varlen_attention_ref(q, k, v, cu, causal=True), dout


def flex_setup(q, cu, device):
    """(compiled flex_attention, block mask, timing of one block-mask build with the compiled mask builder)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T = q.shape[0]
    doc = doc_ids_from_cu_seqlens(cu, T)

    def doc_causal(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    build = torch.compile(lambda: create_block_mask(doc_causal, 1, None, T, T, device=device))
    build()                                                   # compile the mask builder once
    t = measure(build, device=device, warmup=1, reps=5)
    return torch.compile(flex_attention), build(), t


def flex_fwd(flex, block_mask, q, k, v, dout):
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))              # (1, H, T, D) views
    return lambda: flex(qh, kh, vh, block_mask=block_mask), dout.transpose(0, 1).unsqueeze(0)


def step(fwd, dout, inputs, mode: str):
    """The timed callable for mode "fwd", "bwd" (backward of one saved forward) or "fwd+bwd"."""
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fwd(), inputs, dout)
    o = fwd()
    return lambda: torch.autograd.grad(o, inputs, dout, retain_graph=True)


FLOP_MULT = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
_FLEX_COMPILED: list = []


# --------------------------------------------------------------------------------------------- runs

def run_config(cfg: Config, device: str, providers: dict, mode: str, reps: int, peak: float | None = None,
               baseline: str | None = None, slow: tuple[str, ...] = ()) -> list[dict]:
    """``slow`` providers get 3 timed reps (a Python loop over 1024 documents takes ~0.4 s per call on GPU)."""
    lens = layout_lengths(cfg.layout, cfg.total)
    flops = attn_flops(lens, cfg.H, cfg.D, cfg.causal) * FLOP_MULT[mode]
    conf = {**asdict(cfg), "docs": len(lens), "max_len": max(lens), "pass": mode, **threads(device)}
    print(f"\n--- {conf}")
    rows = []
    for name, make in providers.items():
        q, k, v, dout, cu = make_inputs(cfg, lens, device)
        if mode == "fwd":
            q, k, v = (x.detach() for x in (q, k, v))
        t0 = time.perf_counter()
        try:
            fwd, do = make(q, k, v, dout, cu, lens)
            n, limit = (3, 5.0) if name in slow else (reps, 60.0)
            t = measure(step(fwd, do, (q, k, v), mode), device=device, warmup=1, reps=n, max_time_s=limit)
        except Exception as e:                              # a peer that cannot run here is reported, not fatal
            print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            continue
        # wall time incl. compiles and autotuning: what a lent GPU's call budget has to cover
        print(f"  {name}: {time.perf_counter() - t0:.1f} s wall", flush=True)
        tflops = flops / (t.median_ms * 1e-3) / 1e12
        rows.append(record("attention", conf, name, t, device=device, throughput=tflops, unit="TFLOP/s",
                           ratio_to_peak=None if peak is None else tflops / peak,
                           note=f"load1={os.getloadavg()[0]:.2f}; minflt/call={t.minflt_per_call:.0f}"
                           if device == "cpu" else ""))
    print_table(rows, baseline=baseline)
    return rows


def flex_rows(cfg: Config, device: str, mode: str, reps: int, peak: float | None) -> list[dict]:
    """FlexAttention with a document mask: block-mask build, first call (compile) and steady-state rows."""
    lens = layout_lengths(cfg.layout, cfg.total)
    flops = attn_flops(lens, cfg.H, cfg.D, cfg.causal) * FLOP_MULT[mode]
    conf = {**asdict(cfg), "docs": len(lens), "max_len": max(lens), "pass": mode, **threads(device)}
    q, k, v, dout, cu = make_inputs(cfg, lens, device)
    if mode == "fwd":
        q, k, v = (x.detach() for x in (q, k, v))
    rows = []
    torch._dynamo.reset()                                     # the first call below includes tracing + compile
    cold = not _FLEX_COMPILED                                 # inductor's caches are off for the first config only
    torch._inductor.config.force_disable_caches = cold
    _FLEX_COMPILED.append(cfg)
    try:
        flex, bm, t_mask = flex_setup(q, cu, device)
        fwd, do = flex_fwd(flex, bm, q, k, v, dout)
        t0 = time.perf_counter()
        fn = step(fwd, do, (q, k, v), mode)
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        t = measure(fn, device=device, warmup=1, reps=reps, max_time_s=60)
    except Exception as e:
        print(f"  flex_attention: skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return rows
    one = type(t)(first_ms, first_ms, first_ms, [first_ms])
    rows.append(record("attention", conf, "flex_attention/block_mask", t_mask, device=device,
                       note="create_block_mask per batch (compiled mask builder)"))
    rows.append(record("attention", conf, "flex_attention/first_call", one, device=device,
                       note="first call: torch.compile of flex_attention + one step ("
                            + ("cold, caches off)" if cold else "inductor caches warm)")))
    tflops = flops / (t.median_ms * 1e-3) / 1e12
    rows.append(record("attention", conf, "flex_attention", t, device=device, throughput=tflops, unit="TFLOP/s",
                       ratio_to_peak=None if peak is None else tflops / peak))
    print_table(rows)
    return rows


def _only(providers: dict, only, skip=frozenset()) -> dict:
    return {k: f for k, f in providers.items() if (only is None or k in only) and k not in skip}


def cpu_section(only=None, layouts=("a", "b")):
    total = 1024 if QUICK else 8192
    H, D = (2, 32) if QUICK else (8, 64)
    reps = 3 if QUICK else 5
    print(f"CPU: {backends.describe()}, torch threads {torch.get_num_threads()}")
    # A quick run leaves out the slowest peers (FlexAttention's compile: ~10 s per config on 2 cores; the eager
    # reference's Python loop) unless --only names them.
    slow_peers = {"flex_attention", "torch_reference"} if QUICK and only is None else set()
    for layout in layouts:
        cfg = Config(layout, total, H, D, "float32")
        run_config(cfg, "cpu", _only({"lengen_cpu": lengen_fwd, "sdpa_per_doc": sdpa_per_doc_fwd,
                                      "sdpa_dense_mask": sdpa_dense_fwd, "torch_reference": reference_fwd}, only,
                                     skip=slow_peers),
                   "fwd+bwd", reps, baseline="sdpa_per_doc")
        # FlexAttention has no CPU backward: forward passes on their own; then the backward of one saved forward.
        for mode in ("fwd", "bwd"):
            run_config(cfg, "cpu", _only({"lengen_cpu": lengen_fwd, "sdpa_per_doc": sdpa_per_doc_fwd}, only), mode,
                       reps, baseline="sdpa_per_doc")
        if (only is None or "flex_attention" in only) and "flex_attention" not in slow_peers:
            flex_rows(cfg, "cpu", "fwd", reps, peak=None)


GPU_HEADS = {128: 16, 64: 32}      # head dim -> heads (same FLOPs per token)
GPU_TOTAL = {"a": 16384, "b": 16384, "c": 32768}
CHECK_TOKENS = 4096                # cross-check slice: whole documents up to this many tokens


def _check_slice(lens: list[int], limit: int) -> list[int]:
    out = []
    for n in lens:
        if sum(out) + n > limit:
            if not out:
                out.append(limit)
            break
        out.append(n)
    return out


def crosscheck(cfg: Config, lens: list[int], device: str, providers: dict) -> dict:
    """Each provider's out and dq/dk/dv on a slice of the layout against the reference (truth: fp32, eager: the
    inputs' dtype), under flash-attn's rule, and its largest difference to ours (lengen_triton)."""
    from lengen_fast.reference import varlen_attention_ref as ref
    lens = _check_slice(lens, CHECK_TOKENS)
    q, k, v, dout, cu = make_inputs(cfg, lens, device)

    def run(fn):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        grads = torch.autograd.grad(out, xs, dout)
        return [out.detach().float()] + [g.float() for g in grads]

    truth = run(lambda a, b, c: ref(a, b, c, cu, causal=True))
    eager = run(lambda a, b, c: ref(a, b, c, cu, causal=True, upcast=False))
    atol = {"float32": 1e-5, "float16": 1e-4, "bfloat16": 1e-3}[cfg.dtype]
    res, outs = {}, {}
    for name, make in providers.items():
        try:
            got = run(lambda a, b, c: make(a, b, c, dout, cu, lens)[0]())
        except Exception as e:                               # a peer that cannot run here
            res[name] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        outs[name] = got
        entry = {"docs": len(lens), "tokens": sum(lens)}
        ok = True
        for t_name, g, t, e in zip(("out", "dq", "dk", "dv"), got, truth, eager):
            err = (g - t).abs().max().item() if g.numel() else 0.0
            bound = 2 * ((e - t).abs().max().item() if e.numel() else 0.0) + atol
            finite = bool(torch.isfinite(g).all())
            entry[t_name] = {"err": err, "bound": bound, "ok": finite and err <= bound}
            ok = ok and entry[t_name]["ok"]
        entry["ok"] = ok
        res[name] = entry
    ours = outs.get("lengen_triton")
    for name, got in outs.items():
        if ours is not None and name != "lengen_triton":
            res[name]["max_diff_to_ours"] = {t: (g - o).abs().max().item() if g.numel() else 0.0
                                             for t, g, o in zip(("out", "dq", "dk", "dv"), got, ours)}
    for name, entry in res.items():
        print(f"  check {name}: " + (entry["skipped"] if "skipped" in entry else
              ("ok" if entry["ok"] else "FAIL") + " " + ", ".join(
                  f"{t} {entry[t]['err']:.2e}/{entry[t]['bound']:.2e}" for t in ("out", "dq", "dk", "dv"))))
    return res


def peer_section(runs=("128:a", "128:b", "128:c", "64:a", "64:b", "64:c"), only=None, flex_runs=None,
                 device="cuda", dtype="bfloat16", scale=1.0, write_table=None, crosscheck_path=None):
    """The GPU peers side by side (see the module docstring). ``scale`` shrinks the token counts (dry runs);
    rows of every provider go to results.csv, then the dispatch table and cross-check JSON when asked."""
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((p for k, p in PEAK_TFLOPS_BF16.items() if k in name), None) if device == "cuda" else None
    reps = 1 if device != "cuda" else 5 if QUICK else 20
    flex_runs = runs if flex_runs is None else flex_runs
    print(f"peers: {backends.describe()}")
    measured, checks = [], {}
    for run in runs:
        D, layout = int(run.split(":")[0]), run.split(":")[1]
        total = max(64, int((2048 if QUICK else GPU_TOTAL[layout]) * scale))
        cfg = Config(layout, total, GPU_HEADS[D] if scale == 1.0 else 2, D, dtype)
        lens = layout_lengths(layout, total)
        provs = _only(PEER_PROVIDERS, only)
        check = crosscheck(cfg, lens, device, provs)
        checks[f"{D}:{layout}"] = check
        for mode in ("fwd", "bwd"):
            rows = run_config(cfg, device, provs, mode, reps, peak=peak, baseline="lengen_triton")
            for r in rows:
                if r["provider"] in ROUTE_OF:
                    measured.append({"dtype": dtype, "head_dim": D, "mask": "causal", "layout": layout,
                                     "docs": "short" if max(lens) <= backends.SHORT_DOCS_MAX else "long",
                                     "pass": mode, "route": ROUTE_OF[r["provider"]],
                                     "median_ms": float(r["median_ms"]),
                                     "ok": bool(check.get(r["provider"], {}).get("ok"))})
            if (only is None or "flex_attention" in only) and run in flex_runs:
                flex_rows(cfg, device, mode, reps, peak=peak)
    if crosscheck_path:
        Path(crosscheck_path).parent.mkdir(parents=True, exist_ok=True)
        Path(crosscheck_path).write_text(json.dumps({"device": name, "checks": checks}, indent=1))
        print(f"cross-checks -> {crosscheck_path}")
    if write_table:
        cls = backends.device_class(torch.device(device))
        table = backends.build_dispatch_table(measured, cls, write_table)
        print(f"dispatch table ({len(table['entries'])} entries for {cls}) -> {write_table}")
        for key, e in sorted(table["entries"].items()):
            print(f"  {key}: {e['best']}  {e['ms']}")
    return measured, checks


def gpu_section(runs=("128:a", "128:b", "128:c", "64:a", "64:b", "64:c"), only=None, flex_runs=None,
                write_table=None, crosscheck_path=None):
    peer_section(runs, only, flex_runs, "cuda", "bfloat16", 1.0, write_table, crosscheck_path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lengen_fast.bench.bench_attention",
                                description=__doc__.splitlines()[0])
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated providers, e.g. lengen_cpu,sdpa_per_doc")
    p.add_argument("--gpu-runs", default="128:a,128:b,128:c,64:a,64:b,64:c",
                   help="GPU head_dim:layout pairs to run")
    p.add_argument("--flex-runs", default=None, help="the GPU runs that also time FlexAttention (default: all)")
    p.add_argument("--layouts", default="a,b", help="CPU layouts to run: a (long-tailed), b (512 x 16)")
    p.add_argument("--write-table", default=None, help="write the dispatch table (JSON) from the GPU rows")
    p.add_argument("--crosscheck", default=None, help="write the peers' cross-check results (JSON)")
    p.add_argument("--peer-dry-run", action="store_true",
                   help="run the GPU section's code on CPU with tiny fp32 sizes (no timing claims)")
    add_common_args(p)
    args = p.parse_args(argv)
    global QUICK
    QUICK = apply_common_args(args)
    only = None if args.only is None else set(args.only.split(","))
    runs = tuple(args.gpu_runs.split(","))
    flex_runs = None if args.flex_runs is None else tuple(x for x in args.flex_runs.split(",") if x)
    if args.peer_dry_run:
        peer_section(runs, only, flex_runs, "cpu", "float32", 1 / 256, args.write_table, args.crosscheck)
        return
    if not args.gpu_only:
        cpu_section(only, tuple(args.layouts.split(",")))
    if not args.cpu_only and torch.cuda.is_available():
        gpu_section(runs, only, flex_runs, args.write_table, args.crosscheck)


if __name__ == "__main__":
    main()
