"""Fused RoPE: frequencies vs transformers and vs the formulas, kernels vs the reference, gradients, errors.

Tolerance (flash-attn's rule): max|kernel - truth| <= 2 * max|eager_same_dtype - truth| + atol, where the
truth is the fp64 rotation of the same fp32 frequencies and the eager baseline is the Hugging Face-style
cos/sin-cache computation in the inputs' dtype (reference.apply_rope_ref(upcast=False)).
"""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lengen_fast as lf
from lengen_fast import backends
from lengen_fast.reference import apply_rope_ref, positions_from_cu_seqlens
from lengen_fast.rope import RopeScaling, apply_rope, rope_frequencies

from helpers.tolerance import assert_rule
from helpers.compile import compile_for_sm90

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

CPU = torch.device("cpu")
CPU_BACKENDS = [b for b in ("cpu", "triton") if backends.available("rope", b, CPU)]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ----------------------------------------------------------------------------- frequencies vs transformers

def hf_config(params, head_dim=32, mpe=4096, theta=10000.0, partial=None):
    kw = {"partial_rotary_factor": partial} if partial is not None else {}
    return LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=mpe,
                       rope_theta=theta, rope_scaling=dict(params), **kw)


HF_CASES = [
    ({"rope_type": "linear", "factor": 4.0}, None),
    ({"rope_type": "dynamic", "factor": 2.0}, None),
    ({"rope_type": "dynamic", "factor": 2.0}, 1000),
    ({"rope_type": "dynamic", "factor": 2.0}, 20000),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, None),
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024, "beta_fast": 16, "beta_slow": 2},
     None),
    ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
      "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}, None),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "truncate": False}, None),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": 1.3}, None),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, None),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 512}, None),
    ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
      "original_max_position_embeddings": 1024}, None),
    ({"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(16)],
      "long_factor": [2.0 + 0.5 * i for i in range(16)], "original_max_position_embeddings": 1024}, None),
    ({"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(16)],
      "long_factor": [2.0 + 0.5 * i for i in range(16)], "original_max_position_embeddings": 1024}, 3000),
    ({"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [3.0] * 16, "factor": 8.0,
      "attention_factor": 1.1, "original_max_position_embeddings": 1024}, 3000),
]


@pytest.mark.parametrize("params,seq_len", HF_CASES)
def test_frequencies_match_transformers(params, seq_len):
    config = hf_config(params)
    want_inv, want_af = ROPE_INIT_FUNCTIONS[params.get("rope_type", params.get("type"))](config, None, seq_len=seq_len)
    for scaling in (RopeScaling.from_hf(params, max_position_embeddings=4096),           # v4 rope_scaling
                    RopeScaling.from_hf(config.rope_parameters, max_position_embeddings=4096)):  # v5 dict
        inv, af = rope_frequencies(32, 10000.0, scaling, seq_len=seq_len)
        assert inv.dtype == torch.float32 and inv.shape == (16,)
        torch.testing.assert_close(inv, want_inv, rtol=2e-7, atol=0)
        assert af == pytest.approx(want_af, rel=1e-12)


def test_frequencies_match_transformers_default_and_partial():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    config = hf_config({"rope_type": "default"}, theta=500000.0)
    want, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    torch.testing.assert_close(rope_frequencies(32, 500000.0)[0], want, rtol=2e-7, atol=0)
    config = hf_config({"rope_type": "linear", "factor": 2.0}, partial=0.5)
    want, _ = ROPE_INIT_FUNCTIONS["linear"](config, None)
    scaling = RopeScaling.from_hf(config.rope_parameters)
    assert scaling.partial_rotary_factor == 0.5
    torch.testing.assert_close(rope_frequencies(32, 1.0, scaling)[0], want, rtol=2e-7, atol=0)  # theta from dict


def test_dynamic_tensor_seq_len_matches_int():
    s = RopeScaling("dynamic", 4.0, 2048)
    for n in (100, 2048, 5000):
        a, _ = rope_frequencies(64, 10000.0, s, seq_len=n)
        b, _ = rope_frequencies(64, 10000.0, s, seq_len=torch.tensor(n))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- frequencies vs the formulas

def formula(kind, d, base, seq_len=None, **p):
    """Independent fp64 statements of each scaling rule (papers / model cards)."""
    i = torch.arange(d // 2, dtype=torch.float64)
    plain = base ** (-2 * i / d)
    f = p.get("factor", 1.0)
    if kind == "none":
        return plain, 1.0
    if kind == "linear":
        return plain / f, 1.0
    if kind == "ntk":  # NTK-aware: base * s^(d / (d - 2))
        return (base * f ** (d / (d - 2))) ** (-2 * i / d), 1.0
    if kind == "dynamic":
        L = p["orig"]
        s = max(seq_len or L, L)
        return (base * (f * s / L - (f - 1)) ** (d / (d - 2))) ** (-2 * i / d), 1.0
    if kind == "llama3":
        L, lo, hi = p["orig"], p["low"], p["high"]
        out = []
        for w in plain.tolist():
            wavelen = 2 * math.pi / w
            if wavelen < L / hi:
                out.append(w)
            elif wavelen > L / lo:
                out.append(w / f)
            else:
                sm = (L / wavelen - lo) / (hi - lo)
                out.append((1 - sm) * w / f + sm * w)
        return torch.tensor(out, dtype=torch.float64), 1.0
    if kind == "yarn":  # NTK-by-parts: ramp over dims between the beta_fast and beta_slow rotation counts
        L = p["orig"]
        dim_of = lambda rot: d * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
        lo, hi = max(math.floor(dim_of(32)), 0), min(math.ceil(dim_of(1)), d - 1)
        ramp = ((i - lo) / (hi - lo)).clamp(0, 1)
        return plain / f * ramp + plain * (1 - ramp), 0.1 * math.log(f) + 1.0
    if kind == "longrope":
        ext = torch.tensor(p["long"] if seq_len and seq_len > p["orig"] else p["short"], dtype=torch.float64)
        return 1.0 / (ext * base ** (2 * i / d)), math.sqrt(1 + math.log(f) / math.log(p["orig"]))
    raise AssertionError(kind)


FORMULA_CASES = [
    (RopeScaling(), "none", {}, None),
    (RopeScaling("linear", 4.0), "linear", {"factor": 4.0}, None),
    (RopeScaling("ntk", 8.0), "ntk", {"factor": 8.0}, None),
    (RopeScaling("dynamic", 4.0, 2048), "dynamic", {"factor": 4.0, "orig": 2048}, 10000),
    (RopeScaling("dynamic", 4.0, 2048), "dynamic", {"factor": 4.0, "orig": 2048}, 100),
    (RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0), "llama3",
     {"factor": 8.0, "orig": 8192, "low": 1.0, "high": 4.0}, None),
    (RopeScaling("yarn", 16.0, 4096), "yarn", {"factor": 16.0, "orig": 4096}, None),
    (RopeScaling("longrope", 4.0, 4096, short_factor=[1.0 + i / 8 for i in range(32)],
                 long_factor=[1.0 + i for i in range(32)]), "longrope",
     {"factor": 4.0, "orig": 4096, "short": [1.0 + i / 8 for i in range(32)], "long": [1.0 + i for i in range(32)]},
     9000),
]


@pytest.mark.parametrize("scaling,kind,p,seq_len", FORMULA_CASES)
def test_frequencies_match_formulas(scaling, kind, p, seq_len):
    inv, af = rope_frequencies(64, 10000.0, scaling, seq_len=seq_len)
    want, want_af = formula(kind, 64, 10000.0, seq_len=seq_len, **p)
    torch.testing.assert_close(inv.double(), want, rtol=2e-6, atol=0)
    assert af == pytest.approx(want_af, rel=1e-9)


def test_from_hf_dialects():
    v4 = RopeScaling.from_hf({"type": "linear", "factor": 2.0})
    v5 = RopeScaling.from_hf({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
    assert v4.kind == v5.kind == "linear" and v5.rope_theta == 500000.0
    assert rope_frequencies(64, 10000.0, v5)[0][1] == rope_frequencies(64, 500000.0, v4)[0][1]
    assert RopeScaling.from_hf({"rope_type": "dynamic", "factor": 2.0}, 8192).original_max_position_embeddings == 8192
    assert RopeScaling.from_hf(None).kind == RopeScaling.from_hf({"rope_type": "default"}).kind == "none"
    ds = RopeScaling.from_hf({"rope_type": "yarn", "original_max_position_embeddings": 4096}, 163840)
    assert ds.factor == 40.0  # transformers' implicit factor: max_position_embeddings / original


# ----------------------------------------------------------------------------- one HF-config reader
# RotaryEmbedding.from_hf_config and integrations.hf._rope_config (patch_rope) both go through
# rope_config_from_hf; these are the cases where their two former readers disagreed.

def _both_readers(config, layer_type=None):
    """(base, rotary_dim, inv_freq, attention factor) from RotaryEmbedding.from_hf_config, and (base, inv_freq,
    attention factor) from hf._rope_config at that rotary_dim (patch_rope takes it from the model's buffer)."""
    from lengen_fast.integrations.hf import rope_patch as hf
    rope = lf.RotaryEmbedding.from_hf_config(config, layer_type=layer_type)
    inv, af = rope_frequencies(rope.head_dim, rope.base, rope.scaling, rotary_dim=rope.rotary_dim)
    hf_base, hf_scaling = hf._rope_config(config)
    hf_inv, hf_af = rope_frequencies(rope.head_dim, hf_base, hf_scaling, rotary_dim=rope.rotary_dim)
    return (rope.base, rope.rotary_dim, inv, af), (hf_base, hf_inv, hf_af)


def _ns(**kw):
    """A config object as a transformers config looks to the readers: plain attributes."""
    from types import SimpleNamespace
    return SimpleNamespace(hidden_size=64, num_attention_heads=2, max_position_embeddings=4096, **kw)


def test_hf_reader_rope_theta_precedence():
    # the dict's rope_theta wins over the config attribute (from_hf_config used to report base=500 while
    # rotating with 1000)
    ours, theirs = _both_readers(_ns(rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 1000.0}))
    assert ours[0] == theirs[0] == 1000.0
    want = rope_frequencies(32, 1000.0, RopeScaling("linear", 2.0))[0]
    torch.testing.assert_close(ours[2], want, rtol=0, atol=0)
    torch.testing.assert_close(theirs[1], want, rtol=0, atol=0)
    # v4: rope_theta only on the config
    ours, theirs = _both_readers(_ns(rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert ours[0] == theirs[0] == 500.0
    # neither says (a config attribute set to None): the default 10000 (_rope_config used to fail on float(None))
    ours, theirs = _both_readers(_ns(rope_theta=None, rope_scaling=None))
    assert ours[0] == theirs[0] == 10000.0
    torch.testing.assert_close(theirs[1], rope_frequencies(32, 10000.0)[0], rtol=0, atol=0)


@pytest.mark.parametrize("where", ["config", "dict", "both"])
def test_hf_reader_partial_rotary_factor(where):
    """partial_rotary_factor on the config (v4) or in the dict (v5), for plain RoPE too (_rope_config used to
    drop it unless the RoPE was scaled, and ignored the config attribute); the dict wins, as in transformers."""
    params = {"rope_type": "default"} if where == "config" else {"rope_type": "default", "partial_rotary_factor": 0.25}
    attr = {"partial_rotary_factor": 0.5} if where != "dict" else {}
    config = _ns(rope_theta=10000.0, rope_parameters=params, **attr)
    c = lf.rope.rope_config_from_hf(config)
    want_dim = 16 if where == "config" else 8
    assert (c.head_dim, c.rotary_dim) == (32, want_dim)
    ours, theirs = _both_readers(config)
    assert ours[1] == want_dim
    torch.testing.assert_close(ours[2], rope_frequencies(want_dim, 10000.0)[0], rtol=0, atol=0)
    torch.testing.assert_close(theirs[1], ours[2], rtol=0, atol=0)
    # against transformers' own reading of a real config
    config = hf_config({"rope_type": "linear", "factor": 2.0}, partial=0.5)
    want, _ = ROPE_INIT_FUNCTIONS["linear"](config, None)
    rope = lf.RotaryEmbedding.from_hf_config(config)
    assert rope.rotary_dim == 16
    torch.testing.assert_close(rope_frequencies(32, rope.base, rope.scaling, rotary_dim=16)[0], want, rtol=2e-7, atol=0)


def test_hf_reader_per_layer_type():
    """v5 rope_parameters keyed by layer type (Gemma-3): both readers used to reject it; now layer_type picks one
    set, matching transformers' per-layer-type buffers, and without it the error names the layer types."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    from lengen_fast.integrations.hf import rope_patch as hf
    config = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                              layer_types=["sliding_attention", "full_attention"], rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1e6},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    theirs = Gemma3RotaryEmbedding(config)
    for layer_type, base in (("full_attention", 1e6), ("sliding_attention", 1e4)):
        rope = lf.RotaryEmbedding.from_hf_config(config, layer_type=layer_type)
        assert rope.base == base and rope.rotary_dim == 32
        inv, af = rope_frequencies(32, rope.base, rope.scaling)
        torch.testing.assert_close(inv, getattr(theirs, f"{layer_type}_inv_freq"), rtol=2e-7, atol=0)
        assert af == pytest.approx(getattr(theirs, f"{layer_type}_attention_scaling"))
    for fn in (lambda: lf.RotaryEmbedding.from_hf_config(config), lambda: hf._rope_config(config)):
        with pytest.raises(ValueError, match=r"per layer type \(\['full_attention', 'sliding_attention'\]\); pass"):
            fn()
    with pytest.raises(ValueError, match="layer_type='global' is not one of"):
        lf.RotaryEmbedding.from_hf_config(config, layer_type="global")
    # a single dict serves every layer type
    flat = hf_config({"rope_type": "linear", "factor": 2.0})
    assert lf.rope.rope_config_from_hf(flat, "full_attention") == lf.rope.rope_config_from_hf(flat)


# ----------------------------------------------------------------------------- kernels vs the reference

def rand_qk(T, Hq, Hk, D, dtype, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, T, Hq, D, generator=g).to(dtype)
    k = torch.randn(*lead, T, Hk, D, generator=g).to(dtype)
    return q, k


def check_against_truth(out, q, k, positions, inv, af, interleaved):
    """out = kernel (q_out, k_out); positions broadcastable to q.shape[:-2]."""
    truth = apply_rope_ref(q.double(), k.double(), positions, inv.double(), af, interleaved=interleaved,
                           compute_dtype=torch.float64)
    eager = apply_rope_ref(q, k, positions, inv, af, interleaved=interleaved, upcast=False)
    for got, want, base in zip(out, truth, eager):
        assert got.dtype == q.dtype and got.shape == want.shape
        if got.numel() == 0:
            continue
        assert_rule(got, want, base, ATOL[q.dtype], "rope")


def dtypes_for(backend):
    # Triton's interpreter is exercised in fp32/fp16; bf16 Triton runs under the gpu marker
    return [torch.float32, torch.float16, torch.bfloat16] if backend == "cpu" else [torch.float32, torch.float16]


PACKED = [  # (cu_seqlens, Hq, Hk, D, rotary_dim, interleaved, scaling, offset)
    ([0, 3, 3, 4, 30, 41], 4, 2, 80, None, False, RopeScaling("yarn", 4.0, 32), 0),
    ([0, 3, 3, 4, 30, 41], 3, 1, 80, 48, True, RopeScaling("llama3", 8.0, 16), 7),
    ([0, 41], 2, 2, 36, 20, False, RopeScaling("linear", 2.0), 1000),
    ([0, 1, 2, 3, 20, 41], 1, 1, 64, None, True, None, 0),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", range(len(PACKED)))
def test_packed_matches_reference(backend, case):
    cu_list, Hq, Hk, D, R, inter, scaling, off = PACKED[case]
    cu = torch.tensor(cu_list, dtype=torch.int32)
    T = cu_list[-1]
    inv, af = rope_frequencies(D, 10000.0, scaling, rotary_dim=R)
    positions = positions_from_cu_seqlens(cu, T) + off
    for dtype in dtypes_for(backend):
        q, k = rand_qk(T, Hq, Hk, D, dtype, seed=case)
        q0, k0 = q.clone(), k.clone()
        out = apply_rope(q, k, cu_seqlens=cu, scaling=scaling, rotary_dim=R, interleaved=inter,
                         position_offset=off, backend=backend)
        check_against_truth(out, q, k, positions, inv, af, inter)
        assert torch.equal(q, q0) and torch.equal(k, k0), "out-of-place call modified its inputs"
        if R is not None:  # pass-through dims are copied exactly
            assert torch.equal(out[0][..., R:], q[..., R:]) and torch.equal(out[1][..., R:], k[..., R:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batched_layouts_and_strides(backend):
    B, S, Hq, Hk, D = 2, 9, 3, 1, 40
    inv, af = rope_frequencies(D, 10000.0)
    qkv = torch.randn(B, S, Hq + 2 * Hk, D)           # fused projection output: q, k are strided views
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk]
    pid = torch.randint(0, 5000, (B, S))
    check_against_truth(apply_rope(q, k, position_ids=pid, backend=backend), q, k, pid, inv, af, False)
    check_against_truth(apply_rope(q, k, backend=backend), q, k, torch.arange(S), inv, af, False)
    check_against_truth(apply_rope(q, k, position_ids=pid[0], backend=backend, interleaved=True), q, k, pid[0],
                        inv, af, True)
    # head-major storage (H, T, D) viewed as (T, H, D), and a head dim with stride 2
    qt = torch.randn(Hq, 11, D).transpose(0, 1)
    kt = torch.randn(11, Hk, 2 * D)[..., ::2]
    check_against_truth(apply_rope(qt, kt, backend=backend), qt, kt, torch.arange(11), inv, af, False)
    check_against_truth(apply_rope(qt, kt, backend=backend, interleaved=True), qt, kt, torch.arange(11), inv, af, True)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_up_to_1m_against_fp64(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton bf16 runs under the gpu marker")
    D = 128
    inv, af = rope_frequencies(D, 10000.0)
    pid = torch.tensor([0, 1, 4097, 65535, 131072, 500001, 999999, 1 << 20], dtype=torch.int64)
    q, k = rand_qk(len(pid), 2, 1, D, dtype)
    check_against_truth(apply_rope(q, k, position_ids=pid, backend=backend), q, k, pid, inv, af, False)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    pos = positions_from_cu_seqlens(cu, 8) + 999_990
    check_against_truth(apply_rope(q, k, cu_seqlens=cu, position_offset=999_990, backend=backend), q, k, pos, inv, af,
                        False)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.one_of(st.just(0), st.just(1), st.integers(2, 40), st.just(300)), min_size=1, max_size=8),
       Hq=st.integers(1, 3), Hk=st.integers(1, 2), half=st.sampled_from([1, 3, 8, 20]), extra=st.sampled_from([0, 6]),
       interleaved=st.booleans(), offset=st.integers(0, 100_000))
def test_fuzz_cu_seqlens_cpu(lengths, Hq, Hk, half, extra, interleaved, offset):
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("C++ extension not built")
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    T, D, R = int(cu[-1]), 2 * half + extra, 2 * half
    q, k = rand_qk(T, Hq, Hk, D, torch.float32)
    inv, af = rope_frequencies(D, 10000.0, rotary_dim=R)
    out = apply_rope(q, k, cu_seqlens=cu, rotary_dim=R, interleaved=interleaved, position_offset=offset,
                     backend="cpu")
    check_against_truth(out, q, k, positions_from_cu_seqlens(cu, T) + offset, inv, af, interleaved)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_inplace(backend):
    q, k = rand_qk(12, 2, 1, 32, torch.float32)
    cu = torch.tensor([0, 5, 12])
    want = apply_rope(q, k, cu_seqlens=cu, rotary_dim=16, backend=backend)
    qi, ki = q.clone(), k.clone()
    got = apply_rope(qi, ki, cu_seqlens=cu, rotary_dim=16, inplace=True, backend=backend)
    assert got[0].data_ptr() == qi.data_ptr() and got[1].data_ptr() == ki.data_ptr()
    torch.testing.assert_close(qi, want[0], rtol=0, atol=0)
    torch.testing.assert_close(ki, want[1], rtol=0, atol=0)


def test_dynamic_ntk_uses_longest_document():
    s = RopeScaling("dynamic", 4.0, 16)
    cu = torch.tensor([0, 10, 40, 45])  # longest document: 30 tokens (the pack holds 45)
    q, k = rand_qk(45, 2, 2, 16, torch.float32)
    inv, af = rope_frequencies(16, 10000.0, s, seq_len=30)
    assert not torch.equal(inv, rope_frequencies(16, 10000.0, s, seq_len=45)[0])
    check_against_truth(apply_rope(q, k, cu_seqlens=cu, scaling=s), q, k, positions_from_cu_seqlens(cu, 45), inv, af,
                        False)


def test_longrope_switches_on_longest_document():
    s = RopeScaling("longrope", 4.0, 16, short_factor=[1.0] * 4, long_factor=[4.0] * 4)
    q, k = rand_qk(30, 1, 1, 8, torch.float32)
    for cu, seq_len in ((torch.tensor([0, 10, 20, 30]), 10), (torch.tensor([0, 5, 30]), 25)):
        inv, af = rope_frequencies(8, 10000.0, s, seq_len=seq_len)
        check_against_truth(apply_rope(q, k, cu_seqlens=cu, scaling=s), q, k, positions_from_cu_seqlens(cu, 30), inv,
                            af, False)


def test_rotary_embedding_matches_transformers_llama():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    config = hf_config(params, head_dim=32, mpe=512)
    B, S, Hq, Hk, D = 2, 50, 4, 2, 32
    q, k = rand_qk(S, Hq, Hk, D, torch.float32, lead=(B,))
    pid = torch.arange(S).expand(B, S) + torch.tensor([[0], [300]])
    hf_rope = LlamaRotaryEmbedding(config)
    cos, sin = hf_rope(q, pid)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # HF layout: (B, H, S, D)
    rope = lf.RotaryEmbedding.from_hf_config(config)
    got = rope(q, k, position_ids=pid)
    inv, af = rope_frequencies(D, 10000.0, rope.scaling)
    torch.testing.assert_close(inv, hf_rope.inv_freq, rtol=0, atol=0)
    # HF rounds position * inv_freq to fp32; ours carries that rounding error, so compare both to fp64
    truth = apply_rope_ref(q.double(), k.double(), pid, inv.double(), af, compute_dtype=torch.float64)
    for ours, theirs, want in zip(got, (hf_q.transpose(1, 2), hf_k.transpose(1, 2)), truth):
        assert (ours - want).abs().max() <= 2 * (theirs - want).abs().max() + ATOL[torch.float32]


# ----------------------------------------------------------------------------- gradients

def test_gradcheck_fp64_reference():
    cu = torch.tensor([0, 2, 2, 5])
    s = RopeScaling("yarn", 4.0, 8)
    q = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 1, 8, dtype=torch.float64, requires_grad=True)
    for inter in (False, True):
        fn = lambda a, b: apply_rope(a, b, cu_seqlens=cu, scaling=s, rotary_dim=6, interleaved=inter,  # noqa: E731
                                     position_offset=3)
        assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))  # the backward is the same op, so it differentiates too


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_reference(backend):
    cu = torch.tensor([0, 4, 9, 20])
    s = RopeScaling("llama3", 8.0, 8)
    q0, k0 = rand_qk(20, 3, 1, 24, torch.float32)
    gq, gk = rand_qk(20, 3, 1, 24, torch.float32, seed=1)
    grads = {}
    for name in (backend, "reference"):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        qo, ko = apply_rope(q, k, cu_seqlens=cu, scaling=s, rotary_dim=16, interleaved=True, backend=name)
        torch.autograd.backward((qo, ko), (gq, gk))
        grads[name] = (q.grad, k.grad)
    for a, b in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the backward is the adjoint (inverse rotation) of the forward: <R x, g> == <x, R^T g>
    qo, ko = apply_rope(q0, k0, cu_seqlens=cu, scaling=s, rotary_dim=16, interleaved=True, backend=backend)
    lhs = (qo.double() * gq).sum() + (ko.double() * gk).sum()
    rhs = (q0.double() * grads[backend][0]).sum() + (k0.double() * grads[backend][1]).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_gradients_on_non_leaf(backend):
    x = torch.randn(6, 3, 16, requires_grad=True)
    w = torch.randn(6, 3, 16)
    ref_q, ref_k = apply_rope(x * 2, x[:, :1] * 3, backend=backend)
    (ref_q * w).sum().backward()
    ref_grad, x.grad = x.grad.clone(), None
    q, k = x * 2, x[:, :1] * 3
    out_q, _ = apply_rope(q, k, inplace=True, backend=backend)
    (out_q * w).sum().backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=1e-6)


def _assert_compiles_fullgraph_like_eager(f):
    """f(q, k) -> scalar under torch.compile(fullgraph=True) matches eager, value and gradients."""
    q, k = rand_qk(8, 2, 1, 16, torch.float32)
    qc, kc = q.clone().requires_grad_(), k.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(qc, kc)  # tracing is the point; skip codegen
    got.backward()
    qe, ke = q.clone().requires_grad_(), k.clone().requires_grad_()
    want = f(qe, ke)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close((qc.grad, kc.grad), (qe.grad, ke.grad))


def test_torch_compile_fullgraph():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    s = RopeScaling("yarn", 4.0, 16)

    def f(q, k):
        qo, ko = apply_rope(q, k, cu_seqlens=cu, scaling=s)
        return qo.sum() + ko.square().sum()

    _assert_compiles_fullgraph_like_eager(f)


def test_torch_compile_fullgraph_inplace():
    def f(q, k):
        qo, ko = apply_rope(q * 1, k * 1, inplace=True, interleaved=True)  # in place on non-leaf tensors
        return qo.sum() + ko.square().sum()

    _assert_compiles_fullgraph_like_eager(f)


COMPILE_FOR_SM90 = r"""
import inspect, itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lengen_fast.rope.op import PosMode
from lengen_fast.rope.triton import _rope_kernel
params = list(inspect.signature(_rope_kernel.fn).parameters)
for dt, mode, inter, half in (("bf16", int(PosMode.CU_SEQLENS), True, 20),):
    types = {p: "*" + dt for p in ("Q", "K", "QO", "KO")} | {"INV": "*fp32", "POS": "*i32", "CU": "*i32", "af": "fp32"}
    const = dict(HALF=half, BLOCK_T=16, BLOCK_H=4, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_TAIL=16,
                 POS_MODE=mode, INTERLEAVED=inter, COPY_Q_TAIL=half < 64, COPY_K_TAIL=half < 64)
    sig = {p: ("constexpr" if p in const else types.get(p, "i32")) for p in params}
    src = ASTSource(fn=_rope_kernel, signature=sig, constexprs={(params.index(k),): v for k, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "sin.approx" not in ptx and "cos.approx" not in ptx  # angles use our range reduction
print("compiled")
"""


def test_triton_kernel_compiles_for_sm90():
    """The interpreter does not lower the kernel; compile it for an H100 (no GPU needed) to catch lowering errors."""
    compile_for_sm90(COMPILE_FOR_SM90)


def test_cuda_kernel_emulated_on_cpu_matches_cpu_kernel():
    """csrc/rope/rope.cu run on the CPU by csrc/rope/emu/check.sh (a block's threads as std::threads, a barrier
    for __syncthreads) against the C++ CPU kernel: every dtype, layout and position mode, in place, backward."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not backends.available("rope", "cpu", CPU):
        pytest.skip("needs the built lengen_fast._C (bash scripts/dev_build.sh)")
    pytest.importorskip("pybind11", reason="check.sh builds the emulation with pybind11")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("check.sh needs g++ >= 11 (C++20 <barrier>); no g++ on PATH")
    probe = subprocess.run([gxx, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"], input="#include <barrier>\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"check.sh needs g++ >= 11 (C++20 <barrier>): {probe.stderr.strip()[:200]}")
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", os.path.join(root, "csrc", "rope", "emu", "check.sh")], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0 and res.stdout.startswith("ok "), (res.stdout[-2000:], res.stderr[-3000:])


# ----------------------------------------------------------------------------- bad input

def _qk():
    return rand_qk(10, 2, 1, 16, torch.float32)


BAD = [
    (lambda: RopeScaling("linear", 0.5), ValueError, "factor=0.5 must be >= 1"),
    (lambda: RopeScaling("yarn", 4.0), ValueError, "needs original_max_position_embeddings"),
    (lambda: RopeScaling("llama3", 8.0), ValueError, "needs original_max_position_embeddings"),
    (lambda: RopeScaling.from_hf({"rope_type": "yarn", "factor": 4.0}), ValueError, "original_max_position_embeddings"),
    (lambda: RopeScaling("bogus"), ValueError, "kind='bogus'"),
    (lambda: RopeScaling.from_hf({"rope_type": "mrope", "factor": 2.0}), ValueError, "rope_type='mrope'"),
    (lambda: RopeScaling.from_hf({"rope_type": "linear", "factor": 2.0, "fatcor": 1}), ValueError, "fatcor"),
    (lambda: RopeScaling.from_hf({"rope_type": "linear"}), ValueError, "no 'factor'"),
    (lambda: RopeScaling("longrope", 2.0, 64, short_factor=[1.0] * 4, long_factor=[1.0] * 5), ValueError,
     "short_factor has 4 entries but long_factor has 5"),
    (lambda: rope_frequencies(16, 10000.0, RopeScaling("longrope", 2.0, 64, short_factor=[1.0] * 4,
                                                       long_factor=[1.0] * 4)), ValueError, "rotary_dim=16 needs 8"),
    (lambda: rope_frequencies(16, 10000.0, rotary_dim=7), ValueError, "rotary_dim=7 must be a positive even"),
    (lambda: apply_rope(*_qk(), rotary_dim=32), ValueError, "rotary_dim=32 must be .* <= head_dim=16"),
    (lambda: apply_rope(*_qk(), cu_seqlens=torch.tensor([0, 4, 12])), ValueError,
     r"cu_seqlens\[-1\]=12 disagrees with the number of tokens T=10"),
    (lambda: apply_rope(*_qk(), cu_seqlens=torch.tensor([1, 4, 10])), ValueError, r"cu_seqlens\[0\]=1 must be 0"),
    (lambda: apply_rope(*_qk(), cu_seqlens=torch.tensor([0, 6, 4, 10])), ValueError, "non-decreasing"),
    (lambda: apply_rope(*_qk(), cu_seqlens=torch.tensor([0.0, 10.0])), TypeError, "cu_seqlens must be int32 or int64"),
    (lambda: apply_rope(*_qk(), cu_seqlens=torch.tensor([0, 10]), position_ids=torch.arange(10)), ValueError,
     "cu_seqlens or position_ids, not both"),
    (lambda: apply_rope(*_qk(), position_ids=torch.arange(9)), ValueError, r"position_ids has shape \(9,\)"),
    (lambda: apply_rope(torch.randn(10, 16), torch.randn(10, 1, 16)), ValueError, r"q must be \(T, H, D\)"),
    (lambda: apply_rope(torch.randn(10, 2, 16), torch.randn(9, 1, 16)), ValueError, "must share the token dims"),
    (lambda: apply_rope(torch.randn(10, 2, 16), torch.randn(10, 1, 16).half()), ValueError, "must share dtype"),
    (lambda: apply_rope(torch.randn(1, 10, 2, 16), torch.randn(1, 10, 1, 16), cu_seqlens=torch.tensor([0, 10])),
     ValueError, r"cu_seqlens needs packed \(T, H, D\)"),
    (lambda: apply_rope(*_qk(), scaling={"rope_type": "linear", "factor": 2.0}), TypeError, "RopeScaling.from_hf"),
    (lambda: apply_rope(*_qk(), backend="bogus"), ValueError, "backend='bogus'"),
    (lambda: apply_rope(*_qk(), position_offset=1.5), TypeError, "position_offset must be an int"),
    (lambda: apply_rope(torch.randn(4, 1, 8, requires_grad=True), torch.randn(4, 1, 8), inplace=True), ValueError,
     "q is a leaf tensor that requires grad"),
]


@pytest.mark.parametrize("fn,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


# ----------------------------------------------------------------------------- GPU

def _packed_batch(num_docs, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(total - 1, generator=g)[: num_docs - 1].add(1).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D,R,inter", [(128, None, False), (128, None, True), (72, 40, False), (96, 64, True)])
def test_gpu_matches_reference(backend, dtype, D, R, inter):
    dev = torch.device("cuda")
    if not backends.available("rope", backend, dev):
        pytest.skip(f"{backend} backend not available")
    cu = _packed_batch(500, 32768).to(dev)
    T = 32768
    scaling = RopeScaling("yarn", 8.0, 4096)
    inv, af = rope_frequencies(D, 10000.0, scaling, rotary_dim=R)
    q, k = rand_qk(T, 8, 2, D, dtype)
    q, k = q.to(dev), k.to(dev)
    q0 = q.clone()
    out = apply_rope(q, k, cu_seqlens=cu, scaling=scaling, rotary_dim=R, interleaved=inter, position_offset=100_000,
                     backend=backend)
    assert torch.equal(q, q0)
    check_against_truth(out, q, k, positions_from_cu_seqlens(cu, T) + 100_000, inv.to(dev), af, inter)
    qi, ki = q.clone(), k.clone()
    apply_rope(qi, ki, cu_seqlens=cu, scaling=scaling, rotary_dim=R, interleaved=inter, position_offset=100_000,
               backend=backend, inplace=True)
    assert torch.equal(qi, out[0]) and torch.equal(ki, out[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_strided_batched_and_grads(backend):
    dev = torch.device("cuda")
    if not backends.available("rope", backend, dev):
        pytest.skip(f"{backend} backend not available")
    B, S, Hq, Hk, D = 2, 3000, 8, 2, 128
    qkv = torch.randn(B, S, Hq + 2 * Hk, D, device=dev, dtype=torch.bfloat16)
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk]
    pid = torch.randint(0, 1 << 20, (B, S), device=dev)
    inv, af = rope_frequencies(D, 10000.0)
    check_against_truth(apply_rope(q, k, position_ids=pid, backend=backend), q, k, pid, inv.to(dev), af, False)
    qg, kg = q.float().requires_grad_(), k.float().requires_grad_()
    g = torch.randn(B, S, Hq, D, device=dev)
    apply_rope(qg, kg, position_ids=pid, backend=backend)[0].mul(g).sum().backward()
    qr = q.double().requires_grad_()  # fp64 reference: exact angles, like the kernels
    apply_rope(qr, kg.detach().double(), position_ids=pid, backend="reference")[0].mul(g.double()).sum().backward()
    torch.testing.assert_close(qg.grad, qr.grad.float(), rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    dev = torch.device("cuda")
    cu = torch.tensor([0, 300, 1000, 4096], dtype=torch.int32, device=dev)
    s = RopeScaling("dynamic", 2.0, 512)

    def f(q, k):
        qo, ko = apply_rope(q, k, cu_seqlens=cu, scaling=s)
        return qo.float().sum() + ko.float().square().sum()

    q = torch.randn(4096, 8, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4096, 2, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    got = torch.compile(f, fullgraph=True)(q, k)
    torch.testing.assert_close(got, f(q, k), rtol=1e-4, atol=0)  # same kernel; only the sum order differs
    got.backward()
    assert q.grad is not None and k.grad is not None
