"""Attention dispatch between ours and the installed peers (torch FA2, cuDNN): backends.select_attention, the measured
table, and the wrappers in lengen_fast/attention/peers.py that keep our guarantees on every route.

CPU: the peers' raw kernels are replaced by stand-ins (the reference, with garbage where a peer may leave memory
uninitialised: tail tokens, rows that see no key, cuDNN's padding), and CPU tensors are allowed on the peer routes.
That tests the routing (features, the no-hint rule, the table, bad tables, errors) and our wrappers (dead-row fixes,
lse layout conversions) end to end through the public op; the kernels themselves are `gpu` tests below.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lengen_fast import backends, varlen_attention
from lengen_fast.attention import op, peers
from lengen_fast.reference import varlen_attention_ref

from helpers.attention_cases import Case, backend_atol, check_outputs, cu_seqlens, make_inputs, run_op, small

GARBAGE = float("nan")


def _ref(q, k, v, cu_q, cu_k, causal, scale, left, right):
    return varlen_attention_ref(q, k, v, cu_q, cu_k, causal=causal, softmax_scale=scale, window_size=(left, right),
                                return_lse=True)


def _ref_grads(dout, q, k, v, cu_q, cu_k, causal, scale, left, right):
    def f(q_, k_, v_):
        return varlen_attention_ref(q_, k_, v_, cu_q, cu_k, causal=causal, softmax_scale=scale,
                                    window_size=(left, right))
    _, vjp = torch.func.vjp(f, q, k, v)
    return [g.contiguous() for g in vjp(dout)]


def _spoil_tails(xs, cus):
    """A peer leaves tokens at/after cu_seqlens[-1] uninitialised: make them NaN."""
    for x, cu in zip(xs, cus):
        x[int(cu[-1]):] = GARBAGE


class StandIns:
    """Fake raw peer kernels (reference math + garbage where the real ones may leave any value) and a call log."""

    def __init__(self):
        self.calls: list[str] = []

    def fa2_fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right):
        self.calls.append("fa2_fwd")
        assert isinstance(max_q, int) and isinstance(max_k, int)
        out, lse = _ref(q, k, v, cu_q, cu_k, causal, scale, left, right)
        dead = torch.isinf(lse[0])
        out[dead] = GARBAGE                   # rows that see no key: whatever the kernel wrote
        lse[:, dead] = -float("inf")
        _spoil_tails([out], [cu_q])
        return out, lse

    def fa2_bwd(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, left, right):
        self.calls.append("fa2_bwd")
        assert lse.shape == (q.shape[1], q.shape[0])
        grads = _ref_grads(dout, q, k, v, cu_q, cu_k, causal, scale, left, right)
        _spoil_tails(grads, [cu_q, cu_k, cu_k])
        return grads

    def cudnn_fwd(self, q, k, v, r, causal, scale):
        self.calls.append("cudnn_fwd")
        out, lse = _ref(q, k, v, r.cu_q[:r.B + 1], r.cu_k[:r.B + 1], causal, scale, -1, 0 if causal else -1)
        # cuDNN's padded stats (Bp, H, Sq, 1), written here with a plain loop (independent of peers' conversion)
        stats = torch.full((r.Bp, q.shape[1], r.Sq, 1), 12345.0)
        for b in range(r.B):
            a, e = int(r.cu_q[b]), int(r.cu_q[b + 1])
            stats[b, :, :e - a, 0] = lse[:, a:e]
        _spoil_tails([out], [r.cu_q])
        return out, stats

    def cudnn_bwd(self, dout, q, k, v, out, stats, r, causal, scale, deterministic):
        self.calls.append("cudnn_bwd" + ("_det" if deterministic else ""))
        lse = torch.full((q.shape[1], q.shape[0]), float("inf"))
        for b in range(r.B):
            a, e = int(r.cu_q[b]), int(r.cu_q[b + 1])
            lse[:, a:e] = stats[b, :, :e - a, 0]
        _, ref_lse = _ref(q, k, v, r.cu_q[:r.B + 1], r.cu_k[:r.B + 1], causal, scale, -1, 0 if causal else -1)
        fin = torch.isfinite(ref_lse)
        assert torch.allclose(lse[fin], ref_lse[fin], rtol=1e-3, atol=1e-3), "stats do not carry the forward's lse"
        grads = _ref_grads(dout, q, k, v, r.cu_q[:r.B + 1], r.cu_k[:r.B + 1], causal, scale, -1, 0 if causal else -1)
        _spoil_tails(grads, [r.cu_q, r.cu_k, r.cu_k])
        return grads


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    s = StandIns()
    monkeypatch.setattr(backends, "PEER_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(backends, "device_class", lambda device: "TESTGPU")
    monkeypatch.setattr(peers, "missing", lambda name: None)
    monkeypatch.setattr(peers, "fa2_fwd_kernel", s.fa2_fwd)
    monkeypatch.setattr(peers, "fa2_bwd_kernel", s.fa2_bwd)
    monkeypatch.setattr(peers, "cudnn_fwd_kernel", s.cudnn_fwd)
    monkeypatch.setattr(peers, "cudnn_bwd_kernel", s.cudnn_bwd)
    monkeypatch.setenv("LENGEN_DISPATCH_TABLE", str(tmp_path / "absent.json"))
    monkeypatch.delenv("LENGEN_BACKEND", raising=False)
    return s


def _table(tmp_path, monkeypatch, entries: dict, torch_version=None, version=backends.TABLE_VERSION,
           name="table.json") -> None:
    """Write a dispatch table {(dtype, D, mask, docs, pass): best} for device class TESTGPU and point to it."""
    doc = {"version": version, "torch": torch_version or torch.__version__, "entries": {
        backends.table_key("TESTGPU", dt, D, mask, docs, p): {"best": best, "ms": {best: 1.0}}
        for (dt, D, mask, docs, p), best in entries.items()}}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("LENGEN_DISPATCH_TABLE", str(path))


def _hinted(c: Case) -> Case:
    lens_k = c.lens_k or c.lens_q
    return Case(**{**c.__dict__, "max_seqlen": (max(c.lens_q), max(lens_k))})


def _run(c: Case, backend=None, deterministic=False, seed=0):
    inputs = make_inputs(c, seed)
    got = run_op(c, inputs, backend, deterministic)
    check_outputs(c, inputs, got, backend_atol(c), str(backend))
    return got


# empty documents, single tokens, tails, GQA, s_q != s_k (rows that see nothing), windows
ROUTE_CASES = {
    "causal_gqa_tail": small((0, 1, 37, 5, 0, 20), H=4, H_kv=2, tail=3),
    "sq_ne_sk_causal": small((10, 30, 5, 0), (20, 12, 0, 4), tail=2),
    "full_sq_ne_sk": small((7, 0, 12), (3, 9, 0), causal=False, tail=1),
}
WINDOW_CASE = small((0, 25, 3), (4, 30, 0), causal=False, window=(3, 2), tail=2)


def _call(**kw):
    base = dict(device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=128, heads=16, kv_heads=16, causal=True,
                window_left=-1, window_right=0, softcap=0.0, deterministic=False, max_seqlen_q=4096,
                max_seqlen_k=4096)
    return backends.AttentionCall(**{**base, **kw})


# ------------------------------------------------------------------------------------------ routing

def test_no_table_means_ours(stand_ins):
    c = _hinted(ROUTE_CASES["causal_gqa_tail"])
    _run(c)
    assert stand_ins.calls == []
    assert "absent" in backends.describe()["attention_dispatch_table"]


@pytest.mark.parametrize("fwd,bwd", [("fa2", "fa2"), ("cudnn", "cudnn"), ("fa2", "cudnn"), ("cudnn", "cpu"),
                                     ("cpu", "fa2")])
@pytest.mark.parametrize("name", list(ROUTE_CASES))
def test_table_routes_each_pass(stand_ins, tmp_path, monkeypatch, fwd, bwd, name):
    """The table picks each pass's kernel; out/lse/grads keep our contract (zero tails and dead rows, lse +inf)
    whichever ran, and the two passes may come from different kernels."""
    c = _hinted(ROUTE_CASES[name])
    mask = "causal" if c.causal else "full"
    docs = "short" if max(c.max_seqlen) <= backends.SHORT_DOCS_MAX else "long"
    # "cpu" = no entry for that pass: ours (on CPU the C++ kernels; a "triton" entry would run the interpreter)
    _table(tmp_path, monkeypatch, {("float16", c.D, mask, docs, p): r for p, r in (("fwd", fwd), ("bwd", bwd))
                                   if r != "cpu"})
    _run(c)
    want = [f"{fwd}_fwd"] * (fwd != "cpu") + [f"{bwd}_bwd"] * (bwd != "cpu")
    assert stand_ins.calls == want


def test_window_route_fa2(stand_ins):
    _run(_hinted(WINDOW_CASE), backend="fa2")
    assert stand_ins.calls == ["fa2_fwd", "fa2_bwd"]


def test_no_hints_go_to_ours(stand_ins, tmp_path, monkeypatch):
    c = ROUTE_CASES["causal_gqa_tail"]
    _table(tmp_path, monkeypatch, {("float16", c.D, "causal", d, p): "fa2" for d in ("short", "long")
                                   for p in ("fwd", "bwd")})
    _run(c)                                                     # no max_seqlen hints
    assert stand_ins.calls == []
    _run(Case(**{**c.__dict__, "max_seqlen": (37, 37)}))
    assert stand_ins.calls == ["fa2_fwd", "fa2_bwd"]


@pytest.mark.parametrize("kw,fa2,cudnn", [
    (dict(), None, None),
    (dict(softcap=30.0), "softcap", "softcap"),
    (dict(dtype=torch.float32), "dtype", "dtype"),
    (dict(causal=False, window_left=128, window_right=0), None, "mask 'window'"),
    (dict(window_left=128), None, "mask 'causal_window'"),
    (dict(deterministic=True), "deterministic", None),
    (dict(max_seqlen_q=None), "max_seqlen", "max_seqlen"),
    (dict(device=torch.device("cpu")), "cpu", "cpu"),
])
def test_feature_support(kw, fa2, cudnn):
    call = _call(**kw)
    for name, want in (("fa2", fa2), ("cudnn", cudnn)):
        got = peers.unsupported(name, call)
        assert (got is None) if want is None else (want in got), (name, got)


@pytest.mark.parametrize("kw", [dict(softcap=30.0), dict(dtype=torch.float32), dict(window_left=64),
                                dict(deterministic=True)])
def test_features_a_peer_cannot_run_go_to_ours(stand_ins, tmp_path, monkeypatch, kw):
    call = _call(device=torch.device("cpu"), **kw)
    dt = str(call.dtype).removeprefix("torch.")
    _table(tmp_path, monkeypatch, {(dt, 128, call.mask_kind, "long", p): peer for p in ("fwd", "bwd")
                                   for peer in (("fa2",) if kw.get("deterministic") else ("cudnn",))})
    routes = {p: backends.select_attention(call, p, None, op._supported()) for p in ("fwd", "bwd")}
    if kw.get("deterministic"):
        assert routes == {"fwd": "fa2", "bwd": "cpu"}          # FA2's forward is deterministic; its backward is not
    elif "window_left" in kw:
        assert routes == {"fwd": "cpu", "bwd": "cpu"}          # cuDNN route: no window
    else:
        assert routes == {"fwd": "cpu", "bwd": "cpu"}


def test_fa2_deterministic_only_declines_the_backward():
    call = _call(deterministic=True)
    assert "deterministic" in peers.unsupported("fa2", call) and "deterministic" in peers.unsupported("fa2", call, "bwd")
    assert peers.unsupported("fa2", call, "fwd") is None


def test_cudnn_deterministic_flag_reaches_the_kernel(stand_ins):
    _run(_hinted(ROUTE_CASES["causal_gqa_tail"]), backend="cudnn", deterministic=True)
    assert stand_ins.calls == ["cudnn_fwd", "cudnn_bwd_det"]


def test_env_backend_peer(stand_ins, monkeypatch):
    monkeypatch.setenv("LENGEN_BACKEND", "cudnn")
    _run(_hinted(ROUTE_CASES["causal_gqa_tail"]))
    assert stand_ins.calls == ["cudnn_fwd", "cudnn_bwd"]
    stand_ins.calls.clear()
    _run(ROUTE_CASES["causal_gqa_tail"])                        # no hints: the environment is not strict
    assert stand_ins.calls == []


def test_short_and_long_doc_classes():
    assert _call(max_seqlen_q=64, max_seqlen_k=16).docs == "short"
    assert _call(max_seqlen_q=65, max_seqlen_k=16).docs == "long"
    assert [_call(**kw).mask_kind for kw in (dict(), dict(window_left=3), dict(causal=False, window_right=-1),
                                             dict(causal=False, window_right=2))] == \
        ["causal", "causal_window", "full", "window"]


# ------------------------------------------------------------------------------------------ bad input

def test_explicit_peer_errors_without_a_gpu(monkeypatch):
    monkeypatch.delenv("LENGEN_BACKEND", raising=False)
    c = _hinted(small((5, 7)))
    q, k, v, _, cu, _ = make_inputs(c)
    for name in ("fa2", "cudnn"):
        with pytest.raises(ValueError, match=f"backend='{name}' cannot run .*CUDA"):
            varlen_attention(q, k, v, cu, None, 7, 7, backend=name)


@pytest.mark.parametrize("backend,kw,match", [
    ("cudnn", dict(softcap=2.0), "backend='cudnn' cannot run this attention call: softcap"),
    ("fa2", dict(softcap=2.0), "backend='fa2' cannot run this attention call: softcap"),
    ("cudnn", dict(window_size=(3, 0)), "mask 'causal_window'"),
    ("fa2", dict(max_seqlen_q=None), "without max_seqlen_q/max_seqlen_k hints"),
    ("fa2", dict(deterministic=True), "deterministic=True"),
])
def test_explicit_peer_cannot_run_features(stand_ins, backend, kw, match):
    c = small((5, 7))
    q, k, v, _, cu, _ = make_inputs(c)
    args = dict(max_seqlen_q=7, max_seqlen_k=7)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, cu, None, args.pop("max_seqlen_q"), args.pop("max_seqlen_k"), backend=backend,
                         **args)
    with pytest.raises(ValueError, match="cannot run"):
        varlen_attention(q.float(), k.float(), v.float(), cu, None, 7, 7, backend=backend)   # fp32


def test_explicit_peer_missing_package(stand_ins, monkeypatch):
    monkeypatch.setattr(peers, "missing", lambda name: "package nvidia-cudnn-frontend is not installed "
                        "(import cudnn failed)" if name == "cudnn" else None)
    q, k, v, _, cu, _ = make_inputs(small((5, 7)))
    with pytest.raises(ValueError, match="backend='cudnn'.*nvidia-cudnn-frontend"):
        varlen_attention(q, k, v, cu, None, 7, 7, backend="cudnn")


@pytest.mark.parametrize("content,match", [
    ("{not json", "corrupt dispatch table"),
    (json.dumps({"version": 99, "entries": {}}), "corrupt dispatch table.*version 99"),
    (json.dumps({"version": 1, "torch": torch.__version__,
                 "entries": {"TESTGPU|float16|32|causal|long|fwd": {"best": "flash9"}}}), "bad entry"),
    (json.dumps({"version": 1, "torch": torch.__version__, "entries": {"a|b": {"best": "fa2"}}}), "bad entry"),
    (json.dumps({"version": 1, "torch": "1.0.0", "entries": {
        "TESTGPU|float16|32|causal|short|fwd": {"best": "fa2"}}}), "stale dispatch table"),
])
def test_bad_table_warns_and_uses_ours(stand_ins, tmp_path, monkeypatch, content, match):
    path = tmp_path / f"bad{abs(hash(content))}.json"
    path.write_text(content)
    monkeypatch.setenv("LENGEN_DISPATCH_TABLE", str(path))
    with pytest.warns(RuntimeWarning, match=match):
        _run(_hinted(small((5, 7))))
    assert stand_ins.calls == []
    assert backends.describe()["attention_dispatch_table"].startswith("ignored")


def test_committed_table_is_valid():
    """The table in the repo (absent until a GPU check measured one) loads without warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table, status = backends._load_table(str(backends.DISPATCH_TABLE), 0.0)
    assert status.startswith(("absent", "ok"))


# ------------------------------------------------------------------------------------------ wrappers

@settings(max_examples=30, deadline=None)
@given(lens_q=st.lists(st.integers(0, 9), min_size=1, max_size=4), data=st.data(), causal=st.booleans(),
       left=st.sampled_from([-1, 0, 2]), right=st.sampled_from([-1, 0, 3]), tail=st.integers(0, 3))
def test_dead_rows_and_keys_match_the_reference(lens_q, data, causal, left, right, tail):
    """dead_rows == rows whose reference lse is +inf (plus tails); dead_keys == keys with no visible query."""
    lens_k = data.draw(st.lists(st.integers(0, 9), min_size=len(lens_q), max_size=len(lens_q)))
    right = 0 if causal else right
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    Tq, Tk = sum(lens_q) + tail, sum(lens_k) + tail
    q, k = torch.randn(Tq, 1, 8, dtype=torch.float64), torch.randn(Tk, 1, 8, dtype=torch.float64)
    v = torch.randn(Tk, 1, 8, dtype=torch.float64)
    _, lse = varlen_attention_ref(q, k, v, cu_q, cu_k, causal=causal, window_size=(left, right), return_lse=True)
    assert torch.equal(peers.dead_rows(cu_q, cu_k, Tq, left, right), torch.isinf(lse[0]))
    # a key is live iff some query gives it a nonzero probability gradient path: check by brute force
    live = torch.zeros(Tk, dtype=torch.bool)
    for b in range(len(lens_q)):
        sq, sk = lens_q[b], lens_k[b]
        for i in range(sq):
            for j in range(sk):
                r = i + sk - sq
                if (left < 0 or j >= r - left) and (right < 0 or j <= r + right):
                    live[int(cu_k[b]) + j] = True
    assert torch.equal(peers.dead_keys(cu_q, cu_k, Tk, left, right), ~live)


def test_stats_round_trip():
    lens = (0, 5, 1, 0, 70, 3)
    cu = cu_seqlens(lens)
    T, H = sum(lens) + 4, 3
    lse = torch.randn(H, T)
    r = peers._Ragged(cu, cu, 70, 70)
    assert (r.Bp, r.Sq) == (8, 128) and r.len_q.shape == (8, 1, 1, 1) and int(r.len_q[6:].abs().sum()) == 0
    stats = peers.stats_from_lse(lse, cu, r)
    assert stats.shape == (r.Bp, H, r.Sq, 1)
    for b, n in enumerate(lens):
        assert torch.equal(stats[b, :, :n, 0], lse[:, int(cu[b]):int(cu[b]) + n])
    back = peers.lse_from_stats(stats, cu, T)
    assert torch.equal(back[:, :int(cu[-1])], lse[:, :int(cu[-1])])
    assert torch.equal(r.offsets("q", 12).flatten(), torch.cat([cu, cu[-1:].expand(2)]) * 12)


# ------------------------------------------------------------------------------------------ GPU (pytest -m gpu)

GPU_ROUTES = ["triton", "fa2", "cudnn"]
GPU_CASES = {
    "causal_gqa_tail_empty": Case((1, 700, 0, 1500, 33, 129, 0), H=8, H_kv=2, D=128, dtype=torch.bfloat16, tail=17),
    "causal_d64_fp16": Case((300, 0, 64, 1), H=4, H_kv=4, D=64, dtype=torch.float16, tail=3),
    "full_sq_ne_sk": Case((200, 0, 64, 9), (100, 7, 0, 30), H=4, H_kv=1, D=128, dtype=torch.bfloat16,
                          causal=False, tail=2),
    "causal_sq_gt_sk": Case((200, 40), (100, 7), H=4, H_kv=2, D=64, dtype=torch.bfloat16, tail=2),
    "packed_views": Case((19, 0, 260), H=4, H_kv=2, D=128, dtype=torch.bfloat16, tail=3, layout="packed"),
}


def _gpu_run(c: Case, backend, deterministic=False, seed=0):
    inputs = make_inputs(c, seed, "cuda")
    return inputs, run_op(c, inputs, backend, deterministic)


def _skip_missing(route):
    if route in backends.PEERS and peers.missing(route):
        pytest.skip(f"{route}: {peers.missing(route)}")


@pytest.mark.gpu
@pytest.mark.parametrize("route", GPU_ROUTES)
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_every_route_matches_reference(route, name):
    """Each route (forced with backend=) against the fp64 reference under flash-attn's rule, with tail tokens,
    empty documents and rows that see no key: out 0 / lse +inf / zero gradients there."""
    _skip_missing(route)
    c = _hinted(GPU_CASES[name])
    inputs, got = _gpu_run(c, route)
    check_outputs(c, [x.cpu() if x is not None else None for x in inputs], [x.cpu() for x in got], backend_atol(c), route)


@pytest.mark.gpu
def test_gpu_fa2_window():
    _skip_missing("fa2")
    c = _hinted(Case((300, 0, 64), (200, 5, 64), H=4, H_kv=1, D=128, dtype=torch.bfloat16, causal=False,
                     window=(50, 7), tail=2))
    inputs, got = _gpu_run(c, "fa2")
    check_outputs(c, [x.cpu() if x is not None else None for x in inputs], [x.cpu() for x in got],
                  backend_atol(c), "fa2 window")


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["triton", "cudnn"])
def test_gpu_deterministic_routes_bitwise(route):
    _skip_missing(route)
    c = _hinted(Case((3000, 17, 1000, 500), H=16, H_kv=2, D=128, dtype=torch.bfloat16, tail=9))
    _, first = _gpu_run(c, route, deterministic=True)
    for _ in range(3):
        _, again = _gpu_run(c, route, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("fwd,bwd", [("fa2", "triton"), ("triton", "cudnn"), ("cudnn", "fa2")])
def test_gpu_mixed_routes_through_table(tmp_path, monkeypatch, fwd, bwd):
    """Forward and backward from different kernels (the table may choose so): lse conversions hold."""
    for r in (fwd, bwd):
        _skip_missing(r)
    c = _hinted(GPU_CASES["causal_gqa_tail_empty"])
    cls = backends.device_class(torch.device("cuda"))
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"version": backends.TABLE_VERSION, "torch": torch.__version__, "entries": {
        backends.table_key(cls, torch.bfloat16, 128, "causal", "long", "fwd"): {"best": fwd},
        backends.table_key(cls, torch.bfloat16, 128, "causal", "long", "bwd"): {"best": bwd}}}))
    monkeypatch.setenv("LENGEN_DISPATCH_TABLE", str(path))
    call = op.attention_call(torch.empty(1, 8, 128, device="cuda", dtype=torch.bfloat16),
                             torch.empty(1, 2, 128, device="cuda"), *c.max_seqlen, True, -1, -1, 0.0, False)
    assert [backends.select_attention(call, p, None, op._supported()) for p in ("fwd", "bwd")] == [fwd, bwd]
    inputs, got = _gpu_run(c, None)
    check_outputs(c, [x.cpu() if x is not None else None for x in inputs], [x.cpu() for x in got],
                  backend_atol(c), f"{fwd}+{bwd}")
