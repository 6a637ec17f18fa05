"""Varlen document-masked attention vs peers, side by side in one run; one results.csv row per measurement.

CPU (fp32, causal, forward + backward): lengen C++ kernels, SDPA called per document (Python loop), SDPA with a
dense block-diagonal causal mask, the torch eager reference, and FlexAttention (forward only: torch has no CPU
backward for it). GPU (when available; bf16, causal, head dims 64 and 128): lengen Triton forward and backward
in TFLOP/s (flash-attn counting: forward 4 * sum(s_i^2) * H * D / 2 for causal, backward 2.5x), FlexAttention
compiled with a document block mask (compile and block-mask times reported as their own rows), SDPA per document.
Layouts: (a) long-tailed document lengths (8k tokens on CPU, 16k on GPU), (b) 512 documents of 16 tokens.

Usage: python -m lengen_fast.bench.bench_attention [--cpu-only | --gpu-only] [--quick] --out DIR
"""
from __future__ import annotations

import argparse
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
    layout: str        # "a": long-tailed lengths, "b": many short documents
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


def layout_lengths(layout: str, total: int) -> list[int]:
    return long_tailed_lengths(total) if layout == "a" else [16] * (total // 16)


def threads(device: str) -> dict:
    """CPU thread counts (torch intra-op, lengen's OpenMP), part of each CPU row's config."""
    if device != "cpu":
        return {}
    ext = backends.cpu_ext()
    return {"torch_threads": torch.get_num_threads(), "omp_threads": ext.num_threads() if ext else None}


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
                           ratio_to_peak=None if peak is None else tflops / peak))
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
        # FlexAttention has no CPU backward: forward passes on their own.
        run_config(cfg, "cpu", _only({"lengen_cpu": lengen_fwd, "sdpa_per_doc": sdpa_per_doc_fwd}, only), "fwd",
                   reps, baseline="sdpa_per_doc")
        if (only is None or "flex_attention" in only) and "flex_attention" not in slow_peers:
            flex_rows(cfg, "cpu", "fwd", reps, peak=None)


GPU_HEADS = {128: 16, 64: 32}      # head dim -> heads (same FLOPs per token)


def gpu_section(runs=("128:a", "128:b", "64:a", "64:b"), only=None):
    name = torch.cuda.get_device_name()
    peak = next((p for k, p in PEAK_TFLOPS_BF16.items() if k in name), None)
    total = 2048 if QUICK else 16384
    reps = 5 if QUICK else 20
    for run in runs:
        D, layout = int(run.split(":")[0]), run.split(":")[1]
        cfg = Config(layout, total, GPU_HEADS[D], D, "bfloat16")
        for mode in ("fwd", "bwd"):
            run_config(cfg, "cuda", _only({"lengen_triton": lengen_fwd, "sdpa_per_doc": sdpa_per_doc_fwd}, only),
                       mode, reps, peak=peak, baseline="lengen_triton", slow=("sdpa_per_doc",) if layout == "b" else ())
            if only is None or "flex_attention" in only:
                flex_rows(cfg, "cuda", mode, reps, peak=peak)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lengen_fast.bench.bench_attention",
                                description=__doc__.splitlines()[0])
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated providers, e.g. lengen_cpu,sdpa_per_doc")
    p.add_argument("--gpu-runs", default="128:a,128:b,64:a,64:b", help="GPU head_dim:layout pairs to run")
    p.add_argument("--layouts", default="a,b", help="CPU layouts to run: a (long-tailed), b (512 x 16)")
    add_common_args(p)
    args = p.parse_args(argv)
    global QUICK
    QUICK = apply_common_args(args)
    if not args.gpu_only:
        cpu_section(None if args.only is None else set(args.only.split(",")), tuple(args.layouts.split(",")))
    if not args.cpu_only and torch.cuda.is_available():
        gpu_section(tuple(args.gpu_runs.split(",")), None if args.only is None else set(args.only.split(",")))


if __name__ == "__main__":
    main()
