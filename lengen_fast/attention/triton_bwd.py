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
The kernels live in triton_bwd_delta.py (1), triton_bwd_doc.py (2, 3) and triton_bwd_packed.py (multi-document
tiles for short documents); this module launches them (the names are imported here, where tests patch them).
"""
from __future__ import annotations

import torch
import triton

from .triton_bwd_delta import _bwd_delta, _bwd_delta_doc, delta_tile  # noqa: F401  (_bwd_delta: re-exported)
from .triton_bwd_doc import _attn_bwd_dkdv, _attn_bwd_dq
from .triton_bwd_packed import _attn_bwd_dkdv_packed, _attn_bwd_dq_packed
from .triton_common import mask_flags, score_params
from .triton_sched import (
    PACKED_BLOCKS, block_d, candidate_configs, doc_ids, dot_precision, is_short, packed_tiles, pick_config,
    tile_schedule,
)
from ..backends import triton_interpret


# GQA groups up to this size are unrolled in the dk/dv kernel: that removes the register spills of
# the runtime loop for MHA and group 2; larger unrolls spill as much (ptxas, sm_90) and compile longer
MAX_UNROLLED_GROUP = 2


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
