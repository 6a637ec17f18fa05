"""What is delta = rowsum(dO * O) of each query row? The first launch of the Triton backward (triton_bwd.py).

_bwd_delta_doc writes delta (H, Tq) fp32 per query tile of a document: exactly sum_j P_ij dP_ij in fp32 where every
key the tile sees fits in one key tile (short documents), rowsum(dO * O) otherwise. _bwd_delta is the plain
rowsum(dO * O) over token blocks. delta_tile picks the tile shape.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import LOG2E, row_mask, scores, visible, visible_range
from .triton_sched import program_tile, query_tile
from ..backends import triton_interpret


@triton.jit
def _bwd_delta(O, DO, DELTA, sot, soh, sod, sdt, sdh, sdd, sxh, T,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    r64 = rows.to(tl.int64)
    o = tl.load(O + h * soh + r64[:, None] * sot + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + h * sdh + r64[:, None] * sdt + offs_d[None, :] * sdd, mask=mask, other=0.0)
    tl.store(DELTA + h * sxh + r64, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < T)


@triton.jit(do_not_specialize=["B", "TOTAL_Q"])
def _bwd_delta_doc(Q, K, V, O, DO, LSE, DELTA, CU_Q, CU_K, PREFIX, ORDER,
                   sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sot, soh, sod, sdt, sdh, sdd, slh, slt, sxh,
                   B, H, GROUP, TOTAL_Q, qk_scale2, cap2, win_left, win_right,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                   EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """delta (H, Tq) fp32 per query tile of a document. When every key the tile sees fits in one key tile (short
    documents), delta = sum_j P_ij dP_ij from q, k, v, dout and lse in fp32: the rowsum(dO * O) identity on the
    16-bit saved O carries O's rounding (2^-11 |O| in fp16) into every dS of the row, and in fp32 it leaves ~1 ulp
    of |dO||V| where a row sees one key (exact dS = 0). Longer rows keep rowsum(dO * O) (one more pass over the keys
    would cost 2 matmuls)."""
    slot, h, total, offs_m, offs_n, offs_d, dmask = program_tile(PREFIX, B, H, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    if slot >= total:
        t_rows = tl.load(CU_Q + B) + (slot - total) * BLOCK_M + offs_m
        tl.store(DELTA + h * sxh + t_rows.to(tl.int64), tl.zeros([BLOCK_M], dtype=tl.float32), mask=t_rows < TOTAL_Q)
    else:
        q0, sq, k0, sk, m_lo, m_hi, rows = query_tile(PREFIX, ORDER, CU_Q, CU_K, slot, B, offs_m, BLOCK_M)
        diff = sk - sq
        row_ok = rows < sq
        qmask = row_mask(row_ok, dmask, EVEN_D)
        r64 = (q0 + m_lo).to(tl.int64)
        do = tl.load(DO + r64 * sdt + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=qmask, other=0.0)
        start, full_lo, full_hi, hi = visible_range(m_lo, m_hi, sk, diff, win_left, win_right, BLOCK_N,
                                                    HAS_LEFT, HAS_RIGHT)
        if hi - start <= BLOCK_N:
            q = tl.load(Q + r64 * sqt + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=qmask,
                        other=0.0)
            lse2 = tl.load(LSE + h * slh + (r64 + offs_m) * slt, mask=row_ok, other=float("inf")) * LOG2E
            cols = start + offs_n
            kmask = row_mask(cols < sk, dmask, EVEN_D)
            hk = h // GROUP
            c64 = (k0 + start).to(tl.int64)
            k = tl.load(K + c64 * skt + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=kmask,
                        other=0.0)
            v = tl.load(V + c64 * svt + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=kmask,
                        other=0.0)
            sc, mult, _ = scores(q, k, qk_scale2, cap2, SOFTCAP, DOT_PREC)                    # (BM, BN)
            p = tl.math.exp2(sc * mult - lse2[:, None])
            vis = visible(rows[:, None], cols[None, :], diff, win_left, win_right, HAS_LEFT, HAS_RIGHT) \
                & (cols < sk)[None, :]
            p = tl.where(vis, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            delta = tl.sum(tl.where(vis, p * dp, 0.0), 1)                 # no 0 * NaN from a masked key's v
        else:
            o = tl.load(O + r64 * sot + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, mask=qmask,
                        other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + h * sxh + r64 + offs_m, delta, mask=row_ok)


def delta_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of _bwd_delta_doc: documents whose visible keys fit in BLOCK_N get the exact delta."""
    if triton_interpret():
        return 16, 16
    return (32, 32) if dtype == torch.float32 else (64, 64)
