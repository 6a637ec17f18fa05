"""How does RoPE run on a GPU with Triton? The kernel (q and k in one launch, fp32 angles in registers,
positions from cu_seqlens) and its launcher.

Shapes (explicit element strides, any layout):
  q (B, S, Hq, D), k (B, S, Hk, D) and outputs (may alias: in place); inv_freq (R/2,) fp32;
  positions (POS_MODE, an op.PosMode passed as a constexpr): ARANGE over S, POSITION_IDS pos (B or 1, S) int32,
  CU_SEQLENS (n_seq + 1,) int32 with B == 1.
Grid: one program per BLOCK_T tokens (work split by token, never max_seqlen x num_seqs); each token
finds its document by a vectorised binary search over cu_seqlens; cos/sin of BLOCK_T x R/2 angles are
computed once and reused for every head of q and k.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from .op import PosMode

# PosMode as Triton constexprs (a jit function may read module globals only when they are constexpr)
POS_POSITION_IDS: tl.constexpr = tl.constexpr(int(PosMode.POSITION_IDS))
POS_CU_SEQLENS: tl.constexpr = tl.constexpr(int(PosMode.CU_SEQLENS))


@triton.jit
def _sincos(p, f):
    """cos, sin of p * f (fp32), carrying the product's rounding error into the reduced argument."""
    x = p * f
    # outside the accurate range (reference.ROPE_MAX_POSITION / ROPE_MAX_ANGLE): NaN, never a wrong rotation
    ok = (tl.abs(p) < 16777216.0) & (tl.abs(x) <= 6.5e6)
    x = tl.where(ok, x, 0.0)                          # keeps the float -> int conversion below in range
    err = tl.where(ok, tl.fma(p, f, -x), 0.0)
    kf = tl.floor(x * 0.636619772367581343 + 0.5)
    r = tl.fma(-kf, 1.5707963705062866, x)           # Cody-Waite: pi/2 in three fp32 parts
    r = tl.fma(-kf, -4.371138828673793e-08, r)
    r = tl.fma(-kf, -1.7151245100058819e-15, r)
    r = r + err
    z = r * r
    sp = r + r * z * ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1)
    cp = 1.0 - 0.5 * z + z * z * ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2)
    q = kf.to(tl.int32) & 3
    s1 = tl.where((q & 1) != 0, cp, sp)
    c1 = tl.where((q & 1) != 0, sp, cp)
    s = tl.where((q & 2) != 0, -s1, s1)
    c = tl.where(((q + 1) & 2) != 0, -c1, c1)
    return tl.where(ok, c, float("nan")), tl.where(ok, s, float("nan"))


@triton.jit
def _rotate_heads(X, XO, tok_in, tok_out, tmask, H, D, sh, sd, soh, sod, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                  INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr):
    # tok_in / tok_out: (BT, 1, 1) int64 token offsets; cos, sin: (BT, 1, BLOCK_HALF) fp32
    i = tl.arange(0, BLOCK_HALF)[None, None, :]
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + HALF
    for h0 in range(0, H, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H))[None, :, None]
        mask = tmask & (h < H) & (i < HALF)
        pin = X + tok_in + h * sh
        pout = XO + tok_out + h * soh
        x1 = tl.load(pin + i1 * sd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(pin + i2 * sd, mask=mask, other=0.0).to(tl.float32)
        tl.store(pout + i1 * sod, (x1 * cos - x2 * sin).to(XO.dtype.element_ty), mask=mask)
        tl.store(pout + i2 * sod, (x2 * cos + x1 * sin).to(XO.dtype.element_ty), mask=mask)
        if COPY_TAIL:  # dims past rotary_dim pass through (out-of-place only)
            j = 2 * HALF + tl.arange(0, BLOCK_TAIL)[None, None, :]
            tmask2 = tmask & (h < H) & (j < D)
            tl.store(pout + j * sod, tl.load(pin + j * sd, mask=tmask2), mask=tmask2)


@triton.jit
def _rope_kernel(Q, K, QO, KO, INV, POS, CU, n_tok, S, n_seq, n_iter, Hq, Hk, D,
                 sqb, sqs, sqh, sqd, sqob, sqos, sqoh, sqod,
                 skb, sks, skh, skd, skob, skos, skoh, skod,
                 psb, pss, offset, af,
                 HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_TAIL: tl.constexpr, POS_MODE: tl.constexpr, INTERLEAVED: tl.constexpr,
                 COPY_Q_TAIL: tl.constexpr, COPY_K_TAIL: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)                # (BT,) token ids
    tmask = t < n_tok
    b = (t // S).to(tl.int64)
    s = t % S
    if POS_MODE == POS_CU_SEQLENS:
        # largest doc d in [0, n_seq) with cu[d] <= s (skips empty docs), same as reference.positions_from_cu_seqlens
        lo = tl.zeros([BLOCK_T], dtype=tl.int32)
        hi = lo + (n_seq - 1)
        for _ in range(n_iter):
            active = lo < hi
            mid = (lo + hi + 1) >> 1
            go = tl.load(CU + mid, mask=active & tmask, other=0) <= s
            lo = tl.where(active & go, mid, lo)
            hi = tl.where(active & (~go), mid - 1, hi)
        p = s - tl.load(CU + lo, mask=tmask, other=0)
    elif POS_MODE == POS_POSITION_IDS:
        p = tl.load(POS + b * psb + s * pss, mask=tmask, other=0)
    else:
        p = s
    p = (p + offset).to(tl.float32)
    i = tl.arange(0, BLOCK_HALF)
    f = tl.load(INV + i, mask=i < HALF, other=0.0)
    cos, sin = _sincos(p[:, None], f[None, :])                              # (BT, BLOCK_HALF)
    cos = (cos * af)[:, None, :]
    sin = (sin * af)[:, None, :]
    tm = tmask[:, None, None]
    s64 = s.to(tl.int64)
    _rotate_heads(Q, QO, (b * sqb + s64 * sqs)[:, None, None], (b * sqob + s64 * sqos)[:, None, None], tm, Hq, D,
                  sqh, sqd, sqoh, sqod, cos, sin, HALF, BLOCK_H, BLOCK_HALF, BLOCK_TAIL, INTERLEAVED, COPY_Q_TAIL)
    _rotate_heads(K, KO, (b * skb + s64 * sks)[:, None, None], (b * skob + s64 * skos)[:, None, None], tm, Hk, D,
                  skh, skd, skoh, skod, cos, sin, HALF, BLOCK_H, BLOCK_HALF, BLOCK_TAIL, INTERLEAVED, COPY_K_TAIL)


def rope_triton(q, k, qo, ko, inv_freq, cu, pos, offset: int, af: float, interleaved: bool) -> None:
    """Launch the kernel on (B, S, H, D) views; qo/ko may be q/k (in place)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    half = inv_freq.numel()
    n_tok = B * S
    if n_tok == 0:
        return
    n_seq = cu.numel() - 1 if cu is not None else 1
    n_iter = max(1, math.ceil(math.log2(max(n_seq, 2))) + 1)
    block_half = triton.next_power_of_2(half)
    block_t = 16
    block_h = max(1, min(triton.next_power_of_2(max(Hq, Hk)), 4096 // (block_t * block_half)))
    tail = D - 2 * half
    dummy = inv_freq  # never read when its mode is off
    _rope_kernel[(triton.cdiv(n_tok, block_t),)](
        q, k, qo, ko, inv_freq, pos if pos is not None else dummy, cu if cu is not None else dummy,
        n_tok, S, n_seq, n_iter, Hq, Hk, D,
        *q.stride(), *qo.stride(), *k.stride(), *ko.stride(),
        (pos.stride(0) if pos.shape[0] > 1 else 0) if pos is not None else 0,
        pos.stride(1) if pos is not None else 0, offset, af,
        HALF=half, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)),
        POS_MODE=int(PosMode.of(cu, pos)), INTERLEAVED=interleaved,
        COPY_Q_TAIL=tail > 0 and qo.data_ptr() != q.data_ptr(), COPY_K_TAIL=tail > 0 and ko.data_ptr() != k.data_ptr(),
        num_warps=4)

