"""RoPE on packed batches (50-2000 documents, 16k-128k tokens): ours vs Hugging Face-style eager and,
on a GPU, vs a Triton kernel that reads a cos/sin cache with a per-document grid (flash-attn rotary style).

  python -m lengen_fast.bench.bench_rope --out DIR       (--quick for a smoke run)

Throughput is bytes of q and k read and written per second; on a GPU also as a fraction of HBM peak.
Every measurement appends a row to DIR/results.csv (see common.py).
"""
from __future__ import annotations

import argparse

import torch

from lengen_fast import RopeScaling, apply_rope, backends, rope_frequencies
from lengen_fast.bench.common import add_common_args, apply_common_args, measure, print_table, quick, record
from lengen_fast.reference import apply_rope_ref, positions_from_cu_seqlens, rope_cos_sin_ref, rotate_half

try:
    import triton
    import triton.language as tl
except ImportError:  # the cos/sin-cache peer runs only on a CUDA GPU, where triton is installed
    triton = None

QUICK = quick()
HBM_PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # SXM datasheet figures


# ------------------------------------------------------------------ peer: cos/sin cache + per-document grid

if triton is not None:
    @triton.jit
    def _rotary_cache_kernel(X, COS, SIN, CU, sx_t, sx_h, R2: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        # grid (cdiv(max_seqlen, BLOCK_M), num_docs, heads), as flash-attn's rotary kernel in varlen mode:
        # programs past their document's length exit at once. NeoX layout, in place.
        pid_m, doc, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(CU + doc)
        seqlen = tl.load(CU + doc + 1) - start
        if pid_m * BLOCK_M >= seqlen:
            return
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        mask = (rm[:, None] < seqlen) & (rk[None, :] < R2)
        cos = tl.load(COS + rm[:, None] * R2 + rk[None, :], mask=mask, other=1.0).to(tl.float32)
        sin = tl.load(SIN + rm[:, None] * R2 + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        base = X + (start + rm[:, None]).to(tl.int64) * sx_t + h * sx_h + rk[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + R2, mask=mask, other=0.0).to(tl.float32)
        tl.store(base, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
        tl.store(base + R2, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)

    def rotary_cache_triton(q, k, cos, sin, cu, max_seqlen):
        """In place on (T, H, D) q and k, one launch each (flash-attn applies q and k separately)."""
        r2 = cos.shape[1]
        for x in (q, k):
            grid = (triton.cdiv(max_seqlen, 64), cu.numel() - 1, x.shape[1])
            _rotary_cache_kernel[grid](x, cos, sin, cu, x.stride(0), x.stride(1), R2=r2, BLOCK_M=64,
                                       BLOCK_K=triton.next_power_of_2(r2))
        return q, k


# ------------------------------------------------------------------ workloads

def packed_cu(num_docs: int, total: int, seed: int = 0) -> torch.Tensor:
    """Random document boundaries: num_docs documents summing to total tokens."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(total - 1, generator=g)[: num_docs - 1].add(1).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)


def configs(device: str):
    if QUICK:
        return [(50, 4096), (200, 8192)]
    if device == "cpu":
        return [(50, 16384), (500, 65536), (2000, 131072)]
    return [(50, 16384), (200, 32768), (500, 65536), (2000, 131072)]


def run(device: str, Hq: int, Hk: int, D: int, dtype: torch.dtype):
    dev = torch.device(device)
    scaling = RopeScaling("llama3", 8.0, 8192)
    inv, af = rope_frequencies(D, 500000.0, scaling)
    inv = inv.to(dev)
    peak = next((v for k, v in HBM_PEAK_GBS.items() if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)),
                None)
    reps = 7 if device == "cpu" else 50
    for num_docs, total in configs(device):
        cu = packed_cu(num_docs, total).to(dev)
        q = torch.randn(total, Hq, D, device=dev, dtype=dtype)
        k = torch.randn(total, Hk, D, device=dev, dtype=dtype)
        pos = positions_from_cu_seqlens(cu, total)  # Hugging Face gets position_ids from its collator
        max_seqlen = int((cu[1:] - cu[:-1]).max())
        bytes_moved = 2 * (q.numel() + k.numel()) * q.element_size()
        cfg = {"docs": num_docs, "tokens": total, "Hq": Hq, "Hk": Hk, "D": D, "dtype": str(dtype).split(".")[-1],
               "scaling": "llama3", "max_seqlen": max_seqlen}

        providers = {"hf_eager": lambda: apply_rope_ref(q, k, pos, inv, af, upcast=False)}
        # Hugging Face builds cos/sin once per forward and reuses them in every layer: time the rotation alone too
        cos, sin = (c.to(dtype)[:, None, :] for c in rope_cos_sin_ref(pos, inv, af))   # (T, 1, D)
        providers["hf_eager_rotate_only"] = lambda: (q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)
        for b in ("cpu", "cuda", "triton"):
            if backends.available("rope", b, dev) and not (b == "triton" and dev.type == "cpu"):
                providers[f"lengen_{b}"] = (lambda b=b: apply_rope(q, k, cu_seqlens=cu, base=500000.0,
                                                                   scaling=scaling, backend=b))
        want = apply_rope_ref(q, k, pos, inv, af)
        if dev.type == "cuda" and triton is not None:
            freqs = torch.arange(max_seqlen, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
            cc, sc = (freqs.cos() * af).to(dtype), (freqs.sin() * af).to(dtype)      # (max_seqlen, R/2)
            qc, kc = q.clone(), k.clone()
            for a, b in zip(rotary_cache_triton(q.clone(), k.clone(), cc, sc, cu, max_seqlen), want):
                assert (a.float() - b.float()).abs().max().item() < 0.1, "cos/sin-cache peer disagrees"
            providers["triton_cos_sin_cache_per_doc"] = lambda: rotary_cache_triton(qc, kc, cc, sc, cu, max_seqlen)

        for name, fn in providers.items():
            if name == "triton_cos_sin_cache_per_doc":
                continue  # in place: checked once below on fresh copies
            out = fn()
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, want))
            assert err < 0.1, f"{name} disagrees with the reference (max err {err})"
        rows = []
        for name, fn in providers.items():
            t = measure(fn, device=device, warmup=1 if device == "cpu" else 5, reps=reps)
            gbs = bytes_moved / (t.median_ms * 1e-3) / 1e9
            rows.append(record("rope", cfg, name, t, device=device, throughput=gbs, unit="GB/s",
                               ratio_to_peak=gbs / peak if peak else None))
        print(f"\n{device} {cfg}")
        print_table(rows, baseline="hf_eager")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lengen_fast.bench.bench_rope", description=__doc__.splitlines()[0])
    add_common_args(p)
    global QUICK
    QUICK = apply_common_args(p.parse_args(argv))
    torch.manual_seed(0)
    if QUICK:
        run("cpu", 4, 2, 64, torch.bfloat16)
    else:
        run("cpu", 8, 2, 128, torch.bfloat16)
    if torch.cuda.is_available():
        run("cuda", 32, 8, 128, torch.bfloat16)


if __name__ == "__main__":
    main()
