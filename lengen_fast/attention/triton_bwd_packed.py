"""How do short documents share a tile in the Triton backward? Multi-document tiles over flat token rows, masked
by document id (launched by triton_bwd.py when triton_sched.packed_tiles says the documents are short).

  _attn_bwd_dq_packed: one program per (block of query tokens, head); _attn_bwd_dkdv_packed: one per (block of key
  tokens, KV head). Both are atomic-free, so the gradients are deterministic either way. _packed_rows maps token
  indices to (document, position in it).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import LOG2E, dot_acc, row_mask, scores, visible


@triton.jit
def _packed_rows(DOC, CU, rows, n, B):
    """(doc (clamped), in-document position, real) of packed token indices ``rows`` (< n); DOC holds B for tails."""
    ok = rows < n
    doc = tl.load(DOC + rows, mask=ok, other=B)
    real = doc < B
    d_c = tl.minimum(doc, tl.maximum(B - 1, 0))
    start = tl.load(CU + d_c, mask=real, other=0)
    return tl.where(real, doc, -1), rows - start, real


@triton.jit(do_not_specialize=["B", "TOTAL"])
def _attn_bwd_dq_packed(Q, K, V, DO, LSE, DELTA, DQ, CU, DOC,
                        sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd, slh, slt, sxh, sdqt, sdqh, sdqd,
                        B, H, GROUP, TOTAL, scale, qk_scale2, cap2, win_left, win_right,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                        EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq over multi-document tiles (the backward of triton_fwd._attn_fwd_packed): BLOCK_M consecutive packed query
    tokens x one head, keys of the documents they touch, scores kept where the documents match."""
    pid = tl.program_id(0)
    h = pid % H
    t0 = (pid // H) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    rows = t0 + offs_m
    in_t = rows < TOTAL
    row_doc, i, real = _packed_rows(DOC, CU, rows, TOTAL, B)
    r64 = rows.to(tl.int64)
    qmask = row_mask(real, dmask, EVEN_D)
    q = tl.load(Q + h * sqh + r64[:, None] * sqt + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    do = tl.load(DO + h * sdh + r64[:, None] * sdt + offs_d[None, :] * sdd, mask=qmask, other=0.0)
    lse2 = tl.load(LSE + h * slh + r64 * slt, mask=real, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + h * sxh + r64, mask=real, other=0.0)
    hk = h // GROUP
    end = tl.load(CU + B)
    bc = tl.maximum(B - 1, 0)
    k_lo = tl.load(CU + tl.minimum(tl.load(DOC + tl.minimum(t0, TOTAL - 1)), bc))
    last = tl.minimum(t0 + BLOCK_M, TOTAL) - 1
    k_hi = tl.minimum(tl.load(CU + tl.minimum(tl.load(DOC + last), bc) + 1), end)
    if HAS_RIGHT:
        k_hi = tl.minimum(k_hi, last + win_right + 1)
    if HAS_LEFT:
        k_lo = tl.maximum(k_lo, t0 - win_left)
    k_lo = (k_lo // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cdq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(k_lo, k_hi, BLOCK_N):
        cols = start_n + offs_n
        col_doc, j, c_real = _packed_rows(DOC, CU, cols, k_hi, B)
        c64 = cols.to(tl.int64)
        kmask = row_mask(c_real, dmask, EVEN_D)
        k = tl.load(K + hk * skh + c64[:, None] * skt + offs_d[None, :] * skd, mask=kmask, other=0.0)
        v = tl.load(V + hk * svh + c64[:, None] * svt + offs_d[None, :] * svd, mask=kmask, other=0.0)
        sc, mult, t = scores(q, k, qk_scale2, cap2, SOFTCAP, DOT_PREC)                      # (BM, BN)
        p = tl.math.exp2(sc * mult - lse2[:, None])
        vis = visible(i[:, None], j[None, :], 0, win_left, win_right, HAS_LEFT, HAS_RIGHT) \
            & (row_doc[:, None] == col_doc[None, :]) & c_real[None, :] & real[:, None]
        p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq, cdq = dot_acc(ds.to(k.dtype), k, dq, cdq, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + h * sdqh + r64[:, None] * sdqt + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
             mask=row_mask(in_t, dmask, EVEN_D))


@triton.jit(do_not_specialize=["B", "TOTAL"])
def _attn_bwd_dkdv_packed(Q, K, V, DO, LSE, DELTA, DK, DV, CU, DOC,
                          sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd, slh, slt, sxh,
                          sdkt, sdkh, sdkd, sdvt, sdvh, sdvd,
                          B, H_KV, GROUP, TOTAL, scale, qk_scale2, cap2, win_left, win_right,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                          SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dk, dv over multi-document tiles: BLOCK_N consecutive packed key tokens x one KV head; the query tokens of the
    documents they touch, for each query head of the group in a fixed order (no atomics)."""
    pid = tl.program_id(0)
    hk = pid % H_KV
    t0 = (pid // H_KV) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    cols = t0 + offs_n
    in_t = cols < TOTAL
    col_doc, j, c_real = _packed_rows(DOC, CU, cols, TOTAL, B)
    c64 = cols.to(tl.int64)
    kmask = row_mask(c_real, dmask, EVEN_D)
    k = tl.load(K + hk * skh + c64[:, None] * skt + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + hk * svh + c64[:, None] * svt + offs_d[None, :] * svd, mask=kmask, other=0.0)
    end = tl.load(CU + B)
    bc = tl.maximum(B - 1, 0)
    q_lo = tl.load(CU + tl.minimum(tl.load(DOC + tl.minimum(t0, TOTAL - 1)), bc))
    last = tl.minimum(t0 + BLOCK_N, TOTAL) - 1
    q_hi = tl.minimum(tl.load(CU + tl.minimum(tl.load(DOC + last), bc) + 1), end)
    if HAS_RIGHT:                     # row i sees col j only if j <= i + right: rows >= t0 - right
        q_lo = tl.maximum(q_lo, t0 - win_right)
    if HAS_LEFT:                      # and j >= i - left: rows <= last + left
        q_hi = tl.minimum(q_hi, last + win_left + 1)
    q_lo = (q_lo // BLOCK_M) * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    cdk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    cdv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        for start_m in range(q_lo, q_hi, BLOCK_M):
            rows = start_m + offs_m
            row_doc, i, real = _packed_rows(DOC, CU, rows, q_hi, B)
            r64 = rows.to(tl.int64)
            qmask = row_mask(real, dmask, EVEN_D)
            q = tl.load(Q + h * sqh + r64[:, None] * sqt + offs_d[None, :] * sqd, mask=qmask, other=0.0)
            do = tl.load(DO + h * sdh + r64[:, None] * sdt + offs_d[None, :] * sdd, mask=qmask, other=0.0)
            lse2 = tl.load(LSE + h * slh + r64 * slt, mask=real, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + h * sxh + r64, mask=real, other=0.0)
            sT, mult, tT = scores(k, q, qk_scale2, cap2, SOFTCAP, DOT_PREC)                  # (BN, BM)
            pT = tl.math.exp2(sT * mult - lse2[None, :])
            vis = visible(i[None, :], j[:, None], 0, win_left, win_right, HAS_LEFT, HAS_RIGHT) \
                & (row_doc[None, :] == col_doc[:, None]) & real[None, :] & c_real[:, None]
            pT = tl.where(vis, pT, 0.0)
            dv, cdv = dot_acc(pT.to(do.dtype), do, dv, cdv, DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            dk, cdk = dot_acc(dsT.to(q.dtype), q, dk, cdk, DOT_PREC)
    dk = dk * scale
    omask = row_mask(in_t, dmask, EVEN_D)
    tl.store(DK + hk * sdkh + c64[:, None] * sdkt + offs_d[None, :] * sdkd, dk.to(DK.dtype.element_ty), mask=omask)
    tl.store(DV + hk * sdvh + c64[:, None] * sdvt + offs_d[None, :] * sdvd, dv.to(DV.dtype.element_ty), mask=omask)
