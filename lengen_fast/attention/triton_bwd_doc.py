"""How does a pair of (query tile, key tile) of one document add to dq, dk and dv? The per-document kernels of the
Triton backward (launched by triton_bwd.py).

  _attn_bwd_dkdv: one program per (key tile of a document, KV head); it walks the query heads of its GQA group
    (_dkdv_head, unrolled for small groups) and the query tiles that see the tile (_dkdv_inner) in a fixed order,
    recomputing P from lse; with DQ_ATOMIC it also adds each pair's dS K into an fp32 dq buffer by atomics;
  _attn_bwd_dq: one program per (query tile of a document, head), walking the visible key tiles (_dq_inner);
    no atomics, so dq is bitwise repeatable.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    LOG2E, doc_bounds, dot_acc, dot_acc_confined, load_rows, phase_range, row_mask, scores, visible, visible_range,
)
from .triton_sched import program_tile, query_tile, tile_lookup


@triton.jit
def _dkdv_inner(dk, dv, cdk, cdv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, step_q, step_do, step_l, step_x,
                lo, hi, cols, sq, diff, win_left, win_right, qk_scale2, cap2, offs_m, dmask, dq_ptrs, step_dq,
                BLOCK_M: tl.constexpr, MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """Query tiles [lo, hi) step BLOCK_M against one key tile; works on transposed (BN, BM) scores.
    DQ_ATOMIC: also add this key tile's dq contribution dS K (BM, D), unscaled, into the fp32 buffer at dq_ptrs
    (the single-pass backward: 5 matmuls per tile pair instead of 7)."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = load_rows(q_ptrs, rows, sq, dmask, MASK, EVEN_D)                       # (BM, D)
        do = load_rows(do_ptrs, rows, sq, dmask, MASK, EVEN_D)                     # (BM, D)
        if MASK:
            lse2 = tl.load(lse_ptrs, mask=rows < sq, other=float("inf")) * LOG2E
            delta = tl.load(delta_ptrs, mask=rows < sq, other=0.0)
        else:
            lse2 = tl.load(lse_ptrs) * LOG2E
            delta = tl.load(delta_ptrs)
        sT, mult, tT = scores(k, q, qk_scale2, cap2, SOFTCAP, DOT_PREC)           # (BN, BM)
        pT = tl.math.exp2(sT * mult - lse2[None, :])                               # lse=+inf -> 0
        if MASK:
            vis = visible(rows[None, :], cols[:, None], diff, win_left, win_right, HAS_LEFT, HAS_RIGHT) \
                & (rows < sq)[None, :]
            pT = tl.where(vis, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                    # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        if MASK:  # masked pairs: dS = 0 exactly, and no 0 * NaN from a masked row's q or dout
            dsT = tl.where(vis, dsT, 0.0)
            dv, cdv = dot_acc_confined(pT, do, vis, dv, cdv, True, DOT_PREC)
            dk, cdk = dot_acc_confined(dsT, q, vis, dk, cdk, True, DOT_PREC)
        else:
            dv, cdv = dot_acc(pT.to(do.dtype), do, dv, cdv, DOT_PREC)
            dk, cdk = dot_acc(dsT.to(q.dtype), q, dk, cdk, DOT_PREC)
        if DQ_ATOMIC:
            if MASK:  # no 0 * NaN from a masked key's k into a row that cannot see it
                dq_part, _ = dot_acc_confined(tl.trans(dsT), k, tl.trans(vis), tl.zeros(q.shape, tl.float32), 0.0,
                                              False, DOT_PREC)                    # (BM, D) fp32
            else:
                dq_part = tl.dot(tl.trans(dsT.to(q.dtype)), k, input_precision=DOT_PREC)  # (BM, D) fp32
            tl.atomic_add(dq_ptrs, dq_part, mask=(rows < sq)[:, None] & dmask, sem="relaxed")
            dq_ptrs += step_dq
        q_ptrs += step_q
        do_ptrs += step_do
        lse_ptrs += step_l
        delta_ptrs += step_x
    return dk, dv, cdk, cdv


@triton.jit
def _dkdv_head(dk, dv, cdk, cdv, k, v, Q, DO, LSE, DELTA, h, q0, sqt, sqh, sdt, sdh, slh, slt, sxh, q_off, do_off,
               start, full_lo, full_hi, hi, cols, sq, diff, win_left, win_right, qk_scale2, cap2, offs_m, dmask,
               DQ, sdqt, sdqh, dq_off,
               BLOCK_M: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """Query head h against one key tile: masked [start, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi)."""
    q_base = Q + q0.to(tl.int64) * sqt + h * sqh + q_off
    do_base = DO + q0.to(tl.int64) * sdt + h * sdh + do_off
    l_base = LSE + h * slh + (q0 + offs_m).to(tl.int64) * slt
    x_base = DELTA + h * sxh + (q0 + offs_m).to(tl.int64)
    dq_base = DQ + q0.to(tl.int64) * sdqt + h * sdqh + dq_off
    for phase in tl.static_range(3):
        p_lo, p_hi = phase_range(phase, start, full_lo, full_hi, hi)
        p64 = p_lo.to(tl.int64)
        dk, dv, cdk, cdv = _dkdv_inner(
            dk, dv, cdk, cdv, k, v, q_base + p64 * sqt, do_base + p64 * sdt, l_base + p64 * slt, x_base + p64,
            BLOCK_M * sqt, BLOCK_M * sdt, BLOCK_M * slt, BLOCK_M, p_lo, p_hi, cols, sq, diff, win_left, win_right,
            qk_scale2, cap2, offs_m, dmask, dq_base + p64 * sdqt, BLOCK_M * sdqt,
            BLOCK_M, phase != 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D, DOT_PREC, DQ_ATOMIC)
    return dk, dv, cdk, cdv


@triton.jit(do_not_specialize=["B", "TOTAL_K"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_Q, CU_K, PREFIX, ORDER,
                   sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd, slh, slt, sxh,
                   sdkt, sdkh, sdkd, sdvt, sdvh, sdvd, sdqt, sdqh, sdqd,
                   B, H_KV, GROUP, TOTAL_K, scale, qk_scale2, cap2, win_left, win_right, UNROLL: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                   EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, DQ_ATOMIC: tl.constexpr = False):
    """DQ_ATOMIC: DQ is a zeroed (Tq, H, D) fp32 buffer that receives unscaled dS K by atomic adds (the caller scales
    and casts it once); otherwise DQ is unused and dq comes from _attn_bwd_dq."""
    slot, hk, total, offs_m, offs_n, offs_d, dmask = program_tile(PREFIX, B, H_KV, HEAD_DIM, BLOCK_M, BLOCK_N,
                                                                  BLOCK_D)
    if slot >= total:
        # tail keys at/after cu_k[B]: zero gradients
        t_rows = (tl.load(CU_K + B) + (slot - total) * BLOCK_N + offs_n).to(tl.int64)
        t_mask = (t_rows < TOTAL_K)[:, None] & dmask
        zero = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        tl.store(DK + hk * sdkh + t_rows[:, None] * sdkt + offs_d[None, :] * sdkd,
                 zero.to(DK.dtype.element_ty), mask=t_mask)
        tl.store(DV + hk * sdvh + t_rows[:, None] * sdvt + offs_d[None, :] * sdvd,
                 zero.to(DV.dtype.element_ty), mask=t_mask)
    else:
        doc, tile_n, n_t = tile_lookup(PREFIX, ORDER, slot, B)   # first key tile is the heaviest (causal)
        q0, sq, k0, sk = doc_bounds(CU_Q, CU_K, doc)
        diff = sk - sq
        n_lo = tile_n * BLOCK_N
        n_hi = tl.minimum(n_lo + BLOCK_N, sk) - 1
        cols = n_lo + offs_n
        kmask = row_mask(cols < sk, dmask, EVEN_D)
        k_off = (k0 + n_lo).to(tl.int64)
        k = tl.load(K + k_off * skt + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=kmask, other=0.0)
        v = tl.load(V + k_off * svt + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=kmask, other=0.0)

        # query tiles that see some key of the tile: [start, hi); all of them: [full_lo, full_hi).
        # j <= i + diff + right <=> i >= j - diff - right, and j >= i + diff - left <=> i <= j - diff + left
        start, full_lo, full_hi, hi = visible_range(n_lo, n_hi, sq, -diff, win_right, win_left, BLOCK_M,
                                                    HAS_RIGHT, HAS_LEFT)

        q_off = offs_m[:, None] * sqt + offs_d[None, :] * sqd
        do_off = offs_m[:, None] * sdt + offs_d[None, :] * sdd
        dq_off = offs_m[:, None] * sdqt + offs_d[None, :] * sdqd
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        cdk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)     # Kahan compensations (fp32 inputs only)
        cdv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # the group's query heads in a fixed order; unrolled when small (a runtime loop around the
        # three pipelined loops costs registers and spills on sm_90), a runtime loop otherwise
        if UNROLL > 0:
            for g in tl.static_range(UNROLL):
                dk, dv, cdk, cdv = _dkdv_head(
                    dk, dv, cdk, cdv, k, v, Q, DO, LSE, DELTA, hk * UNROLL + g, q0, sqt, sqh, sdt, sdh, slh, slt, sxh,
                    q_off, do_off, start, full_lo, full_hi, hi, cols, sq, diff, win_left, win_right, qk_scale2,
                    cap2, offs_m, dmask, DQ, sdqt, sdqh, dq_off, BLOCK_M, HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D,
                    DOT_PREC, DQ_ATOMIC)
        else:
            for g in range(GROUP):
                dk, dv, cdk, cdv = _dkdv_head(
                    dk, dv, cdk, cdv, k, v, Q, DO, LSE, DELTA, hk * GROUP + g, q0, sqt, sqh, sdt, sdh, slh, slt, sxh,
                    q_off, do_off, start, full_lo, full_hi, hi, cols, sq, diff, win_left, win_right, qk_scale2,
                    cap2, offs_m, dmask, DQ, sdqt, sdqh, dq_off, BLOCK_M, HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D,
                    DOT_PREC, DQ_ATOMIC)
        dk = dk * scale
        tl.store(DK + k_off * sdkt + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=kmask)
        tl.store(DV + k_off * sdvt + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :] * sdvd,
                 dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dq_inner(dq, cdq, q, do, lse2, delta, k_ptrs, v_ptrs, step_k, step_v, lo, hi, rows, sk, diff,
              win_left, win_right, qk_scale2, cap2, offs_n, dmask,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Key tiles [lo, hi) step BLOCK_N against one query tile."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs, cols, sk, dmask, MASK, EVEN_D)                       # (BN, D)
        v = load_rows(v_ptrs, cols, sk, dmask, MASK, EVEN_D)
        s, mult, t = scores(q, k, qk_scale2, cap2, SOFTCAP, DOT_PREC)               # (BM, BN)
        p = tl.math.exp2(s * mult - lse2[:, None])
        if MASK:
            vis = visible(rows[:, None], cols[None, :], diff, win_left, win_right, HAS_LEFT, HAS_RIGHT) \
                & (cols < sk)[None, :]
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        if MASK:  # masked pairs: dS = 0 exactly, and no 0 * NaN from a masked key
            ds = tl.where(vis, ds, 0.0)
            dq, cdq = dot_acc_confined(ds, k, vis, dq, cdq, True, DOT_PREC)
        else:
            dq, cdq = dot_acc(ds.to(k.dtype), k, dq, cdq, DOT_PREC)
        k_ptrs += step_k
        v_ptrs += step_v
    return dq, cdq


@triton.jit(do_not_specialize=["B", "TOTAL_Q"])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, PREFIX, ORDER,
                 sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd, slh, slt, sxh, sdqt, sdqh, sdqd,
                 B, H, GROUP, TOTAL_Q, scale, qk_scale2, cap2, win_left, win_right,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                 EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    slot, h, total, offs_m, offs_n, offs_d, dmask = program_tile(PREFIX, B, H, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    if slot >= total:
        t_rows = (tl.load(CU_Q + B) + (slot - total) * BLOCK_M + offs_m).to(tl.int64)
        tl.store(DQ + h * sdqh + t_rows[:, None] * sdqt + offs_d[None, :] * sdqd,
                 tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty), mask=(t_rows < TOTAL_Q)[:, None] & dmask)
    else:
        q0, sq, k0, sk, m_lo, m_hi, rows = query_tile(PREFIX, ORDER, CU_Q, CU_K, slot, B, offs_m, BLOCK_M)
        diff = sk - sq
        row_ok = rows < sq
        qmask = row_mask(row_ok, dmask, EVEN_D)
        r64 = (q0 + m_lo).to(tl.int64)
        q = tl.load(Q + r64 * sqt + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=qmask, other=0.0)
        do = tl.load(DO + r64 * sdt + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=qmask, other=0.0)
        lse2 = tl.load(LSE + h * slh + (r64 + offs_m) * slt, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + h * sxh + r64 + offs_m, mask=row_ok, other=0.0)

        start, full_lo, full_hi, hi = visible_range(m_lo, m_hi, sk, diff, win_left, win_right, BLOCK_N,
                                                    HAS_LEFT, HAS_RIGHT)

        hk = h // GROUP
        k_base = K + k0.to(tl.int64) * skt + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd
        v_base = V + k0.to(tl.int64) * svt + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        cdq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)         # Kahan compensation (fp32 inputs only)
        for phase in tl.static_range(3):
            p_lo, p_hi = phase_range(phase, start, full_lo, full_hi, hi)
            p64 = p_lo.to(tl.int64)
            dq, cdq = _dq_inner(dq, cdq, q, do, lse2, delta, k_base + p64 * skt, v_base + p64 * svt,
                           BLOCK_N * skt, BLOCK_N * svt, p_lo, p_hi, rows, sk, diff, win_left, win_right,
                           qk_scale2, cap2, offs_n, dmask, BLOCK_N, phase != 1, HAS_LEFT, HAS_RIGHT,
                           SOFTCAP, EVEN_D, DOT_PREC)
        dq = dq * scale
        tl.store(DQ + r64 * sdqt + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=qmask)
