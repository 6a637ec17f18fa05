"""lengen_fast.varlen_attention (public op, custom-op registration, C++ CPU backend) against the reference.

Tolerance (flash-attn's rule), truth = the reference computed in fp64:
    max|backend - truth| <= 2 * max|eager_same_dtype - truth| + atol
where eager_same_dtype is the reference run in the inputs' dtype (upcast=False). Checked for out, lse, dq, dk, dv.
atol = ATOL[dtype] + 2 fp32 ulps of max|truth|: every backend accumulates in fp32, and the flash backward recomputes
P = exp(s - lse) from the fp32 lse (|lse| ~ 5 carries ~0.5 ulp of relative error into every P of its row) and
forms dS from the output O rather than eager's sum(P * dP). The C++ backward forms dP - delta as sum_d dO (V - O)
(exact 0 where a row sees one key) and runs 16-bit inputs in fp32 on an fp32 recompute of O.
"""
import inspect
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lengen_fast
from lengen_fast import attention, backends, varlen_attention
from lengen_fast.reference import varlen_attention_ref

from helpers.attention_rule import ATOL, assert_within_rule

FP32_ULP = 2.0 ** -23
HAS_TRITON = "triton" in attention._supported() and backends.available("attention", "triton", torch.device("cpu"))


@dataclass(frozen=True)
class Case:
    lens_q: tuple
    lens_k: Optional[tuple] = None          # None: same as lens_q
    H: int = 4
    H_kv: int = 2
    D: int = 64
    dtype: torch.dtype = torch.float32
    causal: bool = True
    window: tuple = (-1, -1)
    softcap: float = 0.0
    scale: Optional[float] = None
    tail: int = 0                           # tokens after cu_seqlens[-1] (q and k)
    layout: str = "contiguous"              # "packed": views of one (T, H + 2 H_kv, D) qkv; "strided": D stride 2


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(c: Case, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lens_k = c.lens_k if c.lens_k is not None else c.lens_q
    Tq, Tk = sum(c.lens_q) + c.tail, sum(lens_k) + c.tail

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=c.dtype)

    if c.layout == "packed":
        assert Tq == Tk
        qkv = rnd(Tq, c.H + 2 * c.H_kv, c.D)
        q, k, v = qkv[:, :c.H], qkv[:, c.H:c.H + c.H_kv], qkv[:, c.H + c.H_kv:]
        dout = rnd(c.H, Tq, c.D).transpose(0, 1)                           # (Tq, H, D), token stride D
    elif c.layout == "strided":
        q, k, v = rnd(Tq, c.H, c.D, 2)[..., 0], rnd(Tk, c.H_kv, c.D, 2)[..., 1], rnd(c.D, Tk, c.H_kv).permute(1, 2, 0)
        dout = rnd(Tq, c.H, 2 * c.D)[..., ::2]
    else:
        q, k, v, dout = rnd(Tq, c.H, c.D), rnd(Tk, c.H_kv, c.D), rnd(Tk, c.H_kv, c.D), rnd(Tq, c.H, c.D)
    cu_q = _cu(c.lens_q).to(device)
    cu_k = _cu(c.lens_k).to(device) if c.lens_k is not None else None
    return q, k, v, dout, cu_q, cu_k


def _run(c: Case, q, k, v, dout, cu_q, cu_k, backend, deterministic=False):
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = varlen_attention(*xs, cu_q, cu_k, causal=c.causal, softmax_scale=c.scale, window_size=c.window,
                                softcap=c.softcap, return_lse=True, deterministic=deterministic, backend=backend)
    out.backward(dout)
    return [out, lse] + [x.grad for x in xs]


def _reference(c: Case, q, k, v, dout, cu_q, cu_k, dtype):
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = varlen_attention_ref(*xs, cu_q, cu_k, causal=c.causal, softmax_scale=c.scale, window_size=c.window,
                                    softcap=c.softcap, return_lse=True, upcast=False)
    if out.requires_grad:                                                   # False when no token is in a document
        out.backward(dout.to(dtype))
    return [out, lse] + [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]


def _check(c: Case, backend="cpu", seed=0, device="cpu"):
    q, k, v, dout, cu_q, cu_k = _inputs(c, seed, device)
    before = [x.clone() for x in (q, k, v, dout)]
    got = _run(c, q, k, v, dout, cu_q, cu_k, backend)
    for x, b in zip((q, k, v, dout), before):                               # out-of-place
        assert torch.equal(x, b)
    truth = _reference(c, q, k, v, dout, cu_q, cu_k, torch.float64)
    eager = _reference(c, q, k, v, dout, cu_q, cu_k, c.dtype)
    out, lse, dq, dk, dv = got
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (c.H, q.shape[0]) and lse.dtype == torch.float32
    assert out.requires_grad and not lse.requires_grad                      # lse is not differentiable
    for g_, x in ((dq, q), (dk, k), (dv, v)):
        assert g_.shape == x.shape and g_.dtype == x.dtype
    assert_within_rule(got, truth, eager, lambda t: ATOL[c.dtype] + 2 * FP32_ULP * t.abs().max().item(), backend)
    nq = int(cu_q[-1])
    nk = int((cu_k if cu_k is not None else cu_q)[-1])
    for name, x in (("out", out[nq:]), ("dq", dq[nq:]), ("dk", dk[nk:]), ("dv", dv[nk:])):
        assert torch.count_nonzero(x) == 0, f"tail tokens: {name} not zero"
    return got


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
    # non-contiguous inputs: views of a packed qkv and a transposed dout; stride 2 along D; permuted v
    "packed_qkv_views": Case((19, 0, 96), H=2, H_kv=1, scale=0.3, tail=2, layout="packed"),
    "strided_head_dim": Case((33, 70), (40, 70), layout="strided", tail=1),
    # head dims that are not a multiple of the 16-float vector, and large ones
    "d8": Case((70, 3), D=8),
    "d40": Case((70, 3), D=40, H_kv=1),
    "d128": Case((100,), D=128, H=2, H_kv=1),
    "d256": Case((70,), D=256, H=1, H_kv=1, causal=False),
    # half precision (fp32 accumulation inside)
    "fp16": Case((0, 1, 130, 20), dtype=torch.float16, tail=2),
    "bf16": Case((0, 1, 130, 20), dtype=torch.bfloat16, tail=2, window=(40, -1)),
    "bf16_softcap_packed": Case((50, 30), dtype=torch.bfloat16, softcap=3.0, layout="packed", H=2, H_kv=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_matches_reference(name):
    _check(CASES[name])


@pytest.mark.parametrize("name", ["mixed_causal_gqa", "sq_ne_sk_causal", "softcap"])
def test_reference_backend_through_op(name):
    c = CASES[name]
    _check(replace(c, lens_q=tuple(min(x, 40) for x in c.lens_q),
                   lens_k=None if c.lens_k is None else tuple(min(x, 40) for x in c.lens_k)), backend="reference")


def test_all_tail_tokens():
    c = Case((0,), tail=5)
    q, k, v, dout, cu_q, _ = _inputs(c)
    out, lse, dq, dk, dv = _run(c, q, k, v, dout, cu_q, None, "cpu")
    assert torch.isinf(lse).all() and (lse > 0).all()
    for x in (out, dq, dk, dv):
        assert torch.count_nonzero(x) == 0


def test_no_documents_and_no_tokens():
    c = Case(())
    q, k, v, dout, cu_q, _ = _inputs(c)
    assert q.shape[0] == 0
    out, lse, dq, dk, dv = _run(c, q, k, v, dout, cu_q, None, "cpu")
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0) and dk.shape == (0, 2, 64)


def test_deterministic_backward_bitwise():
    c = Case((300, 5, 130), H=8, H_kv=1, window=(90, -1), softcap=4.0, tail=1)
    q, k, v, dout, cu_q, cu_k = _inputs(c)
    first = _run(c, q, k, v, dout, cu_q, cu_k, "cpu", deterministic=True)
    second = _run(c, q, k, v, dout, cu_q, cu_k, "cpu", deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_default_backend_on_cpu_is_cpp():
    assert backends.select("attention", torch.device("cpu"), supported=attention._supported()) == "cpu"


def test_int64_cu_seqlens_and_max_seqlen_hints():
    c = Case((30, 50))
    q, k, v, _, cu_q, _ = _inputs(c)
    a = varlen_attention(q, k, v, cu_q)
    b = varlen_attention(q, k, v, cu_q.long(), cu_q.long(), 50, 50)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- fuzzing

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_docs=st.integers(0, 5), causal=st.booleans(), tail=st.integers(0, 3),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), D=st.sampled_from([8, 16, 24, 64]),
       left=st.sampled_from([-1, 0, 3, 70]), right=st.sampled_from([-1, 0, 2]),
       softcap=st.sampled_from([0.0, 0.0, 3.0]), layout=st.sampled_from(["contiguous", "packed", "strided"]),
       dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16]), seed=st.integers(0, 1000))
def test_fuzz_layouts(data, n_docs, causal, tail, heads, D, left, right, softcap, layout, dtype, seed):
    lens = st.sampled_from([0, 1, 2, 15, 63, 64, 65, 140])
    lens_q = tuple(data.draw(st.lists(lens, min_size=n_docs, max_size=n_docs)))
    lens_k = None
    if layout != "packed" and data.draw(st.booleans()):
        lens_k = tuple(data.draw(st.lists(lens, min_size=n_docs, max_size=n_docs)))
    _check(Case(lens_q, lens_k, H=heads[0], H_kv=heads[1], D=D, dtype=dtype, causal=causal, window=(left, right),
                softcap=softcap, tail=tail, layout=layout), seed=seed)


# ------------------------------------------------------------------------------------------- Triton (interpreter)

@pytest.mark.skipif(not HAS_TRITON, reason="Triton attention kernels not importable here")
@pytest.mark.parametrize("case", [
    Case((0, 1, 37, 5), H=2, H_kv=1, D=32, dtype=torch.float16, tail=2),
    Case((20, 9), (12, 30), H=2, H_kv=2, D=16, causal=False, window=(4, 3), softcap=2.0),
    Case((19, 0, 26), H=2, H_kv=1, D=16, layout="packed", tail=1),
], ids=["fp16_causal_gqa", "fp32_window_softcap_sq_ne_sk", "fp32_packed_qkv"])
def test_triton_through_op(case):
    _check(case, backend="triton")


# ------------------------------------------------------------------------------------------- GPU (pytest -m gpu)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_public_op(dtype, D):
    _check(Case((1, 700, 0, 1500, 33, 129), H=8, H_kv=2, D=D, dtype=dtype, tail=17), backend=None, device="cuda")
    _check(Case((300, 0, 64), (200, 5, 64), H=4, H_kv=1, D=D, dtype=dtype, causal=False, window=(50, 7),
                softcap=10.0), backend=None, device="cuda")
    _check(Case((19, 0, 260), H=4, H_kv=2, D=D, dtype=dtype, tail=3, layout="packed"), backend=None, device="cuda")


@pytest.mark.gpu
def test_gpu_no_host_sync():
    c = Case((1, 700, 0, 300), H=8, H_kv=2, D=64, dtype=torch.bfloat16, tail=5)
    q, k, v, dout, cu_q, _ = _inputs(c, 0, "cuda")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    varlen_attention(q, k, v, cu_q).backward(dout)                          # warm-up: autotuning may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = varlen_attention(q, k, v, cu_q)
        torch.autograd.grad(out, (q, k, v), dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_compile_fullgraph_inductor():
    torch.manual_seed(0)
    model = TinyAttentionModel().cuda()
    x = torch.randn(45, 32, device="cuda")
    cu = _cu((20, 0, 1, 24)).cuda()
    eager = model(x, cu)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, cu), eager)


# ------------------------------------------------------------------------------------------- custom op / compile

def test_opcheck():
    c = Case((0, 9, 20), H=2, H_kv=1, D=16, tail=1)
    q, k, v, _, cu_q, _ = _inputs(c)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    args = (q, k, v, cu_q, cu_q, None, None, True, 0.25, -1, 0, 0.0, False, "cpu")
    torch.library.opcheck(torch.ops.lengen.varlen_attention_fwd.default, args)


class TinyAttentionModel(torch.nn.Module):
    def __init__(self, d_model=32, H=4, H_kv=2):
        super().__init__()
        self.H, self.H_kv, self.D = H, H_kv, d_model // H
        self.qkv = torch.nn.Linear(d_model, (H + 2 * H_kv) * self.D)
        self.proj = torch.nn.Linear(H * self.D, d_model)

    def forward(self, x, cu_seqlens):                                      # x (T, d_model)
        qkv = self.qkv(x).view(x.shape[0], self.H + 2 * self.H_kv, self.D)
        q, k, v = qkv.split([self.H, self.H_kv, self.H_kv], dim=1)
        o = lengen_fast.varlen_attention(q, k, v, cu_seqlens, window_size=(16, -1))
        return self.proj(o.reshape(x.shape[0], -1))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = TinyAttentionModel()
    x = torch.randn(45, 32)
    cu = _cu((20, 0, 1, 24))
    eager = model(x, cu)
    eager.sum().backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, cu)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), g_eager):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------------------------- bad input

def _good():
    q = torch.randn(10, 4, 64)
    k = torch.randn(10, 2, 64)
    return dict(q=q, k=k, v=torch.randn(10, 2, 64), cu_seqlens_q=_cu((4, 6)))


BAD = [
    ("cu_float", dict(cu_seqlens_q=torch.tensor([0.0, 4.0, 10.0])), TypeError, "cu_seqlens_q must be an integer"),
    ("cu_2d", dict(cu_seqlens_q=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError, "cu_seqlens_q must be 1-D"),
    ("cu_not_tensor", dict(cu_seqlens_q=[0, 4, 10]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    ("cu_start", dict(cu_seqlens_q=_cu((4, 6)) + 1), ValueError, "cu_seqlens_q must start at 0"),
    ("cu_decreasing", dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must be non-decreasing, but cu_seqlens_q\[2\] = 4"),
    ("cu_beyond", dict(cu_seqlens_q=_cu((4, 7))), ValueError, "cu_seqlens_q ends at 11, beyond the 10 tokens"),
    ("cu_k_beyond", dict(cu_seqlens_k=_cu((4, 9))), ValueError, "cu_seqlens_k ends at 13"),
    ("cu_k_len", dict(cu_seqlens_k=_cu((10,))), ValueError, "same length B\\+1"),
    ("cu_device", dict(cu_seqlens_q=_cu((4, 6)).to("meta")), ValueError, "cu_seqlens_q is on meta"),
    ("k_device", dict(k=torch.randn(10, 2, 64, device="meta")), ValueError, "k is on meta but q is on cpu"),
    ("heads", dict(k=torch.randn(10, 3, 64), v=torch.randn(10, 3, 64)), ValueError,
     "H=4 .* must be a multiple of .* H_kv=3"),
    ("head_dim_odd", dict(q=torch.randn(10, 4, 60), k=torch.randn(10, 2, 60), v=torch.randn(10, 2, 60)),
     ValueError, "unsupported head_dim 60"),
    ("head_dim_big", dict(q=torch.randn(10, 4, 512), k=torch.randn(10, 2, 512), v=torch.randn(10, 2, 512)),
     ValueError, "unsupported head_dim 512"),
    ("head_dim_mismatch", dict(k=torch.randn(10, 2, 32), v=torch.randn(10, 2, 32)), ValueError,
     r"head_dim of k \(32\) differs from q \(64\)"),
    ("dtype", dict(q=torch.randn(10, 4, 64, dtype=torch.float64)), TypeError, "q has unsupported dtype torch.float64"),
    ("dtype_int", dict(v=torch.ones(10, 2, 64, dtype=torch.int32)), TypeError, "v has unsupported dtype"),
    ("dtype_mismatch", dict(k=torch.randn(10, 2, 64, dtype=torch.float16)), TypeError,
     "q, k and v must have the same dtype"),
    ("q_2d", dict(q=torch.randn(10, 256)), ValueError, r"q must be 3-D \(total_tokens, heads, head_dim\)"),
    ("kv_shape", dict(v=torch.randn(9, 2, 64)), ValueError, "k and v must have the same shape"),
    ("window", dict(window_size=(-2, 0)), ValueError, "window_size must be a pair"),
    ("window_len", dict(window_size=(3,)), ValueError, "window_size must be a pair"),
    ("softcap", dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    ("scale", dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite number"),
    ("max_seqlen", dict(max_seqlen_q=-3), ValueError, "max_seqlen_q must be None or a non-negative int"),
    ("backend_unknown", dict(backend="cudnn"), ValueError, "backend='cudnn' is not one of"),
    ("backend_unavailable", dict(backend="cuda"), ValueError, "backend='cuda' is not implemented for op 'attention'"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, override, exc, match):
    kw = {**_good(), **override}
    q, k, v, cu = kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("cu_seqlens_q")
    with pytest.raises(exc, match=match):
        varlen_attention(q, k, v, cu, **kw)


def test_cpp_checks_cu_seqlens_values():
    # the C++ kernel repeats the value checks (they are skipped in Python while torch.compile traces)
    q, k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    bad = torch.tensor([0, 6, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        attention.attention_fwd_cpu(q, k, v, bad, bad, None, None, True, 0.25, -1, 0, 0.0)


# ------------------------------------------------------------------------------- flash-attn signature
FLASH_ATTN_PARAMS = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                     "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
                     "return_attn_probs", "block_table"]


def test_flash_attn_varlen_func_is_a_drop_in():
    """Same parameter order and defaults as flash_attn.flash_attn_varlen_func (2.6+), positional calls included."""
    sig = inspect.signature(lengen_fast.flash_attn_varlen_func)
    assert list(sig.parameters) == FLASH_ATTN_PARAMS
    assert sig.parameters["causal"].default is False and sig.parameters["dropout_p"].default == 0.0
    g = _good()
    q, k, v, cu = g["q"], g["k"], g["v"], g["cu_seqlens_q"]
    want, lse = varlen_attention(q, k, v, cu, cu, 6, 6, causal=True, softmax_scale=0.3, window_size=(3, 0),
                                 softcap=5.0, return_lse=True)
    got = lengen_fast.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, 0.0, 0.3, True, (3, 0), 5.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    out, lse2, probs = lengen_fast.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True, softmax_scale=0.3,
                                                           window_size=[3, 0], softcap=5.0, return_attn_probs=True)
    torch.testing.assert_close((out, lse2), (want, lse), rtol=0, atol=0)
    assert probs is None
    # flash-attn's default is non-causal
    full = varlen_attention(q, k, v, cu, causal=False)
    torch.testing.assert_close(lengen_fast.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6), full, rtol=0, atol=0)


@pytest.mark.parametrize("kw,match", [
    (dict(dropout_p=0.1), r"dropout_p=0.1 is not supported"),
    (dict(alibi_slopes=torch.ones(4)), "alibi_slopes is not supported"),
    (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), r"block_table \(paged KV cache\) is not supported"),
])
def test_flash_attn_varlen_func_unsupported_features(kw, match):
    g = _good()
    with pytest.raises(ValueError, match=match):
        lengen_fast.flash_attn_varlen_func(g["q"], g["k"], g["v"], g["cu_seqlens_q"], g["cu_seqlens_q"], 6, 6, **kw)
