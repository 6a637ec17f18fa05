"""Triton varlen attention kernels (forward + backward) against the reference.

On CPU these run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) with 16x16 tiles,
so tiny shapes still cover multi-tile documents; bf16 and larger shapes are `gpu` tests.
Cases, inputs, references and flash-attn's tolerance rule come from helpers/attention_cases.py, truth = reference
in fp64:
    max|kernel - truth| <= 2 * max|eager_same_dtype - truth| + atol
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lengen_fast.attention import triton_bwd, triton_fwd, triton_sched
from lengen_fast.attention.triton_bwd import attention_bwd_triton
from lengen_fast.attention.triton_fwd import attention_fwd_triton
from lengen_fast.attention.triton_sched import KernelConfig, schedule_torch, tile_schedule

from helpers.attention_cases import ATOL, SMALL_CASES, Case, check_outputs, cu_seqlens, make_inputs, small
from helpers.compile import compile_for_sm90

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _cu(lens):
    return cu_seqlens(lens, DEV)


def _inputs(c: Case, seed: int = 0):
    """make_inputs on DEV, with cu_k = cu_q when the case has no lens_k (the kernels take both)."""
    q, k, v, dout, cu_q, cu_k = make_inputs(c, seed, DEV)
    return q, k, v, dout, cu_q, cu_q if cu_k is None else cu_k


def _kernels(c: Case, q, k, v, dout, cu_q, cu_k, deterministic=True):
    args = (cu_q, cu_k, *(c.max_seqlen or (None, None)), c.causal, c.scale, c.window[0], c.window[1], c.softcap)
    out, lse = attention_fwd_triton(q, k, v, *args)
    dq, dk, dv = attention_bwd_triton(dout, q, k, v, out, lse, *args, deterministic)
    return out, lse, dq, dk, dv


def _check(c: Case, seed: int = 0, deterministic=True):
    inputs = _inputs(c, seed)
    check_outputs(c, inputs, _kernels(c, *inputs, deterministic=deterministic), lambda t: ATOL[c.dtype],
                  f"kernel (deterministic={deterministic})")


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("name", list(SMALL_CASES))
def test_matches_reference(name, deterministic):
    """deterministic=False runs the single-pass backward (atomic dq) for 16-bit inputs."""
    _check(SMALL_CASES[name], deterministic=deterministic)


def test_single_pass_backward_skips_the_dq_kernel(monkeypatch):
    """deterministic=False, fp16: dq comes from the dk/dv kernel's atomics; the dq kernel never launches."""
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the dq kernel launched in the single-pass backward")
    monkeypatch.setattr(triton_bwd, "_attn_bwd_dq", NoLaunch())
    _check(small((0, 1, 37, 5, 20), H=4, H_kv=2, tail=3), deterministic=False)
    with pytest.raises(AssertionError, match="dq kernel launched"):
        _check(small((5, 20)), deterministic=True)


@settings(max_examples=8, deadline=None)
@given(lens=st.lists(st.integers(0, 24), min_size=1, max_size=5), causal=st.booleans(),
       left=st.sampled_from([-1, 1, 3, 20]), tail=st.integers(0, 3), deterministic=st.booleans(),
       seed=st.integers(0, 100))
def test_fuzz_layouts_fp16(lens, causal, left, tail, deterministic, seed):
    """fp16 (the interpreter's 16-bit dtype) on both backward paths, including zero-length, one- and two-token
    documents."""
    _check(small(tuple(lens), H=2, H_kv=1, D=32, causal=causal, window=(left, -1 if causal else 2), tail=tail),
           seed=seed, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_two_token_documents_fp16(seed, deterministic):
    """fp16 two-token documents on both backward paths (short rows take delta = sum_j P_ij dP_ij in fp32,
    _bwd_delta_doc). The reported 5x of eager's error was not reproduced here: with rowsum(dO * O) the worst
    ratio to eager's error over 24 seeds (D 16 and 64) was 1.5x, with the exact delta 1.6x."""
    _check(small((2,) * 12 + (1, 2, 0, 2), H=2, H_kv=1, D=32, tail=1), seed=seed, deterministic=deterministic)


@pytest.mark.parametrize("fwd,dkdv,dq", [((32, 16), (16, 32), (32, 16)), ((16, 32), (32, 16), (16, 32))])
def test_other_tile_shapes(monkeypatch, fwd, dkdv, dq):
    for kern, (bm, bn) in (("fwd", fwd), ("bwd_dkdv", dkdv), ("bwd_dq", dq)):
        monkeypatch.setitem(triton_sched.INTERPRET_CONFIGS, kern, KernelConfig(bm, bn, 4, 1))
    _check(small((45, 2, 20), (33, 40, 20), H=2, H_kv=1, tail=1))
    _check(small((45, 20), causal=False, window=(9, 4), tail=1, dtype=torch.float32))


def test_gqa_group_runtime_loop(monkeypatch):
    # groups above MAX_UNROLLED_GROUP walk the query heads in a runtime loop instead of unrolling
    monkeypatch.setattr(triton_bwd, "MAX_UNROLLED_GROUP", 1)
    _check(small((21, 0, 13), H=3, H_kv=1, window=(6, -1), tail=1))


def test_all_tail_tokens():
    # one empty document: every token is a tail token
    c = small((0,), tail=5)
    q, k, v, dout, cu_q, cu_k = _inputs(c)
    out, lse, dq, dk, dv = _kernels(c, q, k, v, dout, cu_q, cu_k)
    assert torch.isinf(lse).all() and (lse > 0).all()
    for x in (out, dq, dk, dv):
        assert torch.count_nonzero(x) == 0


def _bwd(c: Case, q, k, v, dout, cu_q, cu_k, out, lse, deterministic):
    return attention_bwd_triton(dout, q, k, v, out, lse, cu_q, cu_k, None, None, c.causal, c.scale,
                                c.window[0], c.window[1], c.softcap, deterministic)


def test_deterministic_repeatable():
    c = small((37, 5, 20), H=3, H_kv=1, window=(9, -1), tail=1)
    q, k, v, dout, cu_q, cu_k = _inputs(c)
    out, lse, *first = _kernels(c, q, k, v, dout, cu_q, cu_k, deterministic=True)
    second = _bwd(c, q, k, v, dout, cu_q, cu_k, out, lse, True)
    relaxed = _bwd(c, q, k, v, dout, cu_q, cu_k, out, lse, False)
    for a, b, r in zip(first, second, relaxed):
        assert torch.equal(a, b) and torch.equal(a, r)


@settings(max_examples=5, deadline=None)
@given(lens=st.lists(st.integers(0, 24), min_size=1, max_size=4), causal=st.booleans(),
       left=st.sampled_from([-1, 1, 3, 20]), tail=st.integers(0, 3), seed=st.integers(0, 100))
def test_fuzz_layouts(lens, causal, left, tail, seed):
    # left=0 with causal (one visible key per row) is the known limitation tested below
    _check(small(tuple(lens), H=2, H_kv=1, D=32, dtype=torch.float32, causal=causal, window=(left, -1 if causal else 2),
                tail=tail), seed=seed)


@pytest.mark.xfail(strict=False, reason="known limitation (FA2 structure): with one visible key the true dS is 0, "
                   "but dP (tl.dot) and delta = rowsum(dO * O) round differently in fp32, leaving ~1 ulp of |dO||V| "
                   "in dq/dk where eager fp32 is exact. The C++ backend forms dS as sum_d dO (V - O) and passes.")
@pytest.mark.parametrize("seed", [54, 81])
def test_one_visible_key_fp32(seed):
    _check(small((24, 24, 24, 24), H=2, H_kv=1, D=32, dtype=torch.float32, causal=True, window=(0, -1)), seed=seed)


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(0, 300), min_size=1, max_size=12), weights=st.data(),
       block=st.sampled_from([16, 64, 128]), tail=st.integers(0, 200))
def test_schedule_covers_every_tile(lens, weights, block, tail):
    """Every (doc, tile) appears exactly once, heaviest docs first (ties by index), within the grid
    bound; the one-program kernel and the torch path agree."""
    wl = weights.draw(st.lists(st.integers(0, 300), min_size=len(lens), max_size=len(lens)))
    cu = _cu(lens)
    cw = _cu(wl)
    s = tile_schedule(cu, cw, block, int(cu[-1]) + tail)
    prefix, order = s.prefix.tolist(), s.order.tolist()
    assert order == sorted(range(len(lens)), key=lambda d: (-wl[d], d))
    for i, d in enumerate(order):
        assert prefix[0] == 0 and prefix[i + 1] - prefix[i] == -(-lens[d] // block)
    assert s.n_slots >= prefix[-1] + -(-tail // block)
    t_prefix, t_order = schedule_torch(cu, cw, block)
    assert torch.equal(t_prefix, s.prefix) and torch.equal(t_order, s.order)


# ---------------------------------------------------------------------------------------- GPU

GPU_LENS = (1, 700, 0, 1500, 33, 129, 256)


@pytest.fixture
def first_config(monkeypatch):
    """Correctness runs take each kernel's first GPU config: timing every candidate of every
    variant would compile for minutes. test_gpu_autotuned_configs covers the others."""
    monkeypatch.setattr(triton_sched, "AUTOTUNE", False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256, 96])
def test_gpu_causal_gqa(first_config, dtype, D):
    _check(small(GPU_LENS, H=8, H_kv=2, D=D, dtype=dtype, tail=17))


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [
    dict(causal=False),
    dict(causal=True, window=(100, -1)),
    dict(causal=False, window=(37, 5), softcap=30.0),
    dict(lens_k=(5, 300, 64, 1000, 0, 200, 256)),
    dict(layout="packed", H_kv=1),
    pytest.param(dict(dtype=torch.float32, D=64), marks=pytest.mark.xfail(
        reason="H100 (2026-11-22): dv max error 1.54e-5 vs 2x eager fp32 1.38e-5 (one FMA chain over the "
               "1500-token document). The fp32 backward now Kahan-sums the tile products (dot_acc); not yet re-run "
               "on a GPU, so this stays a non-strict xfail until it is", strict=False)),
])
def test_gpu_variants(first_config, kw):
    _check(replace(Case(GPU_LENS, H=4, H_kv=2, D=128, dtype=torch.bfloat16, tail=5), **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_autotuned_configs(first_config, monkeypatch, D):
    """Every candidate config is correct (the autotuner may pick any of them)."""
    c = small(GPU_LENS, H=4, H_kv=2, D=D, dtype=torch.bfloat16, tail=5)
    for by_d in triton_sched._GPU_CONFIGS.values():
        for cfg in by_d[D][1:]:
            with monkeypatch.context() as m:
                m.setitem(by_d, D, [cfg])
                _check(c)


def test_short_hint_picks_small_tiles(monkeypatch):
    """max_seqlen hints <= SHORT_MAX switch 16-bit inputs to the small-tile candidates (GPU configs)."""
    monkeypatch.setattr(triton_sched, "triton_interpret", lambda: False)
    assert triton_sched.is_short(16, 64) and not triton_sched.is_short(16, 65)
    assert not triton_sched.is_short(None, 16) and not triton_sched.is_short(16, None)
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        short = triton_sched.candidate_configs(kernel, 128, torch.bfloat16, short=True)
        assert short == triton_sched._SHORT_CONFIGS[kernel]
        assert triton_sched.candidate_configs(kernel, 128, torch.bfloat16) != short
        assert triton_sched.candidate_configs(kernel, 64, torch.float32, short=True) == \
            triton_sched._FP32_CONFIGS[kernel]


def test_wrong_short_hint_still_correct():
    """A hint smaller than the real lengths costs speed, never correctness."""
    _check(small((3, 40, 0, 17), H=2, H_kv=1, D=32, dtype=torch.float16, tail=3, max_seqlen=(4, 4)))


SHORT_LENS = (16,) * 40 + (1, 5, 64, 0, 33)


@pytest.mark.gpu
def test_gpu_short_configs(first_config, monkeypatch):
    """Every small-tile candidate (picked by max_seqlen hints <= SHORT_MAX) is correct, with a right
    hint on short documents and with a wrong one on a long document."""
    n = len(triton_sched._SHORT_CONFIGS["fwd"])
    for i in range(n):
        with monkeypatch.context() as m:
            for kernel, cfgs in triton_sched._SHORT_CONFIGS.items():
                m.setitem(triton_sched._SHORT_CONFIGS, kernel, [cfgs[i]])
            for dtype in (torch.bfloat16, torch.float16):
                _check(small(SHORT_LENS, H=4, H_kv=2, D=128, dtype=dtype, tail=5, max_seqlen=(64, 64)))
            _check(small(SHORT_LENS + (700,), H=4, H_kv=2, D=64, dtype=torch.bfloat16, max_seqlen=(16, 16)))


@pytest.mark.gpu
def test_gpu_deterministic_bitwise():
    # also runs the autotuner (bf16, hdim 128, causal)
    c = small((3000, 17, 1000, 500), H=16, H_kv=2, D=128, dtype=torch.bfloat16, tail=9)
    q, k, v, dout, cu_q, cu_k = _inputs(c)
    first = _kernels(c, q, k, v, dout, cu_q, cu_k)
    for _ in range(3):
        again = _kernels(c, q, k, v, dout, cu_q, cu_k)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


COMPILE_FOR_SM90 = r"""
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lengen_fast.attention.triton_fwd import _attn_fwd
from lengen_fast.attention.triton_bwd import _attn_bwd_dkdv, _attn_bwd_dq
from lengen_fast.attention.triton_sched import _GPU_CONFIGS, _SHORT_CONFIGS
F32 = {"qk_scale2", "cap2", "scale"}
I32_PTR = {"CU_Q", "CU_K", "PREFIX", "ORDER"}
F32_PTR = {"LSE", "DELTA"}
BF16_PTR = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
for kern, name in ((_attn_fwd, "fwd"), (_attn_bwd_dkdv, "bwd_dkdv"), (_attn_bwd_dq, "bwd_dq")):
    params = list(inspect.signature(kern.fn).parameters)
    for cfg in (_GPU_CONFIGS[name][128][0], _SHORT_CONFIGS[name][0]):
        const = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_LEFT=False,
                     HAS_RIGHT=True, SOFTCAP=False, EVEN_D=True, DOT_PREC="tf32")
        if "UNROLL" in params:
            const["UNROLL"] = 4
        sig = {p: "constexpr" if p in const else "*i32" if p in I32_PTR else "*fp32" if p in F32_PTR
               else "*bf16" if p in BF16_PTR else "fp32" if p in F32 else "i32" for p in params}
        src = ASTSource(fn=kern, signature=sig, constexprs={(params.index(k),): v for k, v in const.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        assert "mma" in k.asm["ptx"], (name, cfg)                  # tensor-core dots, not FMA loops
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter does not lower the kernels: compile fwd, dk/dv and dq for an H100 (no GPU needed) in bf16,
    hdim 128, causal, with the first long and the first short config, and check they use tensor-core dots."""
    compile_for_sm90(COMPILE_FOR_SM90)


def test_autotune_cache_on_disk(monkeypatch, tmp_path):
    """$LENGEN_AUTOTUNE_CACHE keeps tuned configs between processes (bench/gpu_check.sh's steps): a stored choice is
    reused without timing, a stale one (no longer a candidate) is re-tuned."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("LENGEN_AUTOTUNE_CACHE", str(path))
    monkeypatch.setattr(triton_sched, "AUTOTUNE", True)
    monkeypatch.setattr(triton_sched, "_BEST", {})
    cands = [KernelConfig(16, 16, 4, 1), KernelConfig(32, 16, 4, 1)]
    key = ("fwd", 64, False, True, False, False, torch.float16, torch.device("cpu"))
    triton_sched._disk_store(key, cands[1])
    assert triton_sched.pick_config(key, cands, lambda cfg: pytest.fail("timed a cached key")) == cands[1]
    monkeypatch.setattr(triton_sched, "_BEST", {})
    assert triton_sched._disk_lookup(key, cands[:1]) is None                 # stale: not among the candidates
    path.write_text("{corrupt")
    assert triton_sched._disk_lookup(key, cands) is None
    triton_sched._disk_store(key, cands[0])
    assert triton_sched._disk_lookup(key, cands) == cands[0]


COMPILE_NEW_FOR_SM90 = r"""
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lengen_fast.attention.triton_bwd import _attn_bwd_dkdv, _attn_bwd_dkdv_packed, _attn_bwd_dq_packed, _bwd_delta_doc
from lengen_fast.attention.triton_fwd import _attn_fwd_packed
from lengen_fast.attention.triton_sched import _GPU_CONFIGS, _SHORT_CONFIGS
F32 = {"qk_scale2", "cap2", "scale"}
I32_PTR = {"CU_Q", "CU_K", "PREFIX", "ORDER", "CU", "DOC"}
F32_PTR = {"LSE", "DELTA"}
BF16_PTR = {"Q", "K", "V", "O", "DO", "DK", "DV"}
base = dict(HEAD_DIM=128, BLOCK_D=128, HAS_LEFT=False, HAS_RIGHT=True, SOFTCAP=False, EVEN_D=True, DOT_PREC="tf32")
jobs = [(_attn_bwd_dkdv, dict(UNROLL=2, DQ_ATOMIC=True, BLOCK_M=c.block_m, BLOCK_N=c.block_n), c)
        for c in (_GPU_CONFIGS["bwd_dkdv"][128][0], _SHORT_CONFIGS["bwd_dkdv"][0])]
jobs.append((_bwd_delta_doc, dict(BLOCK_M=64, BLOCK_N=64), type("C", (), dict(num_warps=4, num_stages=1))))
for kern in (_attn_fwd_packed, _attn_bwd_dq_packed, _attn_bwd_dkdv_packed):
    jobs.append((kern, dict(BLOCK_M=64, BLOCK_N=64), type("C", (), dict(num_warps=4, num_stages=2))))
for kern, extra, cfg in jobs:
    params = list(inspect.signature(kern.fn).parameters)
    f32 = F32_PTR | ({"DQ"} if extra.get("DQ_ATOMIC") else set())
    const = {**base, **extra}
    sig = {p: "constexpr" if p in const else "*i32" if p in I32_PTR else "*fp32" if p in f32
           else "*bf16" if p in BF16_PTR | {"DQ"} else "fp32" if p in F32 else "i32" for p in params}
    src = ASTSource(fn=kern, signature=sig, constexprs={(params.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = k.asm["ptx"]
    assert "mma" in ptx, kern
    if "DQ_ATOMIC" in extra:
        assert "red." in ptx or "atom." in ptx, "no atomic add in the single-pass backward"
print("compiled")
"""


def test_new_backward_kernels_compile_for_sm90():
    """The single-pass backward (dk/dv kernel with DQ_ATOMIC: fp32 atomics into dq), the exact-delta kernel and the
    multi-document forward compile for an H100 in bf16, hdim 128, causal, with tensor-core dots (no GPU needed)."""
    compile_for_sm90(COMPILE_NEW_FOR_SM90)


# ---------------------------------------------------------------------------------------- multi-document tiles

class _NoLaunch:
    def __init__(self, what):
        self.what = what

    def __getitem__(self, grid):
        raise AssertionError(f"{self.what} launched")


def _packed_case(lens, **kw) -> Case:
    """Self-attention (one cu_seqlens) with short-document hints: the forward takes multi-document tiles."""
    return small(tuple(lens), max_seqlen=(max(max(lens), 1), max(max(lens), 1)), **kw)


@pytest.mark.parametrize("kw", [dict(H=4, H_kv=2, tail=3), dict(dtype=torch.float32, causal=False, tail=2),
                                dict(dtype=torch.float32, causal=False, window=(3, 2), H=3, H_kv=1),
                                dict(dtype=torch.float32, window=(4, -1), softcap=5.0, tail=1),
                                dict(layout="packed", scale=0.3, tail=2), dict(D=48)])
def test_multi_document_tiles_forward(monkeypatch, kw):
    """Short documents (0-16 tokens) share query and key tiles, masked by document id, forward and backward; the
    per-document kernels must not run."""
    monkeypatch.setattr(triton_fwd, "_attn_fwd", _NoLaunch("the per-document forward kernel"))
    monkeypatch.setattr(triton_bwd, "_attn_bwd_dq", _NoLaunch("the per-document dq kernel"))
    monkeypatch.setattr(triton_bwd, "_attn_bwd_dkdv", _NoLaunch("the per-document dk/dv kernel"))
    _check(_packed_case((0, 1, 16, 5, 0, 9, 2, 13, 1, 7), **kw))


@settings(max_examples=8, deadline=None)
@given(lens=st.lists(st.integers(0, 20), min_size=1, max_size=8), causal=st.booleans(),
       left=st.sampled_from([-1, 0, 2, 20]), tail=st.integers(0, 20), dtype=st.sampled_from([torch.float16,
                                                                                            torch.float32]),
       seed=st.integers(0, 100))
def test_fuzz_multi_document_tiles(lens, causal, left, tail, dtype, seed):
    if dtype == torch.float32 and causal and left == 0:
        left = 1                                   # the one-visible-key fp32 limitation (test_one_visible_key_fp32)
    _check(_packed_case(lens, H=2, H_kv=1, D=32, dtype=dtype, causal=causal, window=(left, -1 if causal else 3),
                        tail=tail), seed=seed)


def test_multi_document_tiles_need_one_cu_seqlens(monkeypatch):
    """Different cu_seqlens tensors for q and k, or no/long hints: the per-document tiles (no host sync to compare
    their values)."""
    c = _packed_case((3, 9, 4))
    cu = _cu(c.lens_q)
    assert triton_sched.packed_tiles(cu, cu, 9, 9)
    assert not triton_sched.packed_tiles(cu, cu.clone(), 9, 9)
    assert not triton_sched.packed_tiles(cu, cu, None, 9) and not triton_sched.packed_tiles(cu, cu, 65, 9)
    assert not triton_sched.packed_tiles(_cu([]), _cu([]), 9, 9)


def test_multi_document_tiles_wrong_hint_still_correct():
    """A hint below the real lengths keeps the multi-document tiles, which then walk the long document's keys."""
    _check(small((3, 40, 0, 17), H=2, H_kv=1, D=32, tail=3, max_seqlen=(4, 4)))
