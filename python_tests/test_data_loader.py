"""PackedLoader: batch layout, labels, exact resume, rank consistency, bad configs."""
import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lengen_fast import backends, reference
from lengen_fast.data import LoaderConfig, PackedLoader, open_tokens, synthetic_lengths, synthetic_table

IGN = -100


@pytest.fixture(scope="module")
def src():
    lengths = np.concatenate([synthetic_lengths(400, seed=0, mean=700, sigma=1.3), [0, 1, 2, 5000]])
    return open_tokens(synthetic_table(lengths, vocab_size=50000, seed=1, loss_mask=True),
                       loss_mask_column="loss_mask", vocab_size=50000)


@pytest.fixture(scope="module")
def src_nomask():
    lengths = synthetic_lengths(300, seed=5, mean=500, sigma=1.0)
    return open_tokens(synthetic_table(lengths, vocab_size=1000, seed=2, dtype=np.uint16))


def cfg(**kw):
    base = dict(strategy="vsl", tokens_per_batch=4096, max_len=1024, min_len=32, curriculum="grow_p2",
                num_cycles=2, seed=7, prefetch=0)
    return LoaderConfig(**{**base, **kw})


def _check_batch(b, src, c):
    n = c.tokens_per_batch // c.world_size
    for t in (b.input_ids, b.labels, b.position_ids):
        assert t.shape == (n,) and t.dtype == torch.int64
    cu = b.cu_seqlens
    assert cu.dtype == torch.int32 and b.row_cu_seqlens.dtype == torch.int32
    assert cu[0] == 0 and int(cu[-1]) == b.num_tokens <= n
    assert b.row_cu_seqlens[0] == 0 and b.row_cu_seqlens[-1] == cu[-1]
    assert set(b.row_cu_seqlens.tolist()) <= set(cu.tolist())  # rows are made of whole pieces
    assert int(torch.diff(b.row_cu_seqlens).max()) <= b.seq_len
    seg = torch.diff(cu)
    assert b.max_seqlen == int(seg.max())
    # positions restart at 0 in every piece, as the attention/rope reference computes them
    total = int(cu[-1])
    torch.testing.assert_close(b.position_ids[:total], reference.positions_from_cu_seqlens(cu, total))
    # labels: the next token of the same piece, never across a boundary, never into padding
    ids, lab = b.input_ids, b.labels
    ends = cu[1:].long() - 1
    assert torch.all(lab[ends] == IGN)
    assert torch.all(lab[total:] == IGN) and torch.all(ids[total:] == c.pad_id)
    inner = torch.ones(total, dtype=torch.bool)
    inner[ends] = False
    scored = lab[:total] != IGN
    idx = torch.nonzero(scored).flatten()
    assert torch.all(lab[idx] == ids[idx + 1])
    if not src.has_loss_mask:
        assert torch.equal(scored, inner)
    else:
        assert not torch.any(scored & ~inner)


@pytest.mark.parametrize("strategy", ["vsl", "pack", "concat_chunk"])
def test_batches_layout(src, strategy):
    c = cfg(strategy=strategy)
    loader = PackedLoader(src, c)
    seen = 0
    for b in loader:
        _check_batch(b, src, c)
        seen += 1
    assert seen == len(loader) > 0
    assert b.epoch == 0 and b.step == len(loader) - 1


def test_vsl_remainder_keeps_every_token(src):
    """remainder=True: pieces shorter than min_len are BFD-packed into min_len rows instead of dropped."""
    drop = PackedLoader(src, cfg(min_len=64))
    keep = PackedLoader(src, cfg(min_len=64, remainder=True))
    d = keep.decomposition
    assert drop.decomposition.tokens_dropped > 0 and d.tokens_dropped == 0
    rows = lambda ld: sum(b.num_rows for b in ld._static_buckets)                       # noqa: E731
    tokens = lambda ld: sum(int(b.packing.length.sum()) if b.packing is not None       # noqa: E731
                            else b.num_rows * b.seq_len for b in ld._static_buckets)
    assert tokens(drop) == d.tokens_total - drop.decomposition.tokens_dropped
    assert tokens(keep) == d.tokens_total                                             # every token has a row
    b0 = keep._static_buckets[0].packing
    assert rows(keep) > rows(drop) and int(b0.bin_fill.max()) <= 64
    # the remainder rows hold exactly the decomposition's remainder pieces
    n0 = drop._static_buckets[0].num_rows
    got = sorted(zip(b0.doc[n0:].tolist(), b0.start[n0:].tolist(), b0.length[n0:].tolist()))
    assert got == sorted(zip(d.rem_doc.tolist(), d.rem_start.tolist(), d.rem_len.tolist()))
    seen_multi = False
    for b in keep:
        _check_batch(b, src, keep.config)
        seen_multi |= b.seq_len == 64 and b.cu_seqlens.numel() > b.row_cu_seqlens.numel()
    assert seen_multi                                              # some min_len rows hold several pieces


def test_vsl_batches_hold_decomposition_pieces_in_order(src_nomask):
    c = cfg(curriculum="natural", num_cycles=1, tokens_per_batch=2048, max_len=512, min_len=16)
    loader = PackedLoader(src_nomask, c)
    d = loader.decomposition
    first = next(iter(loader))
    assert first.seq_len == int(d.bucket_lens[np.flatnonzero(d.counts >= 2048 // d.bucket_lens).max()])
    for b in loader:
        assert torch.all(torch.diff(b.cu_seqlens) == b.seq_len)       # one piece per row
        assert b.num_tokens == 2048                                    # vsl rows fill the batch
        _, _, doc, start, length, _ = loader.pieces(b.epoch, b.step - b.epoch * len(loader))
        expect = np.concatenate([src_nomask.tokens(d_)[s:s + n] for d_, s, n in zip(doc, start, length)])
        np.testing.assert_array_equal(b.input_ids.numpy(), expect)


def test_loss_mask_reaches_labels(src):
    c = cfg(strategy="pack")
    loader = PackedLoader(src, c)
    b = next(iter(loader))
    _, _, doc, start, length, _ = loader.pieces(0, 0)
    o = 0
    for d, s, n in zip(doc, start, length):
        m = src.loss_mask(int(d))[s:s + n]
        toks = src.tokens(int(d))[s:s + n]
        want = np.where(m[1:] == 1, toks[1:], IGN)
        np.testing.assert_array_equal(b.labels[o:o + n - 1].numpy(), want)
        o += n


@pytest.mark.skipif(backends.cpu_ext() is None, reason="lengen_fast._C not built")
@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.tuples(st.integers(0, 403), st.floats(0, 1), st.floats(0, 1)), max_size=12),
       extra=st.integers(0, 50))
def test_gather_native_matches_reference(src, pieces, extra):
    doc = np.array([p[0] for p in pieces], dtype=np.int64)
    L = src.lengths[doc]
    start = (np.array([p[1] for p in pieces]) * L).astype(np.int64) if pieces else np.zeros(0, np.int64)
    length = ((L - start) * np.array([p[2] for p in pieces])).astype(np.int64) if pieces else np.zeros(0, np.int64)
    total = int(length.sum()) + extra
    a = src.gather(doc, start, length, total, backend="cpu")
    r = src.gather(doc, start, length, total, backend="reference")
    for x, y in zip(a[:3], r[:3]):
        assert torch.equal(x, y)
    np.testing.assert_array_equal(a[3], r[3])


@pytest.mark.parametrize("strategy,curriculum", [("vsl", "grow_p2"), ("vsl", "uniform"), ("pack", "natural"),
                                                 ("concat_chunk", "natural")])
def test_exact_resume(src, strategy, curriculum):
    c = cfg(strategy=strategy, curriculum=curriculum, infinite=True, prefetch=2)
    steps = 2 * len(PackedLoader(src, c)) + 3  # crosses an epoch boundary
    ref_loader = PackedLoader(src, c)
    it = iter(ref_loader)
    ref = [next(it) for _ in range(steps)]
    for cut in (1, len(ref_loader) - 1, len(ref_loader) + 2):
        a = PackedLoader(src, c)
        it = iter(a)
        for _ in range(cut):
            next(it)
        state = a.state_dict()
        b = PackedLoader(src, c)
        b.load_state_dict(state)
        it = iter(b)
        for want in ref[cut:cut + 4]:
            got = next(it)
            assert (got.step, got.epoch, got.seq_len) == (want.step, want.epoch, want.seq_len)
            assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
            assert torch.equal(got.cu_seqlens, want.cu_seqlens)


def test_epochs_differ_and_prefetch_matches(src):
    c = cfg()
    a = [b.input_ids for b in PackedLoader(src, c)]
    p = [b.input_ids for b in PackedLoader(src, dataclasses.replace(c, prefetch=3))]
    assert all(torch.equal(x, y) for x, y in zip(a, p)) and len(a) == len(p)
    loader = PackedLoader(src, c)
    e0 = [b.input_ids for b in loader]
    e1 = [b for b in loader]  # the next for loop is the next epoch
    assert e1[0].epoch == 1 and e1[0].step == len(loader)
    assert not all(torch.equal(x, y.input_ids) for x, y in zip(e0, e1))


def _pieces_seen(loader):
    per_step = []
    for s in range(len(loader)):  # epoch 0
        b, seq_len, doc, start, length, _ = loader.pieces(0, s)
        per_step.append((seq_len, list(zip(doc.tolist(), start.tolist(), length.tolist()))))
    return per_step


@pytest.mark.parametrize("strategy", ["vsl", "vsl_remainder", "pack", "concat_chunk"])
def test_rank_consistency(src, strategy):
    for ws in (1, 2, 4):
        c = cfg(strategy=strategy.removesuffix("_remainder"), tokens_per_batch=8192, world_size=ws,
                remainder=strategy == "vsl_remainder")
        ranks = [_pieces_seen(PackedLoader(src, dataclasses.replace(c, rank=r))) for r in range(ws)]
        steps = len(ranks[0])
        assert all(len(r) == steps for r in ranks)
        covered = {}
        for s in range(steps):
            assert len({ranks[r][s][0] for r in range(ws)}) == 1  # same bucket / seq_len on every rank
            for r in range(ws):
                for d, st_, n in ranks[r][s][1]:
                    for t in range(st_, st_ + n, 64):  # sample tokens: no token is seen twice
                        assert (d, t) not in covered, f"token {t} of doc {d} seen twice (ws={ws})"
                        covered[(d, t)] = r
        if ws == 1:
            one = covered
        else:  # the ranks together see what one rank sees at world_size 1 with the same plan
            assert set(covered) == set(one)
        batch = next(iter(PackedLoader(src, dataclasses.replace(c, rank=ws - 1))))
        assert batch.input_ids.shape == (8192 // ws,)


LOADER_BAD = [
    (dict(tokens_per_batch=512, max_len=1024), ValueError, r"tokens_per_batch \(512\) must be >= max_len \(1024\)"),
    (dict(min_len=48), ValueError, "min_len must be a positive power of two, got 48"),
    (dict(max_len=1000), ValueError, "max_len must be a positive power of two, got 1000"),
    (dict(min_len=2048), ValueError, r"min_len \(2048\) must be <= max_len \(1024\)"),
    (dict(world_size=3), ValueError, r"world_size \(3\) does not divide tokens_per_batch \(4096\)"),
    (dict(world_size=8), ValueError, "world_size \\(8\\) does not divide the batch: tokens_per_batch=4096 holds 4 "
                                     "rows of seq_len 1024"),
    (dict(rank=2, world_size=2), ValueError, r"rank \(2\) must be < world_size \(2\)"),
    (dict(strategy="bucket"), ValueError, "strategy must be one of"),
    (dict(curriculum="grow"), ValueError, "curriculum must be one of"),
    (dict(num_cycles=0), ValueError, "num_cycles must be >= 1"),
    (dict(tokens_per_batch=4096.0), TypeError, "tokens_per_batch must be an int"),
    (dict(remainder=1), TypeError, "remainder must be a bool, got int"),
    (dict(strategy="pack", remainder=True), ValueError, "remainder=True applies to strategy 'vsl' only"),
    (dict(tokens_per_batch=1 << 24, max_len=1 << 20), ValueError, "cannot fill a single batch"),
]


@pytest.mark.parametrize("kw,exc,match", LOADER_BAD)
def test_loader_bad_config(src, kw, exc, match):
    with pytest.raises(exc, match=match):
        PackedLoader(src, cfg(**kw))


def test_resume_config_mismatch(src):
    a = PackedLoader(src, cfg())
    next(iter(a))
    state = a.state_dict()
    for change, field in ((dict(seed=8), "seed"), (dict(curriculum="natural"), "curriculum"),
                          (dict(world_size=2), "world_size"), (dict(tokens_per_batch=8192), "tokens_per_batch")):
        b = PackedLoader(src, cfg(**change))
        with pytest.raises(ValueError, match=f"state_dict config does not match this loader \\({field}: saved"):
            b.load_state_dict(state)
    PackedLoader(src, cfg(prefetch=3)).load_state_dict(state)  # runtime-only fields may change
    other = open_tokens(pa.table({"input_ids": pa.array([[1] * 3000] * 8, pa.list_(pa.int32()))}))
    with pytest.raises(ValueError, match="saved for a different source"):
        PackedLoader(other, cfg()).load_state_dict(state)
    with pytest.raises(ValueError, match="not a PackedLoader state"):
        a.load_state_dict({"foo": 1})


STATE_BAD = [
    ("not a dict", lambda s: [s], TypeError, "state_dict must be a dict"),
    ("missing step", lambda s: {k: v for k, v in s.items() if k != "step"}, ValueError, "missing 'epoch'/'step'"),
    ("missing config", lambda s: {k: v for k, v in s.items() if k != "config"}, ValueError, "missing 'config'"),
    ("version 2", lambda s: {**s, "version": 2}, ValueError, r"state_dict\['version'\] must be 1, got 2"),
    ("epoch float", lambda s: {**s, "epoch": 1.0}, TypeError, r"state_dict\['epoch'\] must be an int, got float"),
    ("step str", lambda s: {**s, "step": "3"}, TypeError, r"state_dict\['step'\] must be an int, got str"),
    ("step bool", lambda s: {**s, "step": True}, TypeError, r"state_dict\['step'\] must be an int, got bool"),
    ("negative epoch", lambda s: {**s, "epoch": -1}, ValueError, r"state_dict\['epoch'\] must be >= 0, got -1"),
    ("negative step", lambda s: {**s, "step": -2}, ValueError, r"state_dict\['step'\] must be >= 0, got -2"),
    ("step past epoch", lambda s: {**s, "step": 10**9}, ValueError, r"state_dict\['step'\] = 1000000000 out of range"),
    ("config list", lambda s: {**s, "config": [1]}, TypeError, r"state_dict\['config'\] must be a dict, got list"),
    ("source int", lambda s: {**s, "source": 5}, TypeError, r"state_dict\['source'\] must be a str"),
]


@pytest.mark.parametrize("name,mutate,exc,match", STATE_BAD, ids=[b[0] for b in STATE_BAD])
def test_load_state_dict_bad_state(src, name, mutate, exc, match):
    a = PackedLoader(src, cfg(prefetch=0))
    next(iter(a))
    state = a.state_dict()
    b = PackedLoader(src, cfg(prefetch=0))
    with pytest.raises(exc, match=match):
        b.load_state_dict(mutate(state))
    assert (b._epoch, b._step) == (0, 0)  # a refused state changes nothing
    b.load_state_dict({**state, "step": np.int64(state["step"])})  # numpy ints (from a checkpoint) are fine
    assert b._step == state["step"]


def test_bad_tokens_at_batch_time():
    t = pa.table({"input_ids": pa.array([[1] * 300, [2] * 299 + [-5]] * 8, pa.list_(pa.int32()))})
    loader = PackedLoader(open_tokens(t), cfg(strategy="pack", tokens_per_batch=1024, max_len=1024))
    with pytest.raises(ValueError, match=r"token -5 in document (1|3|5|7|9|11|13|15) is negative"):
        list(loader)


def test_recycled_buffers_never_overwrite_live_batches(src):
    loader = PackedLoader(src, cfg(strategy="pack", prefetch=0))
    it = iter(loader)
    first = next(it)
    view = first.labels[3:40]                 # only a view survives
    want = view.clone()
    kept = next(it)
    kept_ids = kept.input_ids.clone()
    del first
    later = [next(it).input_ids.data_ptr() for _ in range(4)]
    assert torch.equal(view, want)
    assert torch.equal(kept.input_ids, kept_ids)
    assert kept.input_ids.data_ptr() not in later
