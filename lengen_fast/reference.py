"""Pure-torch references: what does each kernel compute? THE SPEC of the attention and RoPE kernels.

Every backend is tested against these functions, and the benchmarks use them as the eager
baseline. They favour clarity over speed. ``upcast=True`` (default) computes in fp32 (or the
dtype given by ``compute_dtype``); ``upcast=False`` computes in the inputs' dtype, which is
the "eager torch in the same dtype" error baseline of flash-attn's tolerance rule:

    max|kernel - ref_fp32| <= 2 * max|eager_same_dtype - ref_fp32| + atol

Where each op's spec lives (the torch kernels' specs are here; the data ops' specs are numpy or
plain Python and stay beside their op, which the data tests and bench/bench_data.py import):
  varlen attention       varlen_attention_ref (here)
  RoPE rotation          apply_rope_ref, rope_cos_sin_ref (here)
  RoPE frequencies       rope_frequencies in lengen_fast/rope/scaling.py (inv_freq and attention
                         factor of every scaling kind; apply_rope_ref takes its output)
  data: decomposition    decompose_ref in lengen_fast/data/decompose.py (per-document loop)
  data: BFD packing      pack_bfd_ref in lengen_fast/data/pack.py (linear scan over open bins)
  data: batch gather     gather_ref in lengen_fast/data/source.py (numpy, of csrc/data/gather.cpp)
  data: concat-chunk     concat_chunk (data/pack.py) and bucket_schedule (data/curriculum.py) have
        and curricula    no native version: each is its own spec
"""
from __future__ import annotations

import math

import torch


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64 document index per token; tokens at or past cu_seqlens[-1] get B (= no doc)."""
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(total, device=cu.device)
    # number of boundaries <= t, minus one: the doc whose [cu[b], cu[b+1]) holds t (empty docs skipped)
    return torch.searchsorted(cu, t, right=True) - 1


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64 position of each token inside its document (restarts at 0 per document)."""
    cu = cu_seqlens.to(torch.int64)
    doc = doc_ids_from_cu_seqlens(cu, total).clamp(max=cu.numel() - 2)
    return torch.arange(total, device=cu.device) - cu[doc]


# ============================================================================ attention

def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, causal=True, softmax_scale=None,
                         window_size=(-1, -1), softcap=0.0, return_lse=False, upcast=True):
    """Document-masked attention over packed sequences, one document at a time.

    q: (total_q, H, D); k, v: (total_k, H_kv, D) with H % H_kv == 0; cu_seqlens_*: (B+1,) int.
    Semantics follow flash_attn_varlen_func:
      * in document b, query i (0-based in the doc) may see key j when
        j <= i + (s_k - s_q) + right  (right = 0 when causal)   and   j >= i + (s_k - s_q) - left,
        with -1 meaning unbounded (causal masks are aligned bottom-right);
      * scores s = (q.k) * softmax_scale, then softcap * tanh(s / softcap) when softcap > 0;
      * a query row with no visible key outputs 0 and has lse = +inf (as flash-attn); a visible key whose
        score is -inf weighs 0, so a row whose visible scores are all -inf counts as having none;
      * tokens at or after cu_seqlens_q[-1] output 0 with lse = +inf.
    Non-finite inputs (IEEE arithmetic, confined to what depends on them; see notes/attention.md):
      * a NaN (or +inf) score of a visible key makes its row's out and lse NaN; a NaN q[i] does so to row i;
      * a non-finite v[j, :, d] reaches out[i, :, d] exactly for the rows i that see key j (p * v over visible
        keys only: the 0 * NaN of a masked key never reaches a row that cannot see it);
      * nothing crosses documents, windows or the causal boundary, in the forward and the backward (the
        gradients sum over visible pairs only: _ConfinedScores, _ConfinedPV).
    Returns out (total_q, H, D) in q.dtype, and lse (H, total_q) fp32 when return_lse.
    """
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    total_q, H, D = q.shape
    H_kv = k.shape[1]
    group = H // H_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    left, right = window_size
    if causal:
        right = 0
    cdt = torch.float32 if upcast else q.dtype
    out = torch.zeros(total_q, H, D, dtype=cdt, device=q.device)
    lse = torch.full((H, total_q), float("inf"), dtype=torch.float32, device=q.device)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        sq, sk = q1 - q0, k1 - k0
        if sq == 0:
            continue
        qd = q[q0:q1].to(cdt).transpose(0, 1)                                      # (H, sq, D)
        kd = k[k0:k1].to(cdt).repeat_interleave(group, dim=1).transpose(0, 1)       # (H, sk, D)
        vd = v[k0:k1].to(cdt).repeat_interleave(group, dim=1).transpose(0, 1)       # (H, sk, D)
        i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=q.device)[None, :]
        visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if right >= 0:
            visible &= j <= i + right
        if left >= 0:
            visible &= j >= i - left
        if bool(torch.isfinite(qd).all()) and bool(torch.isfinite(kd).all()):
            s = (qd @ kd.transpose(1, 2)) * scale    # finite q, k: dS is 0 at masked pairs, nothing to confine
        else:
            s = _ConfinedScores.apply(qd, kd, visible) * scale                      # (H, sq, sk)
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~visible, float("-inf"))
        empty = (s == float("-inf")).all(dim=-1)                                    # (H, sq) no key (NaN: not empty)
        p = torch.softmax(s, dim=-1).masked_fill(empty[..., None], 0.0)             # NaN rows stay NaN
        out[q0:q1] = _ConfinedPV.apply(p, vd, visible).transpose(0, 1)
        row_lse = torch.logsumexp(s.float(), dim=-1)                                # (H, sq)
        row_lse = row_lse.masked_fill(p.isnan().any(dim=-1), float("nan"))         # +inf score: NaN as out
        lse[:, q0:q1] = row_lse.masked_fill(empty, float("inf"))
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _confined_mm(a, b, mask):
    """sum_j a[h, i, j] * b[h, j, d] over the pairs (i, j) where mask[i, j], in IEEE arithmetic: (H, m, d).

    a (H, m, n), b (H, n, d), mask (m, n) bool. A plain matmul would also carry 0 * NaN (or 0 * inf) from the
    pairs outside the mask. Finite values of b take the matmul (a zeroed outside the mask); its non-finite values
    (rare) are added per pair inside the mask."""
    a = a.masked_fill(~mask, 0.0)
    bad = ~torch.isfinite(b)                                                         # (H, n, d)
    if not bool(bad.any()):
        return a @ b
    cols = bad.any(dim=-1).any(dim=0).nonzero()[:, 0]                                # j with a non-finite b[j]
    out = a @ b.masked_fill(bad, 0.0)
    bb = b[:, cols].masked_fill(~bad[:, cols], 0.0)                                  # (H, J, d) non-finite only
    terms = a[:, :, cols, None] * bb[:, None]                                        # (H, m, J, d)
    return out + torch.where(mask[None, :, cols, None], terms, torch.zeros_like(terms)).sum(dim=2)


class _ConfinedScores(torch.autograd.Function):
    """s = q @ k^T (H, sq, sk) whose backward sums over visible (query, key) pairs only: dq = dS k and
    dk = dS^T q through _confined_mm, so a NaN q or k reaches only the gradients of tokens that see it."""

    @staticmethod
    def forward(q, k, mask):
        return q @ k.transpose(1, 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, mask = inputs
        ctx.save_for_backward(q, k)
        ctx.mask = mask

    @staticmethod
    def backward(ctx, g):
        q, k = ctx.saved_tensors
        return _confined_mm(g, k, ctx.mask), _confined_mm(g.transpose(1, 2), q, ctx.mask.T), None


class _ConfinedPV(torch.autograd.Function):
    """out = p @ v (H, sq, D) over visible pairs only (see _confined_mm), forward and backward (dp = dO v^T on
    visible pairs, dv = p^T dO over the rows that see each key)."""

    @staticmethod
    def forward(p, v, mask):
        return _confined_mm(p, v, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, v, mask = inputs
        ctx.save_for_backward(p, v)
        ctx.mask = mask

    @staticmethod
    def backward(ctx, g):
        p, v = ctx.saved_tensors
        dp = (g @ v.transpose(1, 2)).masked_fill(~ctx.mask, 0.0)
        return dp, _confined_mm(p.transpose(1, 2), g, ctx.mask.T), None


# ================================================================================= rope

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX / Hugging Face layout: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# The accurate range of the fp32 RoPE kernels: positions |p| < 2^24 (exact in fp32, and distinct from 2^24 + 1),
# and angles |position * inv_freq| up to 6.5e6 rad (their range reduction). Outside it every backend returns NaN
# for that angle (the public API refuses such positions wherever it sees them without a device sync); never a wrong
# rotation.
ROPE_MAX_POSITION = 2**24
ROPE_MAX_ANGLE = 6.5e6


def rope_cos_sin_ref(positions, inv_freq, attention_factor=1.0, *, interleaved=False, dtype=torch.float32):
    """The Hugging Face cos/sin cache: (T, rotary_dim) each, scaled by attention_factor.

    positions: (T,) int; inv_freq: (rotary_dim // 2,). Angles are formed in ``dtype``
    (fp32 by default; fp64 for a high-precision truth). Angles outside the accurate range
    (|position| >= ROPE_MAX_POSITION or |angle| > ROPE_MAX_ANGLE) give NaN.
    """
    freqs = positions.to(dtype)[:, None] * inv_freq.to(dtype)[None, :]             # (T, R/2)
    out_of_range = (positions.abs() >= ROPE_MAX_POSITION)[:, None] | (freqs.abs() > ROPE_MAX_ANGLE)
    freqs = freqs.masked_fill(out_of_range, float("nan"))
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope_ref(q, k, positions, inv_freq, attention_factor=1.0, *, interleaved=False, upcast=True,
                   compute_dtype=torch.float32):
    """Rotate q (..., T, H, D) and k (..., T, H_kv, D) by position; the spec of the rotation.

    positions: (T,) or broadcastable to q.shape[:-2]; inv_freq: (rotary_dim // 2,) where
    rotary_dim = 2 * len(inv_freq) <= D (dims past rotary_dim pass through unchanged).
    NeoX layout rotates (x[:R/2], x[R/2:R]); interleaved (GPT-J) rotates pairs (x[2i], x[2i+1]).
    ``upcast=True`` computes in compute_dtype; ``upcast=False`` rounds cos/sin to the input dtype
    and rotates in it, exactly as Hugging Face's eager code does. Returns tensors in q/k dtype.
    """
    R = 2 * inv_freq.numel()

    def rot(x):
        pos = positions.reshape(-1) if positions.dim() == 1 else positions
        cos, sin = rope_cos_sin_ref(pos.reshape(-1), inv_freq, attention_factor, interleaved=interleaved,
                                    dtype=compute_dtype)
        cos = cos.reshape(*positions.shape, 1, R)                                  # (..., T, 1, R)
        sin = sin.reshape(*positions.shape, 1, R)
        cdt = compute_dtype if upcast else x.dtype
        cos, sin = cos.to(cdt), sin.to(cdt)
        xr, xp = x[..., :R].to(cdt), x[..., R:]
        if interleaved:
            x2 = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
        else:
            x2 = rotate_half(xr)
        y = xr * cos + x2 * sin
        return torch.cat((y.to(x.dtype), xp), dim=-1)

    return rot(q), rot(k)
