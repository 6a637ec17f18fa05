"""lengen_fast.varlen_attention (public op, custom-op registration, C++ CPU backend) against the reference.

Cases, inputs, the fp64/same-dtype references and flash-attn's tolerance rule come from helpers/attention_cases.py:
    max|backend - truth| <= 2 * max|eager_same_dtype - truth| + atol
checked for out, lse, dq, dk, dv. Here atol = ATOL[dtype] + 2 fp32 ulps of max|truth|: every backend accumulates in
fp32, and the flash backward recomputes P = exp(s - lse) from the fp32 lse (|lse| ~ 5 carries ~0.5 ulp of relative
error into every P of its row) and forms dS from the output O rather than eager's sum(P * dP). The C++ backward forms
dP - delta as sum_d dO (V - O) (exact 0 where a row sees one key) and runs 16-bit inputs in fp32 on an fp32 recompute
of O.
"""
import inspect
import os
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lengen_fast
from lengen_fast import backends, varlen_attention
from lengen_fast.attention import op

from helpers.attention_cases import (CASES, SMALL_CASES, Case, backend_atol, check_outputs, cu_seqlens,
                                     make_inputs, run_op)
from helpers.subproc import pkg_env

HAS_TRITON = "triton" in op._supported() and backends.available("attention", "triton", torch.device("cpu"))


def _run(c: Case, q, k, v, dout, cu_q, cu_k, backend, deterministic=False):
    return run_op(c, (q, k, v, dout, cu_q, cu_k), backend, deterministic)


def _check(c: Case, backend="cpu", seed=0, device="cpu"):
    inputs = make_inputs(c, seed, device)
    q, k, v, dout, cu_q, cu_k = inputs
    before = [x.clone() for x in (q, k, v, dout)]
    got = _run(c, q, k, v, dout, cu_q, cu_k, backend)
    for x, b in zip((q, k, v, dout), before):                               # out-of-place
        assert torch.equal(x, b)
    out, lse = got[:2]
    assert out.requires_grad and not lse.requires_grad                      # lse is not differentiable
    check_outputs(c, inputs, got, backend_atol(c), backend)
    return got


@pytest.mark.parametrize("name", list(CASES) + [f"small_{n}" for n in SMALL_CASES])
def test_cpu_matches_reference(name):
    _check(SMALL_CASES[name[len("small_"):]] if name.startswith("small_") else CASES[name])


ISA_LEVELS = ["portable", "avx2", "avx512"]
ISA_CASES = ["mixed_causal_gqa", "softcap", "d8", "d40", "d128", "strided_head_dim", "window_diagonal_only",
             "multichunk_causal_gqa"]


@pytest.mark.parametrize("level", ISA_LEVELS)
@pytest.mark.parametrize("name", ISA_CASES)
def test_cpu_isa_paths_match_reference(name, level, monkeypatch):
    # The C++ kernels are compiled once per ISA (different vector widths and register blocks); the default run
    # covers the detected best one, this forces each level the CPU has (LENGEN_CPU_ISA is read on every call).
    ext = backends.cpu_ext()
    if ext is None:
        pytest.skip("lengen_fast._C not built")
    best = ext.cpu_isa_detected()
    if ISA_LEVELS.index(level) > ISA_LEVELS.index(best):
        pytest.skip(f"this CPU has no {level} (best: {best})")
    monkeypatch.setenv("LENGEN_CPU_ISA", level)
    assert ext.cpu_isa() == level
    _check(CASES[name])


@pytest.mark.parametrize("name", ["mixed_causal_gqa", "sq_ne_sk_causal", "softcap"])
def test_reference_backend_through_op(name):
    c = CASES[name]
    _check(replace(c, lens_q=tuple(min(x, 40) for x in c.lens_q),
                   lens_k=None if c.lens_k is None else tuple(min(x, 40) for x in c.lens_k)), backend="reference")


def test_all_tail_tokens():
    c = Case((0,), tail=5)
    q, k, v, dout, cu_q, _ = make_inputs(c)
    out, lse, dq, dk, dv = _run(c, q, k, v, dout, cu_q, None, "cpu")
    assert torch.isinf(lse).all() and (lse > 0).all()
    for x in (out, dq, dk, dv):
        assert torch.count_nonzero(x) == 0


def test_no_documents_and_no_tokens():
    c = Case(())
    q, k, v, dout, cu_q, _ = make_inputs(c)
    assert q.shape[0] == 0
    out, lse, dq, dk, dv = _run(c, q, k, v, dout, cu_q, None, "cpu")
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0) and dk.shape == (0, 2, 64)


def test_deterministic_backward_bitwise():
    c = Case((300, 5, 130), H=8, H_kv=1, window=(90, -1), softcap=4.0, tail=1)
    q, k, v, dout, cu_q, cu_k = make_inputs(c)
    first = _run(c, q, k, v, dout, cu_q, cu_k, "cpu", deterministic=True)
    second = _run(c, q, k, v, dout, cu_q, cu_k, "cpu", deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


_BITS_SCRIPT = """
import hashlib, sys, torch
sys.path[:0] = sys.argv[1:2]
from helpers.attention_cases import Case, make_inputs, run_op
c = Case((1100, 16, 16, 0, 300, 5), H=4, H_kv=2, D=32, window=(600, -1), softcap=4.0, tail=1)
got = run_op(c, make_inputs(c, seed=3), "cpu", deterministic=True)
print(hashlib.sha256(b"".join(x.detach().contiguous().numpy().tobytes() for x in got)).hexdigest())
"""


def test_deterministic_across_thread_counts():
    # Every gradient element is summed in an order fixed by the document lengths alone (dk/dv in one unit; dq of
    # a long document in key chunks added in chunk order), so 1 and 3 OpenMP threads give the same bits.
    import subprocess
    import sys
    from pathlib import Path
    tests = Path(__file__).resolve().parent
    env = pkg_env()
    digests = set()
    for n in ("1", "3"):
        r = subprocess.run([sys.executable, "-c", _BITS_SCRIPT, str(tests)], env={**env, "OMP_NUM_THREADS": n},
                           cwd=tests, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        digests.add(r.stdout.strip())
    assert len(digests) == 1


def test_default_backend_on_cpu_is_cpp():
    assert backends.select("attention", torch.device("cpu"), supported=op._supported()) == "cpu"


def test_int64_cu_seqlens_and_max_seqlen_hints():
    c = Case((30, 50))
    q, k, v, _, cu_q, _ = make_inputs(c)
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
@pytest.mark.parametrize("name", ["fp16_causal_gqa", "fp32_window_softcap_sq_ne_sk", "fp32_packed_qkv"])
def test_triton_through_op(name):
    _check(SMALL_CASES[name], backend="triton")


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
    q, k, v, dout, cu_q, _ = make_inputs(c, 0, "cuda")
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
    cu = cu_seqlens((20, 0, 1, 24)).cuda()
    eager = model(x, cu)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, cu), eager)


# ------------------------------------------------------------------------------------------- custom op / compile

def test_opcheck():
    c = Case((0, 9, 20), H=2, H_kv=1, D=16, tail=1)
    q, k, v, _, cu_q, _ = make_inputs(c)
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
    cu = cu_seqlens((20, 0, 1, 24))
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
    return dict(q=q, k=k, v=torch.randn(10, 2, 64), cu_seqlens_q=cu_seqlens((4, 6)))


BAD = [
    ("cu_float", dict(cu_seqlens_q=torch.tensor([0.0, 4.0, 10.0])), TypeError, "cu_seqlens_q must be an integer"),
    ("cu_2d", dict(cu_seqlens_q=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError, "cu_seqlens_q must be 1-D"),
    ("cu_not_tensor", dict(cu_seqlens_q=[0, 4, 10]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    ("cu_start", dict(cu_seqlens_q=cu_seqlens((4, 6)) + 1), ValueError, "cu_seqlens_q must start at 0"),
    ("cu_decreasing", dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must be non-decreasing, but cu_seqlens_q\[2\] = 4"),
    ("cu_beyond", dict(cu_seqlens_q=cu_seqlens((4, 7))), ValueError, "cu_seqlens_q ends at 11, beyond the 10 tokens"),
    ("cu_k_beyond", dict(cu_seqlens_k=cu_seqlens((4, 9))), ValueError, "cu_seqlens_k ends at 13"),
    ("cu_k_len", dict(cu_seqlens_k=cu_seqlens((10,))), ValueError, "same length B\\+1"),
    ("cu_device", dict(cu_seqlens_q=cu_seqlens((4, 6)).to("meta")), ValueError, "cu_seqlens_q is on meta"),
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
    ("backend_unknown", dict(backend="flash9"), ValueError, "backend='flash9' is not one of"),
    ("backend_peer_on_cpu", dict(backend="cudnn"), ValueError,
     r"backend='cudnn' cannot run this attention call: a cpu tensor \(the peers run on CUDA only\)"),
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
        op.attention_fwd_cpu(q, k, v, bad, bad, None, None, True, 0.25, -1, 0, 0.0)


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


@pytest.mark.parametrize("level", ISA_LEVELS)
def test_streamed_outputs_match_small_batches(level, monkeypatch):
    # Outputs of >= 8 MiB (kStreamBytes) are written with non-temporal stores (each ISA its own width). Each
    # document's result depends only on its own rows, so a document computed inside a 16 MiB batch (streamed: out,
    # dq, dk, dv; one 2,100-token document takes the multi-chunk dq reduction) must equal, bit for bit, the same
    # document computed alone (outputs far below the threshold, plain stores). Tail tokens past cu[B] stay zero.
    ext = backends.cpu_ext()
    if ext is None:
        pytest.skip("lengen_fast._C not built")
    if ISA_LEVELS.index(level) > ISA_LEVELS.index(ext.cpu_isa_detected()):
        pytest.skip(f"this CPU has no {level} (best: {ext.cpu_isa_detected()})")
    monkeypatch.setenv("LENGEN_CPU_ISA", level)
    H, D = 8, 64
    lens = [2100] + [16] * 300 + [37] * 90 + [5]            # 8,235 tokens: 2 KiB of fp32 per token and tensor
    T = sum(lens) + 3                                        # + 3 tail tokens outside every document
    assert T * H * D * 4 >= 8 << 20
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(T, H, D, generator=g) for _ in range(4))
    starts = [0, *torch.tensor(lens).cumsum(0).tolist()]

    def run(a, b):                                           # documents a..b-1 (and the tail when b is the end)
        t0, t1 = starts[a], (T if b == len(lens) else starts[b])
        cu = torch.tensor([s - t0 for s in starts[a:b + 1]], dtype=torch.int32)
        xs = [x[t0:t1].clone().requires_grad_() for x in (q, k, v)]
        out = varlen_attention(*xs, cu, None, max(lens[a:b]), max(lens[a:b]), causal=True)
        return (out, *torch.autograd.grad(out, xs, dout[t0:t1]))

    big = run(0, len(lens))
    for a in (0, 1, 150, 300, 345, len(lens) - 1):           # the long one, short ones, the last (before the tail)
        small = run(a, a + 1)
        t0, t1 = starts[a], starts[a + 1]
        for name, x, y in zip(("out", "dq", "dk", "dv"), big, small):
            assert torch.equal(x[t0:t1], y[: t1 - t0]), f"document {a}: {name} differs"
    for x in big:
        assert torch.count_nonzero(x[starts[-1]:]) == 0
