"""Which tiles does each program own, and with which tile shape? The device-side tile schedule and the kernel
config choice (candidates per kernel, head dim and dtype; autotuning), shared by forward and backward.

A kernel works on tiles of one document: BLOCK rows of queries (forward, dq) or keys (dk/dv).
The grid cannot depend on values inside cu_seqlens (that would need a host sync), so it is sized
from shapes alone: ``n_slots = cdiv(T, BLOCK) + B + 1`` tile slots bound
``sum_b cdiv(s_b, BLOCK) + cdiv(tail, BLOCK)``. On the device, documents are sorted heaviest first
and ``prefix[i]`` counts the tiles of the first i sorted documents; a program finds its document
with a binary search over ``prefix`` (:func:`tile_lookup`). Slots past ``prefix[B]`` cover the
tail tokens at/after ``cu_seqlens[-1]`` (their outputs are zeroed); the remaining slots exit.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from ..backends import triton_interpret
from .triton_common import doc_bounds


@dataclass(frozen=True)
class TileSchedule:
    prefix: torch.Tensor   # (B+1,) int32: tiles of the sorted documents before position i
    order: torch.Tensor    # (max(B,1),) int32: document index at sorted position i, heaviest first
    n_slots: int           # grid size in tiles (host-known upper bound)


# one program sorts up to this many documents; more go through torch ops
MAX_KERNEL_DOCS = 4096        # < 2**20: the sort key packs (length, index) into an int64


def tile_schedule(cu_tiles: torch.Tensor, cu_weight: torch.Tensor, block: int, total: int) -> TileSchedule:
    """Tiles of BLOCK tokens over the documents of ``cu_tiles`` (B+1,) int32, documents sorted by
    decreasing length in ``cu_weight`` (the other side's lengths: the cost of one tile), ties by index.

    Device-side only (one tiny kernel, or torch ops for many documents): no host sync.
    """
    B = cu_tiles.numel() - 1
    n_slots = triton.cdiv(total, block) + B + 1
    if 0 < B <= MAX_KERNEL_DOCS:
        prefix = torch.empty(B + 1, dtype=torch.int32, device=cu_tiles.device)
        order = torch.empty(B, dtype=torch.int32, device=cu_tiles.device)
        _schedule_kernel[(1,)](cu_tiles, cu_weight, prefix, order, B, BLOCK=block,
                               BLOCK_B=max(16, triton.next_power_of_2(B)), num_warps=4)
        return TileSchedule(prefix, order, n_slots)
    prefix, order = schedule_torch(cu_tiles, cu_weight, block)
    return TileSchedule(prefix, order, n_slots)


def schedule_torch(cu_tiles: torch.Tensor, cu_weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix, order) of :func:`tile_schedule` with torch ops (any number of documents)."""
    B = cu_tiles.numel() - 1
    ntiles = torch.div(cu_tiles[1:] - cu_tiles[:-1] + (block - 1), block, rounding_mode="floor")   # (B,)
    order = torch.argsort(cu_weight[1:] - cu_weight[:-1], descending=True, stable=True)
    prefix = torch.zeros(B + 1, dtype=torch.int32, device=cu_tiles.device)
    torch.cumsum(ntiles[order], 0, dtype=torch.int32, out=prefix[1:])
    if B == 0:
        order = torch.zeros(1, dtype=torch.int64, device=cu_tiles.device)
    return prefix, order.to(torch.int32)


@triton.jit(do_not_specialize=["B"])
def _schedule_kernel(CU_T, CU_W, PREFIX, ORDER, B, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    i = tl.arange(0, BLOCK_B)
    ok = i < B
    w = tl.load(CU_W + i + 1, mask=ok, other=0) - tl.load(CU_W + i, mask=ok, other=0)
    w = tl.where(ok, w, -1).to(tl.int64)
    # descending weight, then ascending index; padding (w = -1) sorts last
    key = w * 1048576 + (1048575 - i)
    doc = (1048575 - (tl.sort(key, descending=True) & 1048575)).to(tl.int32)
    doc = tl.where(ok, doc, 0)
    n = (tl.load(CU_T + doc + 1, mask=ok, other=0) - tl.load(CU_T + doc, mask=ok, other=0) + BLOCK - 1) // BLOCK
    tl.store(PREFIX + 1 + i, tl.cumsum(tl.where(ok, n, 0), 0), mask=ok)
    tl.store(PREFIX + i, tl.zeros_like(i), mask=i == 0)
    tl.store(ORDER + i, doc, mask=ok)


@triton.jit
def tile_lookup(PREFIX, ORDER, slot, B):
    """Map a tile slot (< PREFIX[B]) to (document, tile index inside it, tiles in the document)."""
    lo = slot * 0
    hi = lo + B
    # invariant: PREFIX[lo] <= slot < PREFIX[hi]; empty documents are skipped automatically
    while hi - lo > 1:
        mid = (lo + hi) // 2
        go = tl.load(PREFIX + mid) <= slot
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    first = tl.load(PREFIX + lo)
    n = tl.load(PREFIX + lo + 1) - first
    doc = tl.load(ORDER + lo)
    return doc, slot - first, n


@triton.jit
def program_tile(PREFIX, B, N_HEADS, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """What this program owns in a grid of (tile slots x N_HEADS), head fastest (the heads of one tile, and of one
    KV group, run together): (slot, head, total tiles PREFIX[B], offs_m (BM,), offs_n (BN,), offs_d (BD,),
    dmask (1, BD) of the real head dims)."""
    pid = tl.program_id(0)
    slot = pid // N_HEADS
    head = pid % N_HEADS
    total = tl.load(PREFIX + B)
    offs_d = tl.arange(0, BLOCK_D)
    return slot, head, total, tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), offs_d, offs_d[None, :] < HEAD_DIM


@triton.jit
def query_tile(PREFIX, ORDER, CU_Q, CU_K, slot, B, offs_m, BLOCK_M: tl.constexpr):
    """The query tile of ``slot`` (< PREFIX[B]), a document's last tile first (the heaviest under a causal mask):
    (q0, sq, k0, sk) of its document, its rows [m_lo, m_hi] (m_hi clipped to the document) and rows (BM,)."""
    doc, t, n_t = tile_lookup(PREFIX, ORDER, slot, B)
    m_lo = (n_t - 1 - t) * BLOCK_M
    q0, sq, k0, sk = doc_bounds(CU_Q, CU_K, doc)
    return q0, sq, k0, sk, m_lo, tl.minimum(m_lo + BLOCK_M, sq) - 1, m_lo + offs_m


# ------------------------------------------------------------------------------ configs

@dataclass(frozen=True)
class KernelConfig:
    block_m: int      # query rows per tile
    block_n: int      # key rows per tile
    num_warps: int
    num_stages: int


# One fixed small config in the interpreter keeps tests fast and exercises multi-tile paths.
# Tests may replace entries to try other tile shapes.
INTERPRET_CONFIGS: dict[str, KernelConfig] = {
    "fwd": KernelConfig(16, 16, 4, 1),
    "bwd_dkdv": KernelConfig(16, 16, 4, 1),
    "bwd_dq": KernelConfig(16, 16, 4, 1),
}

K = KernelConfig
# GPU candidates per kernel and padded head dim, chosen so that sm_90 builds keep wgmma (>= 64 rows
# per warpgroup on the left operand) and spill few or no registers (checked with ptxas -v on
# Triton 3.9 builds for sm_90a). fp16/bf16 use tensor cores with fp32 accumulation.
_GPU_CONFIGS: dict[str, dict[int, list[KernelConfig]]] = {
    "fwd": {
        64: [K(128, 64, 4, 3), K(128, 128, 8, 3), K(128, 64, 4, 4), K(64, 64, 4, 3)],
        128: [K(128, 64, 8, 3), K(128, 64, 8, 4), K(128, 128, 8, 3), K(64, 64, 4, 3)],
        256: [K(64, 32, 8, 2), K(128, 32, 8, 2), K(128, 64, 8, 2)],
    },
    # dk/dv: a key tile (and its dk, dv accumulators) stays on chip while query tiles stream past;
    # its left operands are the key tile, so BLOCK_N >= 64
    "bwd_dkdv": {
        64: [K(64, 128, 8, 3), K(32, 128, 8, 3), K(64, 64, 4, 3), K(32, 64, 4, 3)],
        128: [K(32, 64, 8, 3), K(32, 64, 8, 4), K(64, 64, 8, 3), K(32, 128, 8, 3)],
        256: [K(16, 64, 8, 2), K(16, 64, 8, 1), K(32, 64, 8, 2)],
    },
    # dq: a query tile stays on chip while key tiles stream past
    "bwd_dq": {
        64: [K(128, 32, 4, 3), K(128, 64, 8, 3), K(64, 64, 4, 3), K(64, 32, 4, 3)],
        128: [K(128, 64, 8, 3), K(128, 32, 8, 3), K(64, 64, 8, 3), K(64, 32, 4, 3)],
        256: [K(128, 32, 8, 2), K(64, 32, 8, 2), K(64, 32, 4, 2)],
    },
}
# Short documents (both max_seqlen hints <= SHORT_MAX): small tiles, so a 16-token document is not padded
# to a mostly masked 64-128 row tile (layout (b) of the benchmark, 512+ documents of 16 tokens).
SHORT_MAX = 64
_SHORT_CONFIGS: dict[str, list[KernelConfig]] = {
    "fwd": [K(16, 16, 2, 1), K(16, 16, 1, 1), K(32, 32, 4, 1), K(64, 64, 4, 2)],
    "bwd_dkdv": [K(16, 16, 2, 1), K(16, 16, 1, 1), K(32, 32, 4, 1), K(64, 64, 4, 2)],
    "bwd_dq": [K(16, 16, 2, 1), K(16, 16, 1, 1), K(32, 32, 4, 1), K(64, 64, 4, 2)],
}
# fp32 inputs use IEEE FMA dots (errors like eager fp32; tf32 would be ~1e-3 off): small tiles
_FP32_CONFIGS: dict[str, list[KernelConfig]] = {
    "fwd": [K(32, 32, 8, 2), K(16, 32, 4, 2)],
    "bwd_dkdv": [K(32, 32, 8, 2), K(16, 32, 4, 2)],
    "bwd_dq": [K(32, 32, 8, 2), K(32, 16, 4, 2)],
}
del K


def is_short(max_seqlen_q: int | None, max_seqlen_k: int | None) -> bool:
    """Both hints given and <= SHORT_MAX. Hints only pick tile shapes: a wrong hint costs speed, never
    correctness (every tile still covers one document, whatever its length)."""
    return max_seqlen_q is not None and max_seqlen_k is not None and max(max_seqlen_q, max_seqlen_k) <= SHORT_MAX


def candidate_configs(kernel: str, block_d: int, dtype: torch.dtype, short: bool = False) -> list[KernelConfig]:
    if triton_interpret():
        return [INTERPRET_CONFIGS[kernel]]
    if dtype == torch.float32:
        return list(_FP32_CONFIGS[kernel])
    if short and block_d <= 256:
        return list(_SHORT_CONFIGS[kernel])
    by_d = _GPU_CONFIGS[kernel]
    return by_d[min(d for d in by_d if d >= block_d)] if block_d <= 256 else by_d[256]


_BEST: dict[tuple, KernelConfig] = {}
# LENGEN_TRITON_AUTOTUNE=0 takes the first candidate instead of timing them all (faster first calls)
AUTOTUNE = os.environ.get("LENGEN_TRITON_AUTOTUNE", "1") != "0"


def pick_config(key: tuple, configs: Sequence[KernelConfig], launch: Callable[[KernelConfig], None]) -> KernelConfig:
    """Autotune once per key (head dim, mask kind, softcap, dtype, device): time each config's
    launch and keep the fastest. ``launch`` must be idempotent (the kernels only write outputs)."""
    if len(configs) == 1 or not AUTOTUNE:
        return configs[0]
    best = _BEST.get(key)
    if best is None:
        best = _disk_lookup(key, configs)
        if best is not None:
            _BEST[key] = best
    if best is None:
        from triton.runtime.errors import OutOfResources
        times = []
        for cfg in configs:
            try:
                times.append(triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=25))
            except OutOfResources:
                times.append(math.inf)
        best = configs[min(range(len(configs)), key=times.__getitem__)]
        _BEST[key] = best
        _disk_store(key, best)
    return best


# $LENGEN_AUTOTUNE_CACHE: a JSON file that keeps autotuning results between processes (bench/gpu_check.sh sets it,
# so its test, benchmark and table steps tune each kernel once). Keys name the GPU and the Triton version.

def _disk_key(key: tuple) -> str:
    dev = next((x for x in key if isinstance(x, torch.device)), None)
    name = torch.cuda.get_device_name(dev) if dev is not None and dev.type == "cuda" else "cpu"
    return "|".join([name, triton.__version__] + [str(x) for x in key if not isinstance(x, torch.device)])


def _disk_read(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _disk_lookup(key: tuple, configs: Sequence[KernelConfig]) -> KernelConfig | None:
    path = os.environ.get("LENGEN_AUTOTUNE_CACHE")
    if not path:
        return None
    hit = _disk_read(path).get(_disk_key(key))
    cfg = KernelConfig(*hit) if isinstance(hit, list) and len(hit) == 4 else None
    return cfg if cfg in configs else None                   # a stale entry (candidates changed) is re-tuned


def _disk_store(key: tuple, cfg: KernelConfig) -> None:
    path = os.environ.get("LENGEN_AUTOTUNE_CACHE")
    if not path:
        return
    doc = _disk_read(path)
    doc[_disk_key(key)] = [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=0, sort_keys=True)
    os.replace(tmp, path)                                    # atomic: parallel test workers share the file


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE products, so errors match eager fp32 (tf32 would be 1e-3 off)
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- multi-document tiles (short documents): which calls use them, and their tile shape

def packed_tiles(cu_q, cu_k, max_seqlen_q, max_seqlen_k) -> bool:
    """Multi-document tiles: self-attention (one cu_seqlens tensor for q and k, so no host sync is needed to know
    they match) with short-document hints (triton_sched.is_short). Hints only pick the kernel: a wrong one costs
    speed (the tile walks more keys), never correctness."""
    return PACKED_TILES and is_short(max_seqlen_q, max_seqlen_k) and cu_q.numel() > 1 \
        and cu_q.data_ptr() == cu_k.data_ptr() and cu_q.shape == cu_k.shape


PACKED_TILES = True      # tests switch it off to compare with the per-document tiles
PACKED_BLOCKS = {"interpret": (16, 16), "gpu": (64, 64)}


def doc_ids(cu: torch.Tensor, T: int) -> torch.Tensor:
    """(T,) int32 document of each packed token (B for tokens at/after cu[-1]); device-side, no sync."""
    return (torch.searchsorted(cu, torch.arange(T, device=cu.device, dtype=torch.int32), right=True) - 1).to(
        torch.int32).clamp_(0, cu.numel() - 1)
