"""Decomposition, packing, curricula and audit against their pure-Python references (hypothesis)."""
import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lengen_fast import backends
from lengen_fast.data import (CURRICULA, Decomposition, audit, bucket_schedule, concat_chunk, decompose, decompose_numpy,
                              decompose_ref, embedded_corpus, open_tokens, pack_bfd, pack_bfd_ref,
                              pack_first_fit_ref, synthetic_lengths)

needs_ext = pytest.mark.skipif(backends.cpu_ext() is None, reason="lengen_fast._C not built")

# zero-length, single-token and huge documents
lengths_st = st.lists(st.one_of(st.integers(0, 3), st.integers(0, 600), st.integers(0, 40000)),
                      min_size=0, max_size=60)
lo_st = st.sampled_from([1, 2, 4, 16, 64, 256])
hi_st = st.sampled_from([64, 256, 1024, 4096])


def _same_decomposition(a, b):
    assert a.num_buckets == b.num_buckets
    for i in range(a.num_buckets):
        np.testing.assert_array_equal(a.docs[i], b.docs[i])
        np.testing.assert_array_equal(a.starts[i], b.starts[i])
    for x, y in ((a.rem_doc, b.rem_doc), (a.rem_start, b.rem_start), (a.rem_len, b.rem_len)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert (a.tokens_dropped, a.pieces_dropped, a.tokens_total, a.num_empty) == \
           (b.tokens_dropped, b.pieces_dropped, b.tokens_total, b.num_empty)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, lo=lo_st, hi=hi_st, remainder=st.booleans())
def test_decompose_matches_reference(lengths, lo, hi, remainder):
    lo, hi = min(lo, hi), max(lo, hi)
    ref = decompose_ref(lengths, lo, hi, remainder=remainder)
    _same_decomposition(decompose_numpy(lengths, lo, hi, remainder=remainder), ref)
    if backends.cpu_ext() is not None:
        _same_decomposition(decompose(lengths, lo, hi, remainder=remainder, backend="cpu"), ref)
    # every token is in exactly one piece or counted as dropped
    cover = {i: np.zeros(n, np.int64) for i, n in enumerate(lengths)}
    for b in range(ref.num_buckets + remainder):
        for d, s, n in zip(*ref.bucket(b)):
            cover[d][s:s + n] += 1
    assert sum(int((c == 0).sum()) for c in cover.values()) == ref.tokens_dropped
    assert all(c.max(initial=0) <= 1 for c in cover.values())
    if remainder:
        assert ref.tokens_dropped == 0


def _cpu_raw(lengths, lo, hi, remainder, simd):
    """The C++ kernel with the AVX-512 fill (when compiled in) or the scalar fill forced."""
    d, s, rd, rs, rl, dt, dp, total, empty = backends.cpu_ext().data_decompose(
        np.asarray(lengths, np.int64), lo, hi, remainder, simd)
    rem = (rd, rs, rl) if remainder else (None, None, None)
    return Decomposition(lo, hi, list(d), list(s), *rem, len(lengths), int(total), int(dt), int(dp), int(empty))


@needs_ext
@pytest.mark.parametrize("simd", [True, False])
def test_decompose_large_parallel_matches_numpy(simd):
    lengths = synthetic_lengths(300_000, seed=3, mean=3000, sigma=1.5)  # > the C++ parallel threshold
    for lo, hi, rem in ((256, 8192, False), (64, 2048, True), (128, 128, False), (1, 1 << 40, True)):
        _same_decomposition(_cpu_raw(lengths, lo, hi, rem, simd), decompose_numpy(lengths, lo, hi, remainder=rem))


@needs_ext
@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.one_of(st.integers(0, 5000), st.integers(0, (1 << 31) - 1)), min_size=0, max_size=40),
       longest=st.sampled_from([None, (1 << 31) - 1, 1 << 31, (1 << 40) + 12345]),
       lo=st.sampled_from([1, 256, 1 << 20, 1 << 31]), hi=st.sampled_from([1 << 30, 1 << 31, 1 << 45]),
       remainder=st.booleans(), simd=st.booleans())
def test_decompose_huge_lengths_and_buckets(lengths, longest, lo, hi, remainder, simd):
    # lengths and bucket bits around 2^31: int32 outputs while every length < 2^31, else int64, and
    # bucket bits the int32 fill must skip; max_len >= 2^30 keeps the number of max_len pieces small
    lengths = lengths + ([] if longest is None else [longest])
    lo, hi = min(lo, hi), max(lo, hi)
    _same_decomposition(_cpu_raw(lengths, lo, hi, remainder, simd),
                        decompose_numpy(lengths, lo, hi, remainder=remainder))


@needs_ext
def test_decompose_arrays_outlive_the_result():
    # every bucket array is a view of one C++ allocation, owned by whichever arrays survive
    d = decompose(synthetic_lengths(150_000, seed=4), 256, 8192, backend="cpu")
    want = decompose_numpy(synthetic_lengths(150_000, seed=4), 256, 8192)
    kept = d.starts[1]
    del d
    gc.collect()
    junk = [np.ones(1 << 20) for _ in range(8)]  # reuse freed memory if the view dangled
    np.testing.assert_array_equal(kept, want.starts[1])
    del junk


def test_decompose_example_and_arrow():
    d = decompose([0, 1000, 300, 9000], min_len=256, max_len=4096)
    # 1000 = 512 + 256 (+232 dropped); 300 = 256 (+44); 9000 = 2 * 4096 + 512 + 256 (+40)
    assert d.summary()["buckets"] == {256: 3, 512: 2, 1024: 0, 2048: 0, 4096: 2}
    assert d.tokens_dropped == 232 + 44 + 40 and d.pieces_dropped == 3 and d.num_empty == 1
    t = d.to_arrow()
    assert t.column_names == ["doc", "start", "length"]
    rows = list(zip(*(t.column(c).to_pylist() for c in t.column_names)))
    assert rows == [(1, 512, 256), (2, 0, 256), (3, 8960 - 256, 256), (1, 0, 512), (3, 8192, 512),
                    (3, 0, 4096), (3, 4096, 4096)]
    d2 = decompose([1000], 256, 4096, remainder=True)
    assert d2.to_arrow(bucket=d2.num_buckets).to_pylist() == [{"doc": 0, "start": 768, "length": 232}]


DECOMP_BAD = [
    (dict(min_len=100), ValueError, "min_len must be a positive power of two, got 100"),
    (dict(max_len=3000), ValueError, "max_len must be a positive power of two, got 3000"),
    (dict(min_len=0), ValueError, "min_len must be a positive power of two"),
    (dict(min_len=512, max_len=256), ValueError, r"min_len \(512\) must be <= max_len \(256\)"),
    (dict(lengths=[3, -1]), ValueError, r"lengths must be non-negative \(document 1 has -1\)"),
    (dict(lengths=[[1, 2]]), ValueError, "lengths must be 1-D"),
    (dict(lengths=[1.5]), TypeError, "lengths must hold integers"),
]


@pytest.mark.parametrize("kw,exc,match", DECOMP_BAD)
def test_decompose_bad_input(kw, exc, match):
    kw = {"lengths": [5, 300], **kw}
    with pytest.raises(exc, match=match):
        decompose(kw.pop("lengths"), **kw)


def _covers_exactly(p, lengths, truncated_ok=False):
    cover = [np.zeros(n, np.int64) for n in lengths]
    for b, d, s, n in zip(p.bin, p.doc, p.start, p.length):
        assert 0 < n <= p.capacity
        cover[d][s:s + n] += 1
    for i, c in enumerate(cover):
        assert c.max(initial=0) <= 1
        if not truncated_ok:
            assert c.min(initial=1) == 1, f"document {i} not fully packed"
    assert np.all(np.diff(p.bin) >= 0)
    assert np.all(p.bin_fill <= p.capacity) and np.all(p.bin_fill > 0)
    assert p.bin.max(initial=-1) == p.num_bins - 1


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, capacity=st.integers(1, 5000), split_long=st.booleans())
def test_bfd_matches_reference(lengths, capacity, split_long):
    ref = pack_bfd_ref(lengths, capacity, split_long=split_long)
    _covers_exactly(ref, lengths, truncated_ok=not split_long)
    impls = [pack_bfd(lengths, capacity, split_long=split_long, backend="reference")]
    if backends.cpu_ext() is not None:
        impls.append(pack_bfd(lengths, capacity, split_long=split_long, backend="cpu"))
    for p in impls:
        _covers_exactly(p, lengths, truncated_ok=not split_long)
        # ties between bins with equal free space may resolve differently; the fills may not
        assert p.num_bins == ref.num_bins
        np.testing.assert_array_equal(np.sort(p.bin_fill), np.sort(ref.bin_fill))
        assert p.tokens_truncated == ref.tokens_truncated
        expected = sum(max(n - capacity, 0) for n in lengths) if not split_long else 0
        assert p.tokens_truncated == expected


def test_bfd_efficiency_and_arrow():
    lengths = [3000, 1096, 2000, 2000, 100, 10000]
    p = pack_bfd(lengths, 4096)
    assert p.num_bins == 5  # 2 full bins of the 10000 doc, {3000,1096}, {2000,2000,96 of ...}
    eff = p.efficiency
    assert eff["truncated_pct"] == 0.0
    assert eff["padding_pct"] == pytest.approx(100 * (5 * 4096 - sum(lengths)) / (5 * 4096))
    t = p.to_arrow()
    assert t.column_names == ["bin", "doc", "start", "length"] and t.num_rows == len(p.doc)
    pt = pack_bfd(lengths, 4096, split_long=False)
    assert pt.tokens_truncated == 10000 - 4096
    assert pt.efficiency["truncated_pct"] == pytest.approx(100 * (10000 - 4096) / sum(lengths))


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, seq_len=st.integers(1, 3000), drop_last=st.booleans(), seed=st.integers(0, 5))
def test_concat_chunk_matches_reference(lengths, seq_len, drop_last, seed):
    order = np.random.default_rng(seed).permutation(len(lengths))
    p = concat_chunk(lengths, seq_len, order=order, drop_last=drop_last)
    # reference: walk the concatenation token by token
    stream = [(int(d), t) for d in order for t in range(lengths[d])]
    rows = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    if drop_last and rows and len(rows[-1]) < seq_len:
        rows = rows[:-1]
    assert p.num_bins == len(rows)
    got = [[] for _ in rows]
    for b, d, s, n in zip(p.bin, p.doc, p.start, p.length):
        got[b] += [(int(d), int(t)) for t in range(s, s + n)]
    assert got == rows
    assert p.tokens_truncated == len(stream) - sum(map(len, rows))


def test_first_fit_is_no_better_than_bfd():
    lengths = synthetic_lengths(3000, seed=1, mean=900)
    bfd, ff = pack_bfd(lengths, 4096), pack_first_fit_ref(lengths, 4096)
    _covers_exactly(ff, lengths)
    assert bfd.num_bins <= ff.num_bins


BFD_BAD = [(dict(capacity=0), ValueError, "capacity must be a positive int, got 0"),
           (dict(capacity=2.5), ValueError, "capacity must be a positive int"),
           (dict(lengths=[-2]), ValueError, "lengths must be non-negative")]


@pytest.mark.parametrize("kw,exc,match", BFD_BAD)
def test_bfd_bad_input(kw, exc, match):
    kw = {"lengths": [5, 300], "capacity": 64, **kw}
    with pytest.raises(exc, match=match):
        pack_bfd(kw.pop("lengths"), **kw)


# -- curricula -------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=7), cur=st.sampled_from(CURRICULA),
       cycles=st.integers(1, 5), seed=st.integers(0, 3))
def test_schedule_uses_every_batch_once(counts, cur, cycles, seed):
    s = bucket_schedule(counts, cur, cycles, rng=np.random.default_rng(seed))
    got = np.bincount(s, minlength=len(counts))[:len(counts)] if s.size else np.zeros(len(counts), int)
    if cur == "uniform":
        nz = [c for c in counts if c]
        expected = [min(nz) if c else 0 for c in counts] if nz else [0] * len(counts)
    else:
        expected = counts
    np.testing.assert_array_equal(got, expected)
    if s.size:
        assert s[0] == max(i for i, c in enumerate(counts) if c)  # the longest bucket first: OOM at step 0


def test_grow_and_shrink_order_lengths():
    counts = [200, 200, 200, 200]
    rng = np.random.default_rng(0)
    mean_pos = {}
    for cur in ("grow_p2", "grow_linear", "natural", "shrink"):
        s = bucket_schedule(counts, cur, 1, rng=rng)[1:]
        mean_pos[cur] = [np.flatnonzero(s == b).mean() for b in range(4)]
    assert np.all(np.diff(mean_pos["grow_p2"]) > 0)       # short buckets early, long late
    assert np.all(np.diff(mean_pos["grow_linear"]) > 0)
    assert np.all(np.diff(mean_pos["shrink"]) < 0)
    spread = (lambda m: m[-1] - m[0])
    assert spread(mean_pos["grow_p2"]) > spread(mean_pos["grow_linear"]) > abs(spread(mean_pos["natural"]))
    # cycles: each cycle grows again
    s = bucket_schedule(counts, "grow_p2", 4, rng=rng)
    quarters = s.reshape(4, -1)
    assert all(q[: len(q) // 4].mean() < q[-len(q) // 4:].mean() for q in quarters[1:])


def test_curriculum_bad_input():
    with pytest.raises(ValueError, match="curriculum must be one of"):
        bucket_schedule([1, 2], "grow_p3", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_cycles must be a positive int, got 0"):
        bucket_schedule([1, 2], "natural", 0, rng=np.random.default_rng(0))


# -- audit -----------------------------------------------------------------------------------
def test_audit_warns_about_short_documents():
    lengths = np.concatenate([np.full(920, 300), np.full(80, 3000), [0, 0]])
    r = audit(lengths, context_len=4096)
    assert r.num_docs == 1002 and r.num_empty == 2
    text = str(r)
    assert "92% of documents are shorter than 512 tokens; a 4,096-token context will rarely see a long document" \
        in text
    assert "2 documents (0.2%) are empty" in text
    d = r.to_dict()
    assert d["percentiles"]["p50"] == 300 and d["percentiles"]["max"] == 3000
    assert sum(b["docs"] for b in d["buckets"]) == 1002
    assert sum(b["tokens_pct"] for b in d["buckets"]) == pytest.approx(100)
    assert any("documents shorter than min_len=256" not in w for w in r.warnings)


def test_audit_embedded_corpus():
    r = audit(open_tokens(embedded_corpus()), context_len=2048)
    assert r.num_tokens > 1_000_000 and isinstance(r.to_dict()["warnings"], list)
    with pytest.raises(ValueError, match="context_len must be a positive int"):
        audit([1, 2], context_len=0)
