"""Which @triton.jit helpers do the forward and backward kernels share? Row loads, document bounds, the visible
key/query range of a tile and its masked/unmasked phases, the score tile (scale, softcap) and its mask, tanh, the
compensated dot, and ``LOG2E``; plus the host-side constants those helpers take (:func:`score_params`,
:func:`mask_flags`), so both kernels scale and mask scores the same way.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

# log2(e): the kernels run the softmax in base 2 (exp2 of scores pre-scaled by LOG2E). A constexpr so that jit code
# can read it as a global; host code uses LOG2E.value.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def load_rows(ptrs, rows, n, dmask, MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile: rows >= n read as 0 when MASK (edge tiles), head-dim padding when not EVEN_D."""
    if MASK:
        m = (rows < n)[:, None]
        if not EVEN_D:
            m = m & dmask
        x = tl.load(ptrs, mask=m, other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=dmask, other=0.0)
    return x


@triton.jit
def row_mask(ok, dmask, EVEN_D: tl.constexpr):
    """(rows, BLOCK_D) mask of a tile: rows where ``ok`` (rows,), and the real head dims when not EVEN_D."""
    m = ok[:, None]
    if not EVEN_D:
        m = m & dmask
    return m


@triton.jit
def doc_bounds(CU_Q, CU_K, doc):
    """(q0, sq, k0, sk): first token and length of document ``doc`` on the query and key sides."""
    q0 = tl.load(CU_Q + doc)
    k0 = tl.load(CU_K + doc)
    return q0, tl.load(CU_Q + doc + 1) - q0, k0, tl.load(CU_K + doc + 1) - k0


@triton.jit
def visible_range(lo_row, hi_row, n, diff, win_left, win_right, BLOCK: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Columns in [0, n) that rows lo_row..hi_row (inclusive) see, as BLOCK-aligned loop bounds
    (start, full_lo, full_hi, hi): tiles in [full_lo, full_hi) are visible to every row (no mask),
    [start, full_lo) and [full_hi, hi) need the mask. Row i sees column j iff
    i + diff - left <= j <= i + diff + right. For the transposed question (the rows that see a column
    tile) call it with -diff and the window sides swapped."""
    lo = lo_row * 0
    hi = n + lo
    full_lo = lo
    full_hi = (n // BLOCK) * BLOCK
    if HAS_LEFT:
        lo = tl.minimum(tl.maximum(lo_row + diff - win_left, 0), n)
        full_lo = tl.cdiv(tl.maximum(hi_row + diff - win_left, 0), BLOCK) * BLOCK
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(hi_row + diff + win_right + 1, 0), n)
        full_hi = (tl.minimum(tl.maximum(lo_row + diff + win_right + 1, 0), n) // BLOCK) * BLOCK
    start = (lo // BLOCK) * BLOCK
    full_lo = tl.minimum(tl.maximum(full_lo, start), tl.maximum(hi, start))
    full_hi = tl.maximum(full_hi, full_lo)
    return start, full_lo, full_hi, hi


@triton.jit
def phase_range(phase: tl.constexpr, start, full_lo, full_hi, hi):
    """Loop bounds of phase 0 (masked [start, full_lo)), 1 (unmasked [full_lo, full_hi)) or 2 (masked [full_hi, hi))."""
    if phase == 0:
        return start, full_lo
    elif phase == 1:
        return full_lo, full_hi
    else:
        return full_hi, hi


@triton.jit
def tanh_f32(x):
    # exp-based so that it runs in the interpreter as on GPU; saturates to +-1 without NaN
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def dot_acc(a, b, acc, comp, DOT_PREC: tl.constexpr):
    """(acc + a @ b, compensation). fp32 ("ieee"): an FMA dot chained through ``acc`` rounds once per term of
    the whole document (dv of a 1500-token document had 2.4x eager fp32's error on an H100), and Triton folds a
    plain ``acc + dot(a, b)`` back into that chain, so the tile products are Kahan-summed instead. 16-bit:
    the MMA accumulates in fp32 and ``comp`` passes through unused."""
    if DOT_PREC == "ieee":
        y = tl.dot(a, b, input_precision=DOT_PREC) - comp
        t = acc + y
        return t, (t - acc) - y
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC), comp


@triton.jit
def scores(a, b, qk_scale2, cap2, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """a @ b^T as (s, mult, t): s * mult is the score in base-2 units, i.e. log2(e) * softmax_scale * a.b
    (soft-capped). Without softcap s is the raw product and mult = scale * log2(e), so callers fuse
    the scaling into one FMA (s * mult - m); with softcap mult = 1 and t = tanh (for the chain rule)."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    if SOFTCAP:
        t = tanh_f32(s * qk_scale2)              # qk_scale2 = scale / cap, cap2 = cap * log2(e)
        s = cap2 * t
        mult = 1.0
    else:
        t = s                                     # unused
        mult = qk_scale2                          # qk_scale2 = scale * log2(e)
    return s, mult, t


@triton.jit
def add_nonfinite(acc, a, b32, finite, vis):
    """acc (BM, D) plus, as IEEE sums them, the non-finite values of b32 (BN, D) fp32 (``finite`` its mask) weighted
    by a (BM, BN) over the pairs that ``vis`` (BM, BN) allows: +-inf times a nonzero weight, NaN, and 0 * inf = NaN.
    Which entries get +inf / -inf / NaN comes from 0/1 dots (counts, exact in fp32), folded in one at a time."""
    pos = (vis & (a > 0)).to(tl.float16)
    neg = (vis & (a < 0)).to(tl.float16)
    p_inf = (b32 == float("inf")).to(tl.float16)
    n_inf = (b32 == -float("inf")).to(tl.float16)
    hits = tl.dot(pos, p_inf) + tl.dot(neg, n_inf)
    acc = tl.where(hits > 0, acc + float("inf"), acc)
    hits = tl.dot(pos, n_inf) + tl.dot(neg, p_inf)
    acc = tl.where(hits > 0, acc - float("inf"), acc)
    hits = tl.dot((vis & (a == 0)).to(tl.float16), (finite == 0).to(tl.float16)) \
        + tl.dot(vis.to(tl.float16), (b32 != b32).to(tl.float16))
    return tl.where(hits > 0, float("nan"), acc)


@triton.jit
def dot_acc_confined(a, b, vis, acc, comp, KAHAN: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a @ b (a (BM, BN), b (BN, D)) summed over the pairs that ``vis`` allows, for tiles that straddle the
    mask; returns (acc, comp) as dot_acc (KAHAN) or a plain chained dot (comp passes through).

    a is 0 outside vis, but the dot would still carry 0 * NaN (or 0 * inf) from a masked key's (or query's)
    non-finite value into a row that cannot see it. All-finite tiles (the usual case) take the plain dot after
    one scan of b; otherwise the finite values take the dot and the non-finite ones go through add_nonfinite."""
    b32 = b.to(tl.float32)
    finite = tl.abs(b32) < float("inf")                                            # False for NaN and +-inf
    n_bad = tl.sum(tl.sum(tl.where(finite, 0, 1), 1), 0)
    if n_bad == 0:
        bb = b
    else:
        bb = tl.where(finite, b32, 0.0).to(b.dtype)
    if KAHAN:
        acc, comp = dot_acc(a.to(b.dtype), bb, acc, comp, DOT_PREC)
    else:
        acc = tl.dot(a.to(b.dtype), bb, acc, input_precision=DOT_PREC)
    if n_bad != 0:
        acc = add_nonfinite(acc, a, b32, finite, vis)
    return acc, comp


@triton.jit
def visible(rows, cols, diff, win_left, win_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Broadcast mask of (rows, cols) index tensors (e.g. (BM, 1) and (1, BN)): query i sees key j iff
    i + diff - left <= j <= i + diff + right, with diff = s_k - s_q (bottom-right alignment)."""
    r = rows + diff
    vis = cols >= 0
    if HAS_RIGHT:
        vis = vis & (cols <= r + win_right)
    if HAS_LEFT:
        vis = vis & (cols >= r - win_left)
    return vis


def score_params(head_dim: int, softmax_scale: float | None, softcap: float) -> tuple[float, float, float]:
    """(scale, qk_scale2, cap2) as the kernels use them (base-2 softmax)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if softcap > 0:
        return scale, scale / softcap, softcap * LOG2E.value
    return scale, scale * LOG2E.value, 0.0


def mask_flags(causal: bool, window_left: int, window_right: int) -> tuple[int, int, bool, bool]:
    """(left, right, HAS_LEFT, HAS_RIGHT); causal means right = 0 (bottom-right aligned)."""
    right = 0 if causal else window_right
    return window_left, right, window_left >= 0, right >= 0
