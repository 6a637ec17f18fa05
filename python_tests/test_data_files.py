"""Untrusted token files: corrupted offsets, truncated and damaged IPC/Parquet, directories of shards.

A file is never trusted: every chunk's list offsets are checked before native code follows them,
and a damaged file gets a ValueError that names it. The fuzz runs in a subprocess, because the
failure it hunts for is a signal (a segfault kills the interpreter, not just the test).
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as the fuzz worker: make the checkout importable
    sys.path.insert(0, str(ROOT))

from lengen_fast.data import LoaderConfig, PackedLoader, open_tokens, synthetic_table, write_arrow  # noqa: E402

DOCS = [[1, 2, 3], [], [4], [5, 6, 7, 8, 9], [10, 11]]


def _write_ipc(path, docs=DOCS, dtype=pa.int32()):
    return write_arrow(pa.table({"input_ids": pa.array(docs, pa.list_(dtype))}), path)


def _patch_offsets(path: Path, old: list, new: list, dtype=np.int32) -> Path:
    """Overwrite a run of list offsets inside an IPC file's body (the bytes of ``old`` -> ``new``)."""
    buf = bytearray(path.read_bytes())
    needle = np.array(old, dtype).tobytes()
    i = buf.find(needle)
    assert i >= 0 and buf.find(needle, i + 1) < 0, "offset run not found exactly once"
    buf[i:i + len(needle)] = np.array(new, dtype).tobytes()
    out = path.with_name("bad-" + path.name)
    out.write_bytes(bytes(buf))
    return out


# -- corrupted offsets: table of cases (exception type, message fragment) ------------------------
def _bad_last(tmp):   # the segfault: the last offset far beyond the values buffer
    return _patch_offsets(_write_ipc(tmp / "a.arrow"), [9, 11], [9, 50_000_000])


def _bad_middle(tmp):  # offsets decrease inside the array (the span check alone misses this)
    return _patch_offsets(_write_ipc(tmp / "a.arrow"), [0, 3, 3, 4, 9], [0, 3, 3, 1, 9])


def _bad_first(tmp):   # a negative first offset
    return _patch_offsets(_write_ipc(tmp / "a.arrow"), [0, 3, 3, 4], [-8, 3, 3, 4])


def _bad_large(tmp):   # large_list (int64 offsets) running past the values
    t = pa.table({"input_ids": pa.array(DOCS, pa.large_list(pa.uint16()))})
    p = write_arrow(t, tmp / "a.arrow")
    return _patch_offsets(p, [4, 9, 11], [4, 9, 1 << 40], np.int64)


def _truncated_ipc(tmp):
    p = _write_ipc(tmp / "a.arrow")
    p.write_bytes(p.read_bytes()[:-40])
    return p


def _truncated_parquet(tmp):
    p = tmp / "a.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(DOCS, pa.list_(pa.int32()))}), p)
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
    return p


def _garbage_parquet(tmp):
    p = tmp / "a.parquet"
    p.write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    return p


def _empty_file(tmp):
    p = tmp / "a.arrow"
    p.write_bytes(b"")
    return p


def _empty_dir(tmp):
    (tmp / "d").mkdir()
    (tmp / "d" / "notes.txt").write_text("no shards here")
    return tmp / "d"


def _dir_in_list(tmp):
    (tmp / "d").mkdir()
    return [_write_ipc(tmp / "a.arrow"), tmp / "d"]


def _glob_nothing(tmp):
    return str(tmp / "nothing-*.arrow")


def _mixed_types(tmp):
    (tmp / "d").mkdir()
    _write_ipc(tmp / "d" / "0.arrow", dtype=pa.uint16())
    _write_ipc(tmp / "d" / "1.arrow", dtype=pa.int32())
    return tmp / "d"


def _shard_missing_column(tmp):
    (tmp / "d").mkdir()
    _write_ipc(tmp / "d" / "0.arrow")
    write_arrow(pa.table({"text": pa.array(["a"])}), tmp / "d" / "1.arrow")
    return tmp / "d"


FILE_CASES = [
    ("last offset past values", _bad_last, ValueError, "bad-a.arrow.*larger than values array"),
    ("offsets decrease", _bad_middle, ValueError, r"corrupted list offsets: they decrease at document 2 \(3 -> 1\)"),
    ("negative first offset", _bad_first, ValueError, "corrupted"),
    ("large_list past values", _bad_large, ValueError, "bad-a.arrow.*larger than values array"),
    ("truncated IPC", _truncated_ipc, ValueError, "cannot read Arrow IPC file .*a.arrow.*corrupted or truncated"),
    ("truncated Parquet", _truncated_parquet, ValueError, "a.parquet.*not a readable Parquet file"),
    ("garbage Parquet", _garbage_parquet, ValueError, "a.parquet"),
    ("empty file", _empty_file, ValueError, "a.arrow"),
    ("directory without shards", _empty_dir, ValueError, "has no manifest.json and no token shards"),
    ("directory inside a list", _dir_in_list, ValueError, "is a directory inside a list of shards; pass the directory"),
    ("glob matching nothing", _glob_nothing, FileNotFoundError, "no files match"),
    ("shards of two token types", _mixed_types, TypeError, "1.arrow' holds int32 tokens but .*0.arrow' holds uint16"),
    ("shard without the column", _shard_missing_column, ValueError, "column 'input_ids' not found in 1.arrow"),
    ("empty list", lambda tmp: [], ValueError, "empty list of shards"),
]


@pytest.mark.parametrize("name,make,exc,match", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_files(tmp_path, name, make, exc, match):
    with pytest.raises(exc, match=match):
        open_tokens(make(tmp_path))


def test_corrupted_offsets_named_file(tmp_path):
    for make in (_bad_last, _bad_middle, _bad_first, _bad_large):
        sub = tmp_path / make.__name__
        sub.mkdir()
        p = make(sub)
        with pytest.raises(ValueError, match=str(p.name)):
            open_tokens(p)


def test_bad_offsets_in_memory():
    """Arrays built in memory with bad offsets are refused too (no file involved)."""
    vals = pa.array(np.arange(10, dtype=np.int32))
    arr = pa.ListArray.from_buffers(pa.list_(pa.int32()), 3,
                                    [None, pa.py_buffer(np.array([0, 5, 3, 10], np.int32))], children=[vals])
    with pytest.raises(ValueError, match=r"column 'input_ids': corrupted list offsets: they decrease at document 1"):
        open_tokens(arr)
    # a last offset past the values cannot be built in memory (pyarrow checks the span), but the
    # check stands on its own: a sliced view of the values with the original offsets
    short = pa.ListArray.from_buffers(pa.list_(pa.int32()), 2, [None, pa.py_buffer(np.array([0, 5, 10], np.int32))],
                                      children=[vals])
    from lengen_fast.data.source import checked_offsets
    np.testing.assert_array_equal(checked_offsets(short, "x"), [0, 5, 10])
    with pytest.raises(ValueError, match=r"x: corrupted list offsets: the last offset 10 is past the end of the "
                                         r"values buffer \(9 values\)"):
        checked_offsets(_FakeList(short, 9), "x")


class _FakeList:
    """A list chunk whose values array reports fewer values than its offsets span."""

    def __init__(self, arr, n_values):
        self.offsets, self.values, self._n = arr.offsets, arr.values.slice(0, n_values), len(arr)

    def __len__(self):
        return self._n


def test_concat_chunk_on_corrupted_file_is_a_clear_error(tmp_path):
    """The issue's second symptom: concat_chunk used to end in an IndexError inside the error path."""
    p = _bad_last(tmp_path)
    with pytest.raises(ValueError, match="bad-a.arrow.*larger than values array"):
        PackedLoader(p, LoaderConfig(strategy="concat_chunk", tokens_per_batch=8, max_len=4, prefetch=0))


# -- directories, globs and lists of shards ------------------------------------------------------
def _shards(tmp, n=3, fmt="arrow"):
    d = tmp / f"shards-{fmt}"
    d.mkdir()
    tables = [synthetic_table(np.arange(1, 6 + i) * 3, vocab_size=500, seed=i, dtype=np.uint16) for i in range(n)]
    for i, t in enumerate(tables):
        if fmt == "arrow":
            write_arrow(t, d / f"part-{i:03d}.arrow", batch_rows=2)
        else:
            pq.write_table(t, d / f"part-{i:03d}.parquet", row_group_size=2)
    docs = [list(x) for t in tables for x in t.column("input_ids").to_pylist()]
    return d, docs


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_directory_glob_and_list_of_shards(tmp_path, fmt):
    d, docs = _shards(tmp_path, fmt=fmt)
    files = sorted(d.iterdir())
    for source in (d, str(d), str(d / f"part-*.{fmt}"), files, [str(f) for f in files]):
        src = open_tokens(source)
        assert len(src) == len(docs) and src.dtype == np.uint16
        assert [Path(p).name for p in src.paths] == [f.name for f in files]
        for i, doc in enumerate(docs):
            np.testing.assert_array_equal(src.tokens(i), doc)
    # one batch through the native gather spans every shard
    src = open_tokens(d, vocab_size=500)
    n = len(docs)
    ids, labels, pos, cu = src.gather(np.arange(n), np.zeros(n, np.int64), src.lengths, int(src.lengths.sum()))
    np.testing.assert_array_equal(ids.numpy(), np.concatenate(docs))


def test_gather_error_names_the_shard(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _write_ipc(d / "0.arrow")
    _write_ipc(d / "1.arrow", docs=[[1, 2], [3, 999]])
    src = open_tokens(d)
    src.vocab_size = 100
    with pytest.raises(ValueError, match=r"1.arrow.*token 999 in document 6 is >= vocab_size=100"):
        src.gather(np.array([6]), np.array([0]), np.array([2]), 2)


# -- fuzzing: random byte flips and truncations, in a subprocess ----------------------------------
def _fuzz_worker(directory: str, seed: int, trials: int) -> int:
    """Damage each file in ``directory`` ``trials`` times; open and read the whole result.

    Acceptable outcomes: a read that stays inside the buffers (checked by gathering every token
    through the native gather), or a ValueError/TypeError/FileNotFoundError naming the file.
    Anything else prints the case and returns 3; a signal kills the process (the test sees it).
    """
    rng = np.random.default_rng(seed)
    work = Path(directory) / "fuzz"
    work.mkdir(exist_ok=True)
    counts = {"read": 0, "refused": 0}
    for orig in sorted(Path(directory).glob("orig.*")):
        data = orig.read_bytes()
        for t in range(trials):
            buf = bytearray(data)
            if rng.random() < 0.3:
                buf = buf[:int(rng.integers(0, len(buf)))]
            else:
                for _ in range(int(rng.integers(1, 9))):
                    i = int(rng.integers(0, len(buf)))
                    buf[i] = int(rng.integers(0, 256))
            # A fresh file per case: rewriting a file in place while an earlier case still maps it
            # would SIGBUS on pages past the new end (why prepare writes shards by rename).
            path = work / f"case-{t}{orig.suffix}"
            path.write_bytes(bytes(buf))
            try:
                src = open_tokens(path, vocab_size=1000 if t % 2 else None)  # with and without the scan
                n = len(src)
                if n:
                    src.gather(np.arange(n), np.zeros(n, np.int64), src.lengths, int(src.num_tokens))
                    for i in range(n):
                        src.tokens(i).sum()
                counts["read"] += 1
            except (ValueError, TypeError, FileNotFoundError) as e:
                if path.name not in str(e):
                    import traceback
                    traceback.print_exc()
                    print(f"UNCLEAR {orig.name} trial {t}: {type(e).__name__}: {e}", flush=True)
                    return 3
                counts["refused"] += 1
            except Exception as e:  # noqa: BLE001 - the point is to catch what escapes
                import traceback
                traceback.print_exc()
                print(f"UNEXPECTED {orig.name} trial {t}: {type(e).__name__}: {e}", flush=True)
                return 3
    print(counts, flush=True)
    return 0


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_corrupted_files_in_subprocess(tmp_path, seed):
    lengths = np.random.default_rng(seed).integers(0, 40, 60)
    t16 = synthetic_table(lengths, vocab_size=1000, seed=seed, dtype=np.uint16)
    t32 = synthetic_table(lengths, vocab_size=1000, seed=seed, dtype=np.int32, large=True)
    write_arrow(t16, tmp_path / "orig.arrow", batch_rows=16)
    with pa.OSFile(str(tmp_path / "orig.stream"), "wb") as f, pa.ipc.new_stream(f, t32.schema) as w:
        w.write_table(t32)
    pq.write_table(t16, tmp_path / "orig.parquet", row_group_size=20)
    pq.write_table(t32, tmp_path / "orig.pq", row_group_size=20, compression="none")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, str(tmp_path), str(seed), "100"], env=env,
                       capture_output=True, text=True, timeout=600)
    sig = -r.returncode if r.returncode < 0 else None
    assert sig is None, f"fuzz worker killed by {signal.Signals(sig).name}; stderr tail:\n{r.stderr[-2000:]}"
    assert r.returncode == 0, f"fuzz worker failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "'read':" in r.stdout and "'refused':" in r.stdout


if __name__ == "__main__":
    sys.exit(_fuzz_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
