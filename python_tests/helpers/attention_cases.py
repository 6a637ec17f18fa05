"""What do the attention tests run, and what counts as a pass? The one harness of every attention backend's tests.

  Case, CASES, SMALL_CASES  a problem (documents, heads, mask, dtype, layout) and the named tables of them
  make_inputs               q, k, v, dout, cu_seqlens of a Case (seeded; contiguous or strided views)
  truth, eager              the reference in fp64 and in the inputs' dtype (upcast=False)
  check_outputs             shapes, dtypes, flash-attn's tolerance rule and zero tail tokens for one run

flash-attn's tolerance rule (python_tests/helpers/tolerance.py), truth = the reference in fp64, eager = the
reference in the input dtype:
    max|kernel - truth| <= 2 * max|eager - truth| + atol, over the elements where truth is finite.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lengen_fast.reference import varlen_attention_ref

from .tolerance import assert_rule

NAMES = ("out", "lse", "dq", "dk", "dv")
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
FP32_ULP = 2.0 ** -23


@dataclass(frozen=True)
class Case:
    lens_q: tuple[int, ...]
    lens_k: Optional[tuple[int, ...]] = None      # None: same as lens_q (and cu_seqlens_k is not passed)
    H: int = 4
    H_kv: int = 2
    D: int = 64
    dtype: torch.dtype = torch.float32
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    scale: Optional[float] = None
    tail: int = 0                                 # tokens after cu_seqlens[-1] (q and k)
    # "contiguous"; "packed": q/k/v views of one (T, H + 2 H_kv, D) qkv, dout a (T, H, D) view with every stride
    # irregular (head-major, stride 2 along D); "strided": stride 2 along D for q, k, dout, and a permuted v
    layout: str = "contiguous"
    max_seqlen: Optional[tuple[int, int]] = None  # (q, k) hints passed through (they only pick tile shapes)


def small(lens_q, lens_k=None, **kw) -> Case:
    """A Case with interpreter-sized defaults (H=2, H_kv=1, D=32, fp16): cheap enough for Triton's interpreter,
    whose 16x16 tiles still make multi-tile documents out of a few dozen tokens."""
    return Case(tuple(lens_q), None if lens_k is None else tuple(lens_k), **{**dict(H=2, H_kv=1, D=32,
                                                                                  dtype=torch.float16), **kw})


def cu_seqlens(lens, device="cpu") -> torch.Tensor:
    """(B+1,) int32 offsets of documents of lengths ``lens``."""
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def make_inputs(c: Case, seed: int = 0, device="cpu"):
    """(q, k, v, dout, cu_q, cu_k); cu_k is None when c.lens_k is None. Values come from a CPU generator, so a
    seed gives the same inputs on every device."""
    g = torch.Generator().manual_seed(seed)
    lens_k = c.lens_k if c.lens_k is not None else c.lens_q
    Tq, Tk = sum(c.lens_q) + c.tail, sum(lens_k) + c.tail

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=c.dtype)

    if c.layout == "packed":
        assert Tq == Tk, "packed layout needs the same tokens on the q and k sides"
        qkv = rnd(Tq, c.H + 2 * c.H_kv, c.D)
        q, k, v = qkv[:, :c.H], qkv[:, c.H:c.H + c.H_kv], qkv[:, c.H + c.H_kv:]
        dout = rnd(c.H, Tq, 2 * c.D).transpose(0, 1)[..., ::2]          # (Tq, H, D), strides (2D, 2D Tq, 2)
    elif c.layout == "strided":
        q, k, v = rnd(Tq, c.H, c.D, 2)[..., 0], rnd(Tk, c.H_kv, c.D, 2)[..., 1], rnd(c.D, Tk, c.H_kv).permute(1, 2, 0)
        dout = rnd(Tq, c.H, 2 * c.D)[..., ::2]
    else:
        assert c.layout == "contiguous", c.layout
        q, k, v, dout = rnd(Tq, c.H, c.D), rnd(Tk, c.H_kv, c.D), rnd(Tk, c.H_kv, c.D), rnd(Tq, c.H, c.D)
    cu_q = cu_seqlens(c.lens_q, device)
    cu_k = cu_seqlens(c.lens_k, device) if c.lens_k is not None else None
    return q, k, v, dout, cu_q, cu_k


def reference(c: Case, inputs, dtype: torch.dtype) -> list[torch.Tensor]:
    """[out, lse, dq, dk, dv] of the reference computed in ``dtype`` (no upcast), gradients by autograd."""
    q, k, v, dout, cu_q, cu_k = inputs
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = varlen_attention_ref(*xs, cu_q, cu_k, causal=c.causal, softmax_scale=c.scale, window_size=c.window,
                                    softcap=c.softcap, return_lse=True, upcast=False)
    if out.requires_grad:                                                   # False when no token is in a document
        out.backward(dout.to(dtype))
    return [out, lse] + [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]


def truth(c: Case, inputs) -> list[torch.Tensor]:
    """The reference in fp64: what every backend is measured against."""
    return reference(c, inputs, torch.float64)


def eager(c: Case, inputs) -> list[torch.Tensor]:
    """The reference in the inputs' dtype: its error against truth sets the bound."""
    return reference(c, inputs, c.dtype)


def assert_within_rule(got, truth_, eager_, atol_of: Callable[[torch.Tensor], float], label: str) -> None:
    """got/truth/eager: (out, lse, dq, dk, dv). atol_of(truth_finite_values) -> atol. No NaN anywhere, and
    lse is +inf exactly where truth is (rows that see no key)."""
    for name, g_, t_, e_ in zip(NAMES, got, truth_, eager_):
        assert not torch.isnan(g_).any(), f"{name} has NaN"
        fin = torch.isfinite(t_)
        if name == "lse":
            assert torch.equal(torch.isinf(g_) & (g_ > 0), ~fin), "lse +inf pattern"
        if not fin.any():
            continue
        assert_rule(g_, t_, e_, atol_of(t_[fin]), f"{name}: {label}", mask=fin)


def backend_atol(c: Case) -> Callable[[torch.Tensor], float]:
    """The absolute slack for a kernel that accumulates in fp32: ATOL[dtype] + 2 fp32 ulps of max|truth|."""
    return lambda t: ATOL[c.dtype] + 2 * FP32_ULP * t.abs().max().item()


def run_op(c: Case, inputs, backend=None, deterministic: bool = False) -> list[torch.Tensor]:
    """lengen_fast.varlen_attention on ``inputs`` (make_inputs) with the case's options, forward and backward:
    [out, lse, dq, dk, dv]. q, k, v are detached copies, so the inputs are untouched."""
    from lengen_fast import varlen_attention
    q, k, v, dout, cu_q, cu_k = inputs
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    max_q, max_k = c.max_seqlen or (None, None)
    out, lse = varlen_attention(*xs, cu_q, cu_k, max_q, max_k, causal=c.causal, softmax_scale=c.scale,
                                window_size=c.window, softcap=c.softcap, return_lse=True, deterministic=deterministic,
                                backend=backend)
    out.backward(dout)
    return [out, lse] + [x.grad for x in xs]


def check_outputs(c: Case, inputs, got, atol_of: Callable[[torch.Tensor], float], label: str) -> None:
    """One backend run ``got`` = (out, lse, dq, dk, dv) on ``inputs``: shapes and dtypes, the tolerance rule against
    the fp64 reference, and zero outputs and gradients for tail tokens (after cu_seqlens[-1])."""
    q, k, v, dout, cu_q, cu_k = inputs
    out, lse, dq, dk, dv = got
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (c.H, q.shape[0]) and lse.dtype == torch.float32
    for g_, x in ((dq, q), (dk, k), (dv, v)):
        assert g_.shape == x.shape and g_.dtype == x.dtype
    assert_within_rule(got, truth(c, inputs), eager(c, inputs), atol_of, label)
    nq = int(cu_q[-1])
    nk = int((cu_k if cu_k is not None else cu_q)[-1])
    for name, x in (("out", out[nq:]), ("dq", dq[nq:]), ("dk", dk[nk:]), ("dv", dv[nk:])):
        assert torch.count_nonzero(x) == 0, f"tail tokens: {name} not zero"


# ---------------------------------------------------------------------------------------------- case tables

# Sized for the C++ CPU backend: documents longer than its 64-row tiles, large head dims.
CASES = {
    # zero-length and single-token docs, a doc longer than a 64-row tile, tail tokens, GQA
    "mixed_causal_gqa": Case((0, 1, 150, 0, 5, 1, 70), tail=3),
    "mixed_noncausal": Case((0, 1, 150, 5, 70), causal=False, tail=2),
    # one document covering every token (several tiles in both directions)
    "single_doc": Case((200,), H=2, H_kv=2),
    # s_q != s_k: bottom-right causal; s_k = 0, s_q = 0, and s_q > s_k (leading rows see nothing)
    "sq_ne_sk_causal": Case((10, 130, 5, 0, 7), (70, 12, 0, 9, 7), tail=2),
    "sq_ne_sk_noncausal": Case((10, 130, 5), (70, 12, 0), causal=False),
    # MQA (one KV head) with a window smaller than a tile
    "window_mqa": Case((140, 3), causal=False, window=(5, 3), H=3, H_kv=1),
    "causal_window_left": Case((150, 20), window=(7, -1), tail=1),
    "window_right_only": Case((90, 9), causal=False, window=(-1, 2)),
    # one visible key per row: P is one-hot, eager's dS is exactly 0 and the kernel's must be too
    "window_diagonal_only": Case((140, 1), D=16, window=(0, -1), H=2, H_kv=1),
    "softcap": Case((100, 17), window=(30, -1), softcap=5.0, tail=1),
    "softcap_noncausal_scale": Case((80, 17), causal=False, softcap=2.0, scale=0.4),
    # non-contiguous inputs: views of a packed qkv and an irregularly strided dout; stride 2 along D; permuted v
    "packed_qkv_views": Case((19, 0, 96), H=2, H_kv=1, scale=0.3, tail=2, layout="packed"),
    "strided_head_dim": Case((33, 70), (40, 70), layout="strided", tail=1),
    # head dims that are not a multiple of the 16-float vector, and large ones
    "d8": Case((70, 3), D=8),
    "d40": Case((70, 3), D=40, H_kv=1),
    "d128": Case((100,), D=128, H=2, H_kv=1),
    "d256": Case((70,), D=256, H=1, H_kv=1, causal=False),
    # documents of more than 1024 keys: the C++ backward splits their keys into chunks (units of its own) whose dq
    # partial sums are added in chunk order; causal + GQA, a window with s_q != s_k, non-causal with softcap
    "multichunk_causal_gqa": Case((1100, 17, 0, 300), H=4, H_kv=2, D=32, tail=2),
    "multichunk_window_sq_ne_sk": Case((1040, 40), (1300, 30), H=2, H_kv=1, D=32, window=(200, -1)),
    "multichunk_noncausal_softcap": Case((1030, 5), causal=False, H=2, H_kv=2, D=32, softcap=4.0),
    # a 2,000-token document: dv / dk of a key sum ~2,000 query rows (one fp32 chain of that length gave 1.4x the
    # bound on dv; the kernels now sum each tile from 0 and add tile sums)
    "long_doc_2000": Case((2000,), H=2, H_kv=2, D=64),
    # half precision (fp32 accumulation inside)
    "fp16": Case((0, 1, 130, 20), dtype=torch.float16, tail=2),
    "bf16": Case((0, 1, 130, 20), dtype=torch.bfloat16, tail=2, window=(40, -1)),
    "bf16_softcap_packed": Case((50, 30), dtype=torch.bfloat16, softcap=3.0, layout="packed", H=2, H_kv=1),
}

# Sized for Triton's interpreter (16x16 tiles on CPU); every backend runs them. No bf16: the interpreter's tl.dot
# on bf16 operands is wrong (shared/DESIGN.md), so bf16 kernels are GPU tests.
SMALL_CASES = {
    # zero-length and single-token docs, docs longer than a tile, tail tokens, GQA
    "mixed_causal_gqa": small((0, 1, 37, 5, 20), H=4, H_kv=2, tail=3),
    "mixed_fp32_noncausal": small((0, 1, 37, 5, 20), dtype=torch.float32, causal=False, tail=2),
    # s_q != s_k: bottom-right causal; a doc with s_k = 0 and one with s_q > s_k (rows that see nothing)
    "sq_ne_sk_causal": small((10, 30, 5), (20, 12, 0), tail=2),
    # window smaller than a tile, MQA (one KV head)
    "window_mqa": small((40, 3), causal=False, window=(5, 3), H=3, H_kv=1),
    "window_right_only_fp32": small((30, 9), dtype=torch.float32, causal=False, window=(-1, 2)),
    "causal_window_softcap_fp32": small((33, 17), dtype=torch.float32, window=(7, -1), softcap=5.0, tail=1),
    # one doc covers the batch; head dim padded to a power of two
    "single_doc_d48": small((50,), D=48),
    # strided views of a packed qkv, irregularly strided dout, custom scale
    "packed_qkv_views": small((19, 0, 26), scale=0.3, tail=2, layout="packed"),
    # the cases the public op runs on the Triton backend
    "fp16_causal_gqa": small((0, 1, 37, 5), tail=2),
    "fp32_window_softcap_sq_ne_sk": small((20, 9), (12, 30), H_kv=2, D=16, dtype=torch.float32, causal=False,
                                          window=(4, 3), softcap=2.0),
    "fp32_packed_qkv": small((19, 0, 26), D=16, dtype=torch.float32, layout="packed", tail=1),
}
