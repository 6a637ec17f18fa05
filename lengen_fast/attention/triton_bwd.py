"""How does the Triton backward compute dq, dk, dv? Varlen document-masked attention, FA2-style recomputation.

Inputs as the forward plus dout/out (Tq, H, D) and lse (H, Tq). Launches:
  1. delta (H, Tq) fp32 = rowsum(dout * out), or sum_j P_ij dP_ij in fp32 for rows whose visible keys fit in one
     tile (short documents: exact where the 16-bit O's rounding would dominate), _bwd_delta_doc;
  2. dk, dv: one program per (key tile of a document, KV head); it walks the query heads of its
     GQA group and the query tiles that see the tile in a fixed order, recomputing P from lse.
     deterministic=False with 16-bit inputs also adds each tile pair's dq contribution into an fp32 buffer by
     atomics (DQ_ATOMIC: 5 matmul units instead of 7, one pass), cast once; step 3 is then skipped;
  3. dq (deterministic=True or fp32): one program per (query tile of a document, head), walking the visible key
     tiles; no atomics anywhere, so the gradients are bitwise repeatable.
Fully masked tiles are skipped; tail tokens get zero gradients; lse = +inf rows give P = 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    LOG2E, doc_bounds, dot_acc, dot_acc_confined, load_rows, mask_flags, phase_range, row_mask, score_params,
    scores, visible, visible_range,
)
from .triton_sched import (
    PACKED_BLOCKS, doc_ids, packed_tiles,
    block_d, candidate_configs, dot_precision, is_short, pick_config, program_tile, query_tile, tile_lookup,
    tile_schedule,
)
from ..backends import triton_interpret

# GQA groups up to this size are unrolled in the dk/dv kernel: that removes the register spills of
# the runtime loop for MHA and group 2; larger unrolls spill as much (ptxas, sm_90) and compile longer
MAX_UNROLLED_GROUP = 2


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


def delta_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of _bwd_delta_doc: documents whose visible keys fit in BLOCK_N get the exact delta."""
    if triton_interpret():
        return 16, 16
    return (32, 32) if dtype == torch.float32 else (64, 64)


def attention_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal, softmax_scale, window_left, window_right, softcap, deterministic):
    """Returns (dq, dk, dv) shaped and typed like (q, k, v); max_seqlen_q/k may be None: they only pick tile shapes
    (triton_sched.is_short).

    deterministic=True, or fp32 inputs: no atomics (dk/dv kernel, then dq kernel), bitwise repeatable.
    deterministic=False with fp16/bf16: one pass over key tiles; dq is accumulated in fp32 with atomic adds (the
    order of adds varies between runs) and cast once. (fp32 keeps the compensated two-kernel path: its dq would
    lose the Kahan sums that keep fp32 within 2x eager's error.)"""
    Tq, H, D = q.shape
    Tk, H_kv, _ = k.shape
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    B = cu_q.numel() - 1
    group = H // H_kv
    scale, qk_scale2, cap2 = score_params(D, softmax_scale, softcap)
    left, right, has_left, has_right = mask_flags(causal, window_left, window_right)
    BD = block_d(D)
    flags = dict(HEAD_DIM=D, BLOCK_D=BD, HAS_LEFT=has_left, HAS_RIGHT=has_right, SOFTCAP=softcap > 0,
                 EVEN_D=BD == D, DOT_PREC=dot_precision(q.dtype))
    fused = not deterministic and q.dtype != torch.float32
    dq = torch.empty((Tq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((Tk, H_kv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((Tk, H_kv, D), dtype=v.dtype, device=v.device)
    delta = torch.empty((H, Tq), dtype=torch.float32, device=q.device)
    tail = (left, right)
    if Tq > 0 and H > 0:
        bm, bn = delta_tile(q.dtype)
        sched = tile_schedule(cu_q, cu_k, bm, Tq)
        _bwd_delta_doc[(sched.n_slots * H,)](
            q, k, v, out, dout, lse, delta, cu_q, cu_k, sched.prefix, sched.order,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *lse.stride(), delta.stride(0),
            B, H, group, Tq, qk_scale2, cap2, *tail, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1, **flags)
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(), delta.stride(0))
    if packed_tiles(cu_q, cu_k, max_seqlen_q, max_seqlen_k):
        # multi-document tiles (short documents, one cu_seqlens): two atomic-free kernels, deterministic either way
        bm, bn = PACKED_BLOCKS["interpret" if triton_interpret() else "gpu"]
        doc = doc_ids(cu_q, max(Tq, Tk))                 # token space of q and of k (tails may differ)
        if Tq > 0 and H > 0:
            _attn_bwd_dq_packed[(triton.cdiv(Tq, bm) * H,)](
                q, k, v, dout, lse, delta, dq, cu_q, doc, *common, *dq.stride(), B, H, group, Tq, scale, qk_scale2,
                cap2, *tail, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2, **flags)
            _attn_bwd_dkdv_packed[(triton.cdiv(Tk, bn) * H_kv,)](
                q, k, v, dout, lse, delta, dk, dv, cu_q, doc, *common, *dk.stride(), *dv.stride(), B, H_kv, group,
                Tk, scale, qk_scale2, cap2, *tail, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2, **flags)
        else:
            dk.zero_()
            dv.zero_()
        return dq, dk, dv
    # the fused pass adds dS K into a zeroed fp32 buffer (zeroed again before every autotuning launch)
    dq32 = torch.zeros((Tq, H, D), dtype=torch.float32, device=q.device) if fused else dq

    def launch_dkdv(cfg):
        sched = tile_schedule(cu_k, cu_q, cfg.block_n, Tk)
        if fused:
            dq32.zero_()
        _attn_bwd_dkdv[(sched.n_slots * H_kv,)](
            q, k, v, dout, lse, delta, dk, dv, dq32, cu_q, cu_k, sched.prefix, sched.order,
            *common, *dk.stride(), *dv.stride(), *dq32.stride(), B, H_kv, group, Tk, scale, qk_scale2, cap2, *tail,
            UNROLL=group if group <= MAX_UNROLLED_GROUP else 0, DQ_ATOMIC=fused,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)

    def launch_dq(cfg):
        sched = tile_schedule(cu_q, cu_k, cfg.block_m, Tq)
        _attn_bwd_dq[(sched.n_slots * H,)](
            q, k, v, dout, lse, delta, dq, cu_q, cu_k, sched.prefix, sched.order,
            *common, *dq.stride(), B, H, group, Tq, scale, qk_scale2, cap2, *tail,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)

    short = is_short(max_seqlen_q, max_seqlen_k)
    key = (BD, has_left, has_right, softcap > 0, short, q.dtype, q.device)
    if Tk > 0 and H_kv > 0:
        launch_dkdv(pick_config(("bwd_dkdv_fused" if fused else "bwd_dkdv",) + key,
                                candidate_configs("bwd_dkdv", BD, q.dtype, short), launch_dkdv))
    if fused:
        if Tk == 0 or H_kv == 0:
            dq32.zero_()
        dq.copy_(dq32.mul_(scale))                                    # the one cast of the fp32 dq
    elif Tq > 0 and H > 0:
        launch_dq(pick_config(("bwd_dq",) + key, candidate_configs("bwd_dq", BD, q.dtype, short), launch_dq))
    return dq, dk, dv
