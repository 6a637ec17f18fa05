"""What happens on bad input? One table per family of issue 15 (each case: the exception type and a fragment of
its message, which names the argument), and NaN/Inf propagation: every backend gives the reference's outputs.

Families here: 2 (NaN, Inf and overflow in attention and RoPE; integers too large for the op schema) and the
config parts of 3 (RopeScaling.from_hf, PackedCollator rows, hf.register). Untrusted files and trainer configs
have their own tests (test_data_*.py, test_train.py).

NaN semantics (the reference is the spec; notes/attention.md): a non-finite q, k, v reaches exactly the outputs
and gradients of the (query, key) pairs that can see each other; nothing crosses documents, windows or the causal
boundary, not even the 0 * NaN of a masked pair inside a tile that straddles the mask.
"""
from __future__ import annotations

import pytest
import torch

from lengen_fast import apply_rope, backends, flash_attn_varlen_func, varlen_attention
from lengen_fast.attention import op as attention_op
from lengen_fast.reference import ROPE_MAX_ANGLE, ROPE_MAX_POSITION, apply_rope_ref, varlen_attention_ref
from lengen_fast.rope.scaling import RopeScaling, rope_frequencies

from helpers.attention_cases import ATOL, cu_seqlens
from helpers.tolerance import assert_rule

NAN, INF = float("nan"), float("inf")


def _qkv(T=12, H=2, Hkv=1, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, H, D, generator=g).to(dtype), torch.randn(T, Hkv, D, generator=g).to(dtype),
            torch.randn(T, Hkv, D, generator=g).to(dtype))


def _attn(**kw):
    q, k, v = _qkv()
    return lambda: varlen_attention(q, k, v, cu_seqlens([5, 7]), **kw)


def _rope(**kw):
    q, k, _ = _qkv(T=8)
    return lambda: apply_rope(q, k, **kw)


def _scaling(**kw):
    return lambda: RopeScaling(**kw)


def _from_hf(params, mpe=None):
    return lambda: RopeScaling.from_hf(params, mpe)


_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)

# ------------------------------------------------------------------------------------------- family 2: the table

FAMILY2 = [
    # overflow: scores that overflow fp32 are refused up front (never all zeros, never silent NaN rows)
    ("scale_overflow", _attn(softmax_scale=1e30), ValueError, "softmax_scale=1e+30 is too large"),
    ("scale_overflow_neg", _attn(softmax_scale=-1e30), ValueError, "|softmax_scale| must be <= 2**16"),
    ("scale_inf", _attn(softmax_scale=INF), ValueError, "softmax_scale must be a finite number"),
    ("scale_bool", _attn(softmax_scale=True), ValueError, "softmax_scale must be a finite number"),
    ("softcap_inf", _attn(softcap=INF), ValueError, "softcap must be a finite number"),
    ("dropout_nan", lambda: flash_attn_varlen_func(*_qkv(), cu_seqlens([5, 7]), cu_seqlens([5, 7]), 7, 7,
                                                   dropout_p=NAN), ValueError, "dropout_p=nan is not supported"),
    ("softcap_nan", _attn(softcap=NAN), ValueError, "softcap must be a finite number"),
    # integers beyond the op schema's int64 / the kernels' int32: our error, not the dispatcher's
    ("window_2p63", _attn(window_size=(2**63, 0)), ValueError, "window_size must be a pair"),
    ("window_2p31", _attn(window_size=(-1, 2**31)), ValueError, "ints in [-1, 2**31 - 1]"),
    ("window_neg_2p63", _attn(window_size=(-2**63, 0)), ValueError, "window_size must be a pair"),
    ("max_seqlen_2p63", _attn(max_seqlen_q=2**63), ValueError, "max_seqlen_q must be None or a non-negative int <= 2**31 - 1"),
    ("max_seqlen_k_neg", _attn(max_seqlen_k=-1), ValueError, "max_seqlen_k must be None or a non-negative int"),
    ("rope_offset_2p63", _rope(position_offset=2**63), ValueError, "position_offset=9223372036854775808"),
    ("rope_offset_neg_2p63", _rope(position_offset=-2**63), ValueError, "position_offset=-9223372036854775808"),
    # RoPE positions beyond the accurate fp32 range: refused (the device kernels give NaN; see below)
    ("rope_offset_2p24", _rope(position_offset=2**24), ValueError, "is outside (-2**24, 2**24)"),
    ("rope_angle", _rope(position_offset=7_000_000), ValueError, "positions reach 7000007"),
    ("rope_ids_int64_2p31", _rope(position_ids=torch.tensor([0, 1, 2, 3, 4, 5, 6, 2**31 + 5])), ValueError,
     "positions reach 2147483653"),
    ("rope_ids_neg", _rope(position_ids=-torch.arange(8) * 1_000_000), ValueError, "positions reach 7000000"),
    ("rope_cu_int64_2p32", _rope(cu_seqlens=torch.tensor([0, 2**32 + 3, 8])), ValueError,
     "cu_seqlens values must fit in int32"),
    # scaling numbers that would silently disable or corrupt the rotation
    ("factor_inf", _scaling(kind="linear", factor=INF), ValueError, "RopeScaling.factor=inf must be finite"),
    ("factor_nan", _scaling(kind="linear", factor=NAN), ValueError, "RopeScaling.factor=nan must be finite"),
    ("factor_str", _scaling(kind="linear", factor="8"), TypeError, "RopeScaling.factor must be a number"),
    ("orig_inf", _scaling(kind="yarn", factor=4.0, original_max_position_embeddings=INF), ValueError,
     "RopeScaling.original_max_position_embeddings=inf must be finite"),
    ("beta_neg", _scaling(kind="yarn", factor=4.0, original_max_position_embeddings=4096, beta_fast=-1.0),
     ValueError, "RopeScaling.beta_fast=-1.0 must be > 0"),
    ("attention_factor_nan", _scaling(kind="yarn", factor=4.0, original_max_position_embeddings=4096,
                                      attention_factor=NAN), ValueError, "RopeScaling.attention_factor=nan"),
    ("rope_theta_inf", _scaling(kind="none", rope_theta=INF), ValueError, "RopeScaling.rope_theta=inf"),
    ("longrope_nan", _scaling(kind="longrope", factor=2.0, original_max_position_embeddings=4096,
                              short_factor=[1.0, NAN], long_factor=[1.0, 2.0]), ValueError,
     "RopeScaling.short_factor[1]=nan must be finite"),
    ("longrope_zero", _scaling(kind="longrope", factor=2.0, original_max_position_embeddings=4096,
                               short_factor=[1.0, 1.0], long_factor=[0.0, 2.0]), ValueError,
     "RopeScaling.long_factor[0]=0.0 must be > 0"),
    ("base_inf", _rope(base=INF), ValueError, "base=inf must be a finite number > 1"),
]


@pytest.mark.parametrize("name,call,exc,fragment", FAMILY2, ids=[c[0] for c in FAMILY2])
def test_family2_refused(name, call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value), f"{name}: {info.value}"


# ------------------------------------------------------------------------------- family 2: accepted edge inputs

def test_large_scale_is_a_hard_max_not_zeros():
    """The largest accepted softmax_scale (2^16) turns attention into a near-argmax on every backend."""
    q, k, v = _qkv(T=24, D=16)
    cu = cu_seqlens([9, 15])
    ref = varlen_attention_ref(q, k, v, cu, softmax_scale=2.0**16)
    assert torch.isfinite(ref).all() and ref.abs().sum() > 0
    for backend in _attention_backends():
        got = varlen_attention(q, k, v, cu, softmax_scale=2.0**16, backend=backend)
        assert torch.isfinite(got).all(), backend
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=backend)


def test_rope_large_positions_accepted_where_accurate():
    """Linear scaling (factor 8) keeps position 7e6 within the accurate angle range: accepted, and the kernels
    rotate by the exact angle (against fp64)."""
    scaling = RopeScaling(kind="linear", factor=8.0)
    q, k, _ = _qkv(T=8)
    pos = torch.arange(8) + 7_000_000
    inv, af = rope_frequencies(16, scaling=scaling)
    truth = apply_rope_ref(q.double(), k.double(), pos, inv.double(), af, compute_dtype=torch.float64)
    for backend in ("cpu", "triton", "reference") if backends.has_triton() else ("cpu", "reference"):
        got = apply_rope(q, k, position_ids=pos, scaling=scaling, backend=backend)
        for g_, t_ in zip(got, truth):
            assert torch.isfinite(g_).all(), backend
            if backend != "reference":  # the reference forms the angle in fp32, as Hugging Face does
                torch.testing.assert_close(g_.double(), t_, rtol=0, atol=2e-5, msg=backend)


def test_from_hf_numeric_strings_converted():
    a = RopeScaling.from_hf({"rope_type": "linear", "factor": "8"})
    assert a == RopeScaling.from_hf({"rope_type": "linear", "factor": 8})
    b = RopeScaling.from_hf({**_LLAMA3, "low_freq_factor": "1", "original_max_position_embeddings": "8192"})
    assert b == RopeScaling.from_hf(_LLAMA3)


def _rope_kernel_backends():
    return [b for b in ("cpu", "triton") if b != "triton" or backends.has_triton()]


@pytest.mark.parametrize("backend", _rope_kernel_backends())
def test_rope_out_of_range_positions_are_nan_in_kernels(backend):
    """Below the public API (which refuses them where it can see them), out-of-range positions are NaN in the
    kernels exactly where the reference has NaN; in-range ones are rotated."""
    inv, af = rope_frequencies(16)
    q, k, _ = _qkv(T=8)
    q, k = q[None], k[None]                                                           # (1, S, H, D)
    pos = torch.tensor([[0, 5, 6_000_000, 7_000_000, ROPE_MAX_POSITION - 1, ROPE_MAX_POSITION,
                         ROPE_MAX_POSITION + 1, -2**25]], dtype=torch.int32)
    ref = torch.ops.lengen.rope(q, k, inv, None, pos, 0, af, False, False, "reference")
    got = torch.ops.lengen.rope(q, k, inv, None, pos, 0, af, False, False, backend)
    for g_, r_ in zip(got, ref):
        assert torch.equal(g_.isnan(), r_.isnan())
        assert not r_[0, :2].isnan().any() and r_[0, 5:].isnan().all()
    # the angle limit applies per frequency: at 7e6 only the fastest pair (inv_freq 1) is out of range
    assert ref[0][0, 3].isnan().any() and not ref[0][0, 3].isnan().all()
    assert 7_000_000 * float(inv.max()) > ROPE_MAX_ANGLE


def test_rope_int64_ids_saturate_where_the_host_cannot_check(monkeypatch):
    """The path of a device call (positions unknown to the host, simulated here on the CPU kernel): int64 ids
    beyond int32 saturate, so they come out NaN, never wrapped onto a small in-range position (2^32 + 3 -> 3)."""
    from lengen_fast.rope import api
    monkeypatch.setattr(api, "_max_abs_position", lambda *args: None)
    q, k, _ = _qkv(T=2)
    out_q, out_k = apply_rope(q, k, position_ids=torch.tensor([3, 2**32 + 3]), backend="cpu")
    ref_q, _ = apply_rope(q, k, position_ids=torch.tensor([3, 3]), backend="cpu")
    assert torch.equal(out_q[0], ref_q[0]) and out_q[1].isnan().all() and out_k[1].isnan().all()


# ----------------------------------------------------------------------------- family 2: NaN / Inf propagation

def _attention_backends():
    """Every kernel backend that can run on this machine's CPU tensors (the GPU peers cannot)."""
    cpu = torch.device("cpu")
    return [b for b in attention_op._supported() if b != "reference" and backends.available("attention", b, cpu)]


def _run(backend, q, k, v, dout, cu, causal, window):
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = varlen_attention(*xs, cu, causal=causal, window_size=window, return_lse=True, backend=backend)
    out.backward(dout)
    return [out.detach(), lse] + [x.grad for x in xs]


def _reference(q, k, v, dout, cu, causal, window, dtype):
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = varlen_attention_ref(*xs, cu, causal=causal, window_size=window, return_lse=True, upcast=False)
    out.backward(dout.to(dtype))
    return [out.detach(), lse] + [x.grad for x in xs]


# (documents, token that gets the bad value): the token sits inside a tile for both the C++ (64) and the
# interpreter's (16) tiles, so some rows of its tile cannot see it (the 0 * NaN trap).
NAN_LAYOUTS = {"small": ((3, 21, 9), 3 + 9), "long": ((3, 150), 3 + 70)}
MASKS = {"causal": (True, (-1, -1)), "window": (False, (3, 2))}


# -inf in q or k is covered by +inf (a score of either sign); an upstream gradient is checked with NaN only
BAD_VALUES = [("q", NAN), ("k", NAN), ("v", NAN), ("dout", NAN), ("q", INF), ("k", INF), ("v", INF), ("v", -INF)]
# long documents are sized for the C++ kernel's 64-row tiles
BACKEND_LAYOUTS = [(b, layout) for b in _attention_backends() for layout in NAN_LAYOUTS
                   if layout == "small" or b == "cpu"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in Triton's interpreter
@pytest.mark.parametrize("where,value", BAD_VALUES, ids=[f"{w}={v}" for w, v in BAD_VALUES])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend,layout", BACKEND_LAYOUTS, ids=[f"{b}-{lay}" for b, lay in BACKEND_LAYOUTS])
def test_nonfinite_propagation_matches_reference(backend, layout, dtype, mask, where, value):
    lens, token = NAN_LAYOUTS[layout]
    causal, window = MASKS[mask]
    T = sum(lens)
    q, k, v = _qkv(T=T, H=2, Hkv=1, D=32, dtype=dtype, seed=1)
    dout = torch.randn(T, 2, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    {"q": q, "k": k, "v": v, "dout": dout}[where][token, 0, 3] = value
    cu = cu_seqlens(lens)
    got = _run(backend, q, k, v, dout, cu, causal, window)
    truth = _reference(q, k, v, dout, cu, causal, window, torch.float64)
    eager = _reference(q, k, v, dout, cu, causal, window, dtype)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    bad_doc = int(doc[token])
    for name, g_, t_, e_ in zip(("out", "lse", "dq", "dk", "dv"), got, truth, eager):
        label = f"{backend} {name}"
        # the same outputs are non-finite; NaN exactly where the reference has NaN for a NaN input (an inf input
        # may give NaN or inf where the reference has inf: which one depends on summation order, e.g. Kahan)
        assert torch.equal(torch.isfinite(g_), torch.isfinite(t_)), f"{label}: non-finite pattern"
        if value != value:
            assert torch.equal(torch.isnan(g_), torch.isnan(t_)), f"{label}: NaN pattern"
        # never another document's
        tok_dim = 1 if name == "lse" else 0
        other = (doc != bad_doc)
        assert torch.isfinite(g_.index_select(tok_dim, other.nonzero()[:, 0])).all(), f"{label}: other documents"
        assert_rule(g_, t_, e_, ATOL[dtype] + 2 ** -23 * t_[torch.isfinite(t_)].abs().max().item(), label)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference"] + _attention_backends())
def test_nan_in_tail_tokens_reaches_nothing(backend):
    """Tokens after cu_seqlens[-1] belong to no document: NaN there changes no output (tail out stays 0)."""
    q, k, v = _qkv(T=20, H=2, Hkv=1, D=16)
    dout = torch.randn(20, 2, 16)
    cu = cu_seqlens([6, 11])                                                         # tokens 17..19: tail
    clean = _run(backend, q, k, v, dout, cu, True, (-1, -1))
    q[18], k[17], v[19], dout[18] = NAN, NAN, NAN, NAN
    dirty = _run(backend, q, k, v, dout, cu, True, (-1, -1))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(a, b), f"{backend} {name}"


def test_reference_nan_semantics():
    """The spec itself, checked by hand: a NaN value reaches exactly the rows that see its key (causal), in its
    column; a NaN query only its row; a key whose score is -inf weighs 0; a row that sees no key is 0."""
    q, k, v = _qkv(T=10, H=1, Hkv=1, D=8)
    cu = cu_seqlens([4, 6])
    v[6, 0, 2] = NAN                                                                 # doc 1, position 2
    out = varlen_attention_ref(q, k, v, cu)
    nan_rows = out[:, 0, 2].isnan().nonzero()[:, 0].tolist()
    assert nan_rows == [6, 7, 8, 9] and out[:, 0, [0, 1, 3]].isfinite().all()
    q2, k2, v2 = _qkv(T=10, H=1, Hkv=1, D=8)
    q2[5, 0, 0] = NAN
    out2, lse2 = varlen_attention_ref(q2, k2, v2, cu, return_lse=True)
    assert out2[:, 0].isnan().any(-1).nonzero()[:, 0].tolist() == [5]
    assert lse2[0].isnan().nonzero()[:, 0].tolist() == [5]
    # a row whose only visible key scores -inf: no weight at all, so out 0 and lse +inf (as a row with no key)
    q3, k3, v3 = _qkv(T=4, H=1, Hkv=1, D=8)
    q3 = q3.abs() + 0.1                                                              # every score of key 0: -inf
    k3[0] = -INF
    out3, lse3 = varlen_attention_ref(q3, k3, v3, cu_seqlens([4]), return_lse=True)
    assert torch.equal(out3[0], torch.zeros_like(out3[0])) and lse3[0, 0] == INF
    assert out3[1:].isfinite().all()


# ------------------------------------------------------------------------- family 3 (parts): the config tables

FAMILY3 = [
    ("from_hf_list", _from_hf([("rope_type", "linear")]), TypeError, "expects a mapping"),
    ("from_hf_str", _from_hf("linear"), TypeError, "expects a mapping"),
    ("from_hf_llama3_low0", _from_hf({**_LLAMA3, "low_freq_factor": 0}), ValueError,
     "RopeScaling.low_freq_factor=0.0 must be > 0"),
    ("from_hf_llama3_low_neg", _from_hf({**_LLAMA3, "low_freq_factor": -1}), ValueError, "low_freq_factor"),
    ("from_hf_factor_zero", _from_hf({"rope_type": "linear", "factor": 0}), ValueError, "RopeScaling.factor=0.0"),
    ("from_hf_factor_word", _from_hf({"rope_type": "linear", "factor": "eight"}), ValueError,
     "rope config 'factor'='eight' is not a number"),
    ("from_hf_factor_inf_str", _from_hf({"rope_type": "linear", "factor": "inf"}), ValueError,
     "rope config 'factor'=inf must be finite"),
    ("from_hf_factor_list", _from_hf({"rope_type": "linear", "factor": [8]}), TypeError,
     "rope config 'factor' must be a number"),
    ("from_hf_factor_bool", _from_hf({"rope_type": "linear", "factor": True}), TypeError,
     "rope config 'factor' must be a number"),
    ("from_hf_factor_missing", _from_hf({"rope_type": "linear"}), ValueError, "has no 'factor'"),
    ("from_hf_orig_zero", _from_hf({**_LLAMA3, "original_max_position_embeddings": 0}), ValueError,
     "'original_max_position_embeddings'=0.0 must be a positive integer"),
    ("from_hf_orig_fraction", _from_hf({**_LLAMA3, "original_max_position_embeddings": 4096.5}), ValueError,
     "must be a positive integer"),
    ("from_hf_mscale_nan_str", _from_hf({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096,
                                         "mscale": "nan"}), ValueError, "rope config 'mscale'=nan must be finite"),
    ("from_hf_truncate_str", _from_hf({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096,
                                       "truncate": "yes"}), TypeError, "'truncate' must be true or false"),
    ("from_hf_theta_str", _from_hf({"rope_type": "default", "rope_theta": "big"}), ValueError,
     "rope config 'rope_theta'='big' is not a number"),
    ("from_hf_short_factor_str", _from_hf({"rope_type": "longrope", "factor": 2.0, "short_factor": "1,2",
                                           "long_factor": [1.0, 2.0], "original_max_position_embeddings": 4096}),
     TypeError, "RopeScaling.short_factor must be a list of numbers"),
]


def _collate(rows):
    from lengen_fast.integrations.hf import PackedCollator
    return lambda: PackedCollator()(rows, return_tensors="pt")


FAMILY3 += [
    ("collator_2d_rows", _collate([{"input_ids": [[1, 2, 3], [4, 5, 6]]}]), ValueError,
     "features[0]['input_ids'] must be 1-D"),
    ("collator_2d_tensor", _collate([{"input_ids": [1, 2]}, {"input_ids": torch.ones(2, 3, dtype=torch.long)}]),
     ValueError, "features[1]['input_ids'] must be 1-D"),
    ("collator_3d", _collate([{"input_ids": torch.ones(1, 1, 3, dtype=torch.long)}]), ValueError,
     "got shape (1, 1, 3)"),
    ("collator_ragged", _collate([{"input_ids": [[1, 2], [3]]}]), ValueError, "not a rectangular array"),
    ("collator_2d_labels", _collate([{"input_ids": [1, 2, 3, 4], "labels": [[1, 2], [3, 4]]}]), ValueError,
     "features[0]['labels'] must be 1-D"),
    ("collator_float_ids", _collate([{"input_ids": [1.0, 2.0]}]), TypeError, "must hold integers"),
]


@pytest.mark.parametrize("name,call,exc,fragment", FAMILY3, ids=[c[0] for c in FAMILY3])
def test_family3_refused(name, call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value), f"{name}: {info.value}"


def test_collator_squeezes_1_by_s_rows():
    from lengen_fast.integrations.hf import PackedCollator
    flat = PackedCollator()([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}], return_tensors="pt")
    rows = PackedCollator()([{"input_ids": torch.tensor([[1, 2, 3]])}, {"input_ids": [[4, 5]]}], return_tensors="pt")
    assert flat.keys() == rows.keys()
    for key in flat:
        assert torch.equal(torch.as_tensor(flat[key]), torch.as_tensor(rows[key])), key


REGISTER = [
    ("sdpa", ValueError, "would replace an attention implementation transformers already has"),
    ("flash_attention_2", ValueError, "would replace"),
    ("flex_attention", ValueError, "would replace"),
    ("eager", ValueError, "(built in)"),
    ("paged|lengen", ValueError, "pick a plain name"),
    ("org/kernel", ValueError, "pick a plain name"),
    ("", TypeError, "name must be a non-empty str"),
    (3, TypeError, "name must be a non-empty str"),
]


@pytest.mark.parametrize("name,exc,fragment", REGISTER, ids=[str(r[0]) or "empty" for r in REGISTER])
def test_register_refuses_builtin_names(name, exc, fragment):
    pytest.importorskip("transformers")
    from transformers import AttentionInterface

    from lengen_fast.integrations import hf
    before = dict(AttentionInterface._global_mapping)
    with pytest.raises(exc) as info:
        hf.register(name)
    assert fragment in str(info.value)
    assert dict(AttentionInterface._global_mapping) == before                       # nothing was replaced


def test_register_default_name_is_idempotent():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface

    from lengen_fast.integrations import hf
    assert hf.register() == hf.register() == hf.ATTN_NAME
    assert AttentionInterface._global_mapping[hf.ATTN_NAME] is hf.lengen_attention_forward
    assert hf.register("my_varlen") == "my_varlen"
