"""How does the Triton forward compute out and lse? Varlen document-masked attention, FA2-style online softmax.

q: (Tq, H, D); k, v: (Tk, H_kv, D); cu_seqlens_q/k: (B+1,) int32; any strides.
Returns out (Tq, H, D) in q.dtype and lse (H, Tq) fp32 (natural log; +inf for rows that see no key
and for tail tokens at/after cu_seqlens_q[-1], whose output is 0). One program = one query tile of
one document x one head; tiles come from a device-side schedule (triton_sched), heaviest first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    dot_acc_confined, load_rows, mask_flags, phase_range, row_mask, score_params, scores, visible, visible_range,
)
from ..backends import triton_interpret
from .triton_sched import (
    PACKED_BLOCKS, block_d, candidate_configs, doc_ids, dot_precision, is_short, packed_tiles, pick_config,
    program_tile, query_tile, tile_schedule,
)

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, step_k, step_v, lo, hi, rows, sk, diff,
               win_left, win_right, qk_scale2, cap2, offs_n, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Key tiles [lo, hi) step BLOCK_N; MASK=False only for tiles fully visible to every row."""
    dmask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs, cols, sk, dmask, MASK, EVEN_D)                        # (BN, D)
        s, mult, _ = scores(q, k, qk_scale2, cap2, SOFTCAP, DOT_PREC)              # (BM, BN)
        if MASK:
            vis = visible(rows[:, None], cols[None, :], diff, win_left, win_right, HAS_LEFT, HAS_RIGHT) \
                & (cols < sk)[None, :]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * mult)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * mult)
            m_use = m_new
        p = tl.math.exp2(s * mult - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = load_rows(v_ptrs, cols, sk, dmask, MASK, EVEN_D)
        if MASK:
            acc, _ = dot_acc_confined(p, v, vis, acc, acc, False, DOT_PREC)   # no 0 * NaN from masked keys
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
        k_ptrs += step_k
        v_ptrs += step_v
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["B", "TOTAL_Q"])
def _attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, PREFIX, ORDER,
              sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sot, soh, sod, slh, slt,
              B, H, GROUP, TOTAL_Q, qk_scale2, cap2, win_left, win_right,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    slot, h, total, offs_m, offs_n, offs_d, dmask = program_tile(PREFIX, B, H, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    if slot >= total:
        # tail tokens at/after cu_q[B]: out 0, lse +inf
        t_rows = tl.load(CU_Q + B) + (slot - total) * BLOCK_M + offs_m
        t_ok = t_rows < TOTAL_Q
        t_rows64 = t_rows.to(tl.int64)
        o_ptrs = O + h * soh + t_rows64[:, None] * sot + offs_d[None, :] * sod
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=O.dtype.element_ty), mask=t_ok[:, None] & dmask)
        tl.store(LSE + h * slh + t_rows64 * slt, tl.full([BLOCK_M], float("inf"), tl.float32), mask=t_ok)
    else:
        q0, sq, k0, sk, m_lo, m_hi, rows = query_tile(PREFIX, ORDER, CU_Q, CU_K, slot, B, offs_m, BLOCK_M)
        diff = sk - sq
        row_ok = rows < sq
        hk = h // GROUP

        q_base = Q + (q0 + m_lo).to(tl.int64) * sqt + h * sqh
        q_ptrs = q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd
        qmask = row_mask(row_ok, dmask, EVEN_D)
        q = tl.load(q_ptrs, mask=qmask, other=0.0)

        # key tiles visible to some row of the tile: [start, hi); to every row: [full_lo, full_hi)
        start, full_lo, full_hi, hi = visible_range(m_lo, m_hi, sk, diff, win_left, win_right, BLOCK_N,
                                                    HAS_LEFT, HAS_RIGHT)

        k_base = K + k0.to(tl.int64) * skt + hk * skh
        v_base = V + k0.to(tl.int64) * svt + hk * svh
        k_off = offs_n[:, None] * skt + offs_d[None, :] * skd
        v_off = offs_n[:, None] * svt + offs_d[None, :] * svd
        step_k = BLOCK_N * skt
        step_v = BLOCK_N * svt

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        # masked [start, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi)
        for phase in tl.static_range(3):
            p_lo, p_hi = phase_range(phase, start, full_lo, full_hi, hi)
            p64 = p_lo.to(tl.int64)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base + p64 * skt + k_off, v_base + p64 * svt + v_off,
                                       step_k, step_v, p_lo, p_hi, rows, sk, diff, win_left, win_right,
                                       qk_scale2, cap2, offs_n, offs_d, HEAD_DIM, BLOCK_N, phase != 1,
                                       HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D, DOT_PREC)

        empty = l_i == 0.0                # no visible key: out 0, lse +inf
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        o_ptrs = O + (q0 + m_lo).to(tl.int64) * sot + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=qmask)
        tl.store(LSE + h * slh + (q0 + rows).to(tl.int64) * slt, lse, mask=row_ok)


@triton.jit(do_not_specialize=["B", "TOTAL_Q"])
def _attn_fwd_packed(Q, K, V, O, LSE, CU, DOC,
                     sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sot, soh, sod, slh, slt,
                     B, H, GROUP, TOTAL_Q, qk_scale2, cap2, win_left, win_right,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                     EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Multi-document tiles for short documents (self-attention: one cu_seqlens for q and k). One program = BLOCK_M
    consecutive packed query tokens x one head, whatever documents they belong to; it walks the key tokens of the
    documents it touches, and a score is kept only when query and key share a document (DOC (T,) int32, B for
    tail tokens) and the mask sees it. A 16-token document no longer pads a tile of its own."""
    pid = tl.program_id(0)
    h = pid % H
    t0 = (pid // H) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    rows = t0 + offs_m
    in_t = rows < TOTAL_Q
    end = tl.load(CU + B)                                            # tokens at/after it are tail
    row_doc = tl.load(DOC + rows, mask=in_t, other=B)
    real = row_doc < B
    d_c = tl.minimum(row_doc, tl.maximum(B - 1, 0))
    row_start = tl.load(CU + d_c, mask=real, other=0)
    i = rows - row_start                                             # position in its document
    r64 = rows.to(tl.int64)
    qmask = row_mask(real, dmask, EVEN_D)
    q = tl.load(Q + h * sqh + r64[:, None] * sqt + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    hk = h // GROUP
    # keys of the documents of rows [t0, t0 + BLOCK_M): from the first row's document start to the last row's end
    first_doc = tl.minimum(tl.load(DOC + tl.minimum(t0, TOTAL_Q - 1)), tl.maximum(B - 1, 0))
    k_lo = tl.load(CU + first_doc)
    last = tl.minimum(t0 + BLOCK_M, TOTAL_Q) - 1
    last_doc = tl.minimum(tl.load(DOC + last), tl.maximum(B - 1, 0))
    k_hi = tl.minimum(tl.load(CU + last_doc + 1), end)
    if HAS_RIGHT:                                                    # no key after the last row + right
        k_hi = tl.minimum(k_hi, last + win_right + 1)
    if HAS_LEFT:
        k_lo = tl.maximum(k_lo, t0 - win_left)
    k_lo = (k_lo // BLOCK_N) * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(k_lo, k_hi, BLOCK_N):
        cols = start_n + offs_n
        c_ok = (cols < k_hi) & (cols >= 0)
        col_doc = tl.load(DOC + cols, mask=c_ok, other=-1)
        col_start = tl.load(CU + tl.maximum(col_doc, 0), mask=c_ok, other=0)
        c64 = cols.to(tl.int64)
        kmask = row_mask(c_ok, dmask, EVEN_D)
        k = tl.load(K + hk * skh + c64[:, None] * skt + offs_d[None, :] * skd, mask=kmask, other=0.0)
        v = tl.load(V + hk * svh + c64[:, None] * svt + offs_d[None, :] * svd, mask=kmask, other=0.0)
        sc, mult, _ = scores(q, k, qk_scale2, cap2, SOFTCAP, DOT_PREC)                       # (BM, BN)
        vis = visible(i[:, None], (cols - col_start)[None, :], 0, win_left, win_right, HAS_LEFT, HAS_RIGHT) \
            & (row_doc[:, None] == col_doc[None, :]) & c_ok[None, :]
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1) * mult)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(sc * mult - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    empty = l_i == 0.0                # tail tokens and rows that see no key: out 0, lse +inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    omask = row_mask(in_t, dmask, EVEN_D)
    tl.store(O + h * soh + r64[:, None] * sot + offs_d[None, :] * sod, out.to(O.dtype.element_ty), mask=omask)
    tl.store(LSE + h * slh + r64 * slt, lse, mask=in_t)


def attention_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                         softmax_scale, window_left, window_right, softcap):
    """max_seqlen_q/k may be None (the grid comes from shapes); they only pick tile shapes (is_short)."""
    Tq, H, D = q.shape
    Tk, H_kv, _ = k.shape
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    B = cu_q.numel() - 1
    scale, qk_scale2, cap2 = score_params(D, softmax_scale, softcap)
    left, right, has_left, has_right = mask_flags(causal, window_left, window_right)
    out = torch.empty((Tq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, Tq), dtype=torch.float32, device=q.device)
    BD = block_d(D)

    def launch(cfg):
        sched = tile_schedule(cu_q, cu_k, cfg.block_m, Tq)
        _attn_fwd[(sched.n_slots * H,)](
            q, k, v, out, lse, cu_q, cu_k, sched.prefix, sched.order,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            B, H, H // H_kv, Tq, qk_scale2, cap2, left, right,
            HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            HAS_LEFT=has_left, HAS_RIGHT=has_right, SOFTCAP=softcap > 0,
            EVEN_D=BD == D, DOT_PREC=dot_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if Tq > 0 and H > 0 and packed_tiles(cu_q, cu_k, max_seqlen_q, max_seqlen_k):
        bm, bn = PACKED_BLOCKS["interpret" if triton_interpret() else "gpu"]
        _attn_fwd_packed[(triton.cdiv(Tq, bm) * H,)](
            q, k, v, out, lse, cu_q, doc_ids(cu_q, Tq),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            B, H, H // H_kv, Tq, qk_scale2, cap2, left, right,
            HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, HAS_LEFT=has_left, HAS_RIGHT=has_right,
            SOFTCAP=softcap > 0, EVEN_D=BD == D, DOT_PREC=dot_precision(q.dtype), num_warps=4, num_stages=2)
    elif Tq > 0 and H > 0:
        short = is_short(max_seqlen_q, max_seqlen_k)
        key = ("fwd", BD, has_left, has_right, softcap > 0, short, q.dtype, q.device)
        launch(pick_config(key, candidate_configs("fwd", BD, q.dtype, short), launch))
    return out, lse
