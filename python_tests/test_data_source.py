"""Token sources: every input kind, zero-copy views, loss masks, bad input, RSS of a memory map."""
import gc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lengen_fast.bench.common import proc_status_mib
from lengen_fast.data import embedded_corpus, open_tokens, synthetic_table, write_arrow

DOCS = [[1, 2, 3], [], [4], [5, 6, 7, 8, 9], [10, 11]]


def _list_array(docs, dtype=pa.int32(), large=False):
    return pa.array(docs, type=(pa.large_list if large else pa.list_)(dtype))


def _check(src, docs):
    assert len(src) == len(docs)
    assert src.lengths.dtype == np.int64
    np.testing.assert_array_equal(src.lengths, [len(d) for d in docs])
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(src.tokens(i), d)
    assert src.num_tokens == sum(map(len, docs))
    assert src.num_empty == sum(len(d) == 0 for d in docs)


@pytest.mark.parametrize("dtype", [pa.int32(), pa.int64(), pa.uint16(), pa.uint32()])
@pytest.mark.parametrize("large", [False, True])
def test_array_types(dtype, large):
    arr = _list_array(DOCS, dtype, large)
    _check(open_tokens(arr), DOCS)
    _check(open_tokens(pa.chunked_array([arr.slice(0, 2), arr.slice(2)])), DOCS)
    _check(open_tokens(pa.table({"input_ids": arr})), DOCS)


def test_empty_sources():
    src = open_tokens(pa.chunked_array([], type=pa.list_(pa.uint16())))
    assert len(src) == 0 and src.dtype == np.uint16 and src.num_tokens == 0
    _check(open_tokens(_list_array([[], []], pa.int64())), [[], []])


def test_sliced_and_chunked():
    arr = _list_array(DOCS * 3)
    sliced = arr.slice(4, 7)  # .values ignores the slice offset: must be handled
    _check(open_tokens(sliced), (DOCS * 3)[4:11])
    chunked = pa.chunked_array([arr.slice(1, 3), arr.slice(9, 4)])
    _check(open_tokens(chunked), (DOCS * 3)[1:4] + (DOCS * 3)[9:13])
    # a list array whose child values array is itself sliced
    values = pa.array(np.arange(100, dtype=np.int32)).slice(10)
    child = pa.ListArray.from_arrays(pa.array([0, 3, 5], pa.int32()), values)
    _check(open_tokens(child), [[10, 11, 12], [13, 14]])


def test_tokens_are_views_of_arrow_buffers():
    arr = _list_array(DOCS, pa.int64())
    src = open_tokens(arr)
    buf = arr.values.to_numpy(zero_copy_only=True)
    assert np.shares_memory(src.tokens(3), buf)


def test_select_views_a_subset_without_copying():
    arr = pa.chunked_array([_list_array(DOCS), _list_array(DOCS[::-1])])
    src = open_tokens(arr)
    docs = DOCS + DOCS[::-1]
    idx = [len(docs) - 1, 0, 3, 3]
    sub = src.select(idx)
    _check(sub, [docs[i] for i in idx])
    assert sub.num_tokens == sum(len(docs[i]) for i in idx) and len(src) == len(docs)   # the parent is unchanged
    assert np.shares_memory(sub.tokens(1), src.tokens(0))
    assert sub.fingerprint() != src.fingerprint()
    assert len(src.select([])) == 0
    with pytest.raises(IndexError, match=r"select: document indices must be in \[-"):
        src.select([len(docs)])


def test_parquet_and_ipc(tmp_path):
    table = pa.table({"input_ids": _list_array(DOCS), "other": pa.array(range(len(DOCS)))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    _check(open_tokens(tmp_path / "d.parquet"), DOCS)
    _check(open_tokens(str(write_arrow(table, tmp_path / "d.arrow", batch_rows=2))), DOCS)
    with pa.OSFile(str(tmp_path / "d.stream"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    _check(open_tokens(tmp_path / "d.stream"), DOCS)


class _FakeHFTable:  # datasets.table.Table keeps the pyarrow table in .table
    def __init__(self, table):
        self.table = table


class _FakeDataset:  # the parts of datasets.Dataset that open_tokens reads
    def __init__(self, table, indices=None):
        self._data = _FakeHFTable(table)
        self._indices = None if indices is None else _FakeHFTable(pa.table({"indices": pa.array(indices, pa.uint64())}))

    @property
    def data(self):
        return self._data


def test_hf_dataset_duck_typed():
    table = pa.table({"input_ids": _list_array(DOCS)})
    _check(open_tokens(_FakeDataset(table)), DOCS)
    _check(open_tokens(_FakeDataset(table, [4, 0, 3])), [DOCS[4], DOCS[0], DOCS[3]])


def test_hf_dataset_real():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": DOCS}).select([3, 0])
    _check(open_tokens(ds), [DOCS[3], DOCS[0]])


# -- the real `datasets` package (issue 16): multi-shard on disk, parquet data_files, row mappings ----
def _hf_docs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, int(rng.integers(0, 50))).tolist() for _ in range(n)]


def _check_against(src, ds):
    """open_tokens(ds) holds exactly the documents the Dataset returns, in its (mapped) order."""
    rows = ds["input_ids"]
    assert len(src) == len(rows)
    for i, doc in enumerate(rows):
        np.testing.assert_array_equal(src.tokens(i), doc, err_msg=f"row {i}")


def test_hf_multi_shard_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = _hf_docs()
    ds = datasets.Dataset.from_dict({"input_ids": docs, "k": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=4)
    assert len(list((tmp_path / "ds").glob("*.arrow"))) == 4
    back = datasets.load_from_disk(str(tmp_path / "ds"))
    src = open_tokens(back)
    _check_against(src, back)
    assert src.num_tokens == sum(map(len, docs))
    assert np.shares_memory(src.tokens(len(docs) - 1), src._values[src._chunk[len(docs) - 1]])
    # the same shards opened as plain files: a directory of Arrow IPC streams
    _check(open_tokens(sorted((tmp_path / "ds").glob("*.arrow"))), docs)


def test_hf_load_dataset_parquet_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    docs = _hf_docs(150, seed=1)
    files = []
    for i, part in enumerate((docs[:40], docs[40:41], docs[41:])):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(pa.table({"input_ids": pa.array(part, pa.list_(pa.int32()))}), files[-1], row_group_size=16)
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    _check_against(open_tokens(ds), ds)
    assert [len(d) for d in ds["input_ids"]] == [len(d) for d in docs]
    # the same files without datasets: a directory or glob of Parquet shards
    _check(open_tokens(str(tmp_path / "part-*.parquet")), docs)


def test_hf_shuffle_select_filter(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = _hf_docs(200, seed=2)
    ds = datasets.Dataset.from_dict({"input_ids": docs, "k": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    shuffled = ds.shuffle(seed=7)
    picked = shuffled.select(range(10, 150))
    kept = picked.filter(lambda r: len(r["input_ids"]) % 3 != 0)
    for view in (shuffled, picked, kept, kept.flatten_indices()):
        _check_against(open_tokens(view), view)
    assert 0 < len(kept) < len(picked)


def test_hf_iterable_dataset_refused():
    datasets = pytest.importorskip("datasets")
    it = datasets.Dataset.from_dict({"input_ids": DOCS}).to_iterable_dataset()
    with pytest.raises(TypeError, match="IterableDataset: decomposition and packing need every document's length up "
                                        "front.*Materialise it first"):
        open_tokens(it)


def test_loss_mask_column():
    mask = [[True, False, True], [], [False], [True] * 5, [False, True]]
    t = pa.table({"input_ids": _list_array(DOCS), "m": pa.array(mask)})
    src = open_tokens(t, loss_mask_column="m")
    assert src.has_loss_mask
    for i, m in enumerate(mask):
        np.testing.assert_array_equal(src.loss_mask(i), np.array(m, dtype=np.uint8))
    # differently chunked mask column
    t2 = pa.table({"input_ids": pa.chunked_array([_list_array(DOCS[:2]), _list_array(DOCS[2:])]),
                   "m": pa.chunked_array([pa.array(mask[:3]), pa.array(mask[3:])])})
    src2 = open_tokens(t2, loss_mask_column="m")
    for i, m in enumerate(mask):
        np.testing.assert_array_equal(src2.loss_mask(i), np.array(m, dtype=np.uint8))


def test_embedded_corpus():
    t = embedded_corpus()
    src = open_tokens(t, vocab_size=256)
    assert len(src) > 500 and src.num_tokens > 1_000_000
    assert src.dtype == np.uint16
    assert bytes(src.tokens(0).astype(np.uint8)).decode("utf-8", errors="replace").strip()
    assert src.lengths.max() > 50 * np.median(src.lengths)  # long-tailed
    assert embedded_corpus().equals(t)


# -- bad input -------------------------------------------------------------------------------
BAD = [
    ("null document", lambda: pa.table({"input_ids": pa.array([[1], None, [2]], pa.list_(pa.int32()))}),
     {}, ValueError, r"column 'input_ids' has 1 null documents \(first at row 1\)"),
    ("null column", lambda: pa.table({"input_ids": pa.nulls(3)}), {}, ValueError, "entirely null"),
    ("null token", lambda: pa.table({"input_ids": pa.array([[1, None]], pa.list_(pa.int32()))}), {},
     ValueError, "null tokens"),
    ("not a list", lambda: pa.table({"input_ids": pa.array([1, 2])}), {}, TypeError,
     "column 'input_ids' must be a list or large_list of int32/int64/uint16/uint32, got int64"),
    ("float tokens", lambda: pa.table({"input_ids": pa.array([[1.0]])}), {}, TypeError, "got list<item: double>"),
    ("missing column", lambda: pa.table({"text": pa.array(["a"])}), {}, ValueError,
     r"column: column 'input_ids' not found; available: \['text'\]"),
    ("negative token", lambda: pa.table({"input_ids": pa.array([[1], [2, -3]], pa.list_(pa.int32()))}),
     {"vocab_size": 10}, ValueError, "token -3 in document 1 is negative"),
    ("token >= vocab", lambda: pa.table({"input_ids": pa.array([[1], [], [2, 10]], pa.list_(pa.int64()))}),
     {"vocab_size": 10}, ValueError, "token 10 in document 2 is >= vocab_size=10"),
    ("bad vocab_size", lambda: pa.table({"input_ids": pa.array([[1]], pa.list_(pa.int32()))}),
     {"vocab_size": 0}, ValueError, "vocab_size must be a positive int"),
    ("missing mask column", lambda: pa.table({"input_ids": pa.array([[1]], pa.list_(pa.int32()))}),
     {"loss_mask_column": "m"}, ValueError, "loss_mask_column: column 'm' not found"),
    ("mask lengths differ", lambda: pa.table({"input_ids": pa.array([[1, 2]], pa.list_(pa.int32())),
                                              "m": pa.array([[True]])}),
     {"loss_mask_column": "m"}, ValueError, "document 0 has 1 mask entries but 2 tokens"),
    ("mask of strings", lambda: pa.table({"input_ids": pa.array([[1]], pa.list_(pa.int32())),
                                          "m": pa.array([["a"]])}),
     {"loss_mask_column": "m"}, TypeError, "column 'm' must be a list or large_list of bool/uint8/int8"),
    ("unsupported object", lambda: [[1, 2]], {}, TypeError, "source must be a pyarrow"),
]


@pytest.mark.parametrize("name,make,kw,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, make, kw, exc, match):
    with pytest.raises(exc, match=match):
        open_tokens(make(), **kw)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_tokens(tmp_path / "missing.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match="cannot read Arrow IPC file .*junk.arrow"):
        open_tokens(tmp_path / "junk.arrow")


def test_gather_rejects_bad_tokens_lazily():
    # without vocab_size nothing is scanned at open time; gather still refuses negative tokens
    src = open_tokens(pa.array([[1, 2], [3, -4]], pa.list_(pa.int32())))
    with pytest.raises(ValueError, match="token -4 in document 1 is negative"):
        src.gather(np.array([0, 1]), np.array([0, 0]), np.array([2, 2]), 8)


# -- zero-copy: RSS of a memory-mapped file --------------------------------------------------
def _anon_mb():
    mib = proc_status_mib("RssAnon")
    if mib != mib:
        pytest.skip("no /proc/self/status RssAnon")
    return mib


def test_memory_mapped_open_does_not_load_tokens(tmp_path):
    lengths = np.full(400, 65536, dtype=np.int64)  # 26M int32 tokens = 100 MiB
    path = write_arrow(synthetic_table(lengths, vocab_size=1000, seed=0), tmp_path / "big.arrow")
    size_mb = path.stat().st_size / 2**20
    warm = open_tokens(path)  # first use: thread pools, allocator arenas
    warm.gather(np.arange(4), np.zeros(4, np.int64), np.full(4, 16), 64)
    del warm
    gc.collect()
    before = _anon_mb()
    src = open_tokens(path)
    doc = np.arange(0, 400, 50)
    ids, labels, pos, cu = src.gather(doc, np.zeros(8, np.int64), np.full(8, 1024), 8192)
    after = _anon_mb()
    assert size_mb > 90
    assert after - before < 0.05 * size_mb, f"opening + one batch grew anonymous RSS by {after - before:.1f} MiB"
    assert np.shares_memory(src.tokens(3), src._values[src._chunk[3]])
    np.testing.assert_array_equal(ids[:1024].numpy(), src.tokens(0)[:1024])
