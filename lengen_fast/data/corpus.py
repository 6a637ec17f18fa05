"""Data that is always available offline: the Python standard library's sources, and synthetic lengths.

The embedded corpus tokenizes every stdlib ``.py`` file (site-packages and test folders
excluded) at the byte level: uint16 tokens, vocabulary 256, one document per file, sorted by
path so the table is deterministic for a given Python build. Its lengths are real and
long-tailed (a few hundred bytes to a few hundred kilobytes).
"""
from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa

BYTE_VOCAB = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files(limit: int | None = None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not (_SKIP_DIRS & set(f.relative_to(root).parts[:-1])))
    return files[:limit] if limit is not None else files


@functools.lru_cache(maxsize=4)
def embedded_corpus(limit: int | None = None) -> pa.Table:
    """Table with ``input_ids`` (list<uint16>, byte tokens) and ``path`` (relative to the stdlib)."""
    files = stdlib_files(limit)
    root = Path(sysconfig.get_paths()["stdlib"])
    blobs = [f.read_bytes() for f in files]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    values = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.uint16)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    paths = pa.array([str(f.relative_to(root)) for f in files])
    return pa.table({"input_ids": ids, "path": paths})


def synthetic_lengths(n: int, dist: str = "lognormal", *, seed: int = 0, mean: float = 1000.0,
                      sigma: float = 1.2, max_len: int | None = None) -> np.ndarray:
    """(n,) int64 document lengths >= 1.

    dist: "lognormal" (median ~ mean * exp(-sigma^2 / 2), long right tail), "uniform" (1..2*mean),
    "pareto" (tail index 1.5), or "constant". ``max_len`` clips the tail.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng(seed)
    if dist == "lognormal":
        mu = np.log(mean) - sigma ** 2 / 2
        x = rng.lognormal(mu, sigma, n)
    elif dist == "uniform":
        x = rng.integers(1, int(2 * mean) + 1, n)
    elif dist == "pareto":
        x = (rng.pareto(1.5, n) + 1) * mean / 3
    elif dist == "constant":
        x = np.full(n, mean)
    else:
        raise ValueError(f"dist must be lognormal, uniform, pareto or constant, got {dist!r}")
    out = np.maximum(np.asarray(x, dtype=np.float64).round(), 1).astype(np.int64)
    return np.minimum(out, max_len) if max_len is not None else out


def synthetic_table(lengths, *, vocab_size: int = 32000, seed: int = 0, dtype=np.int32,
                    large: bool = False, loss_mask: bool = False) -> pa.Table:
    """Table with random tokens of the given lengths (and a random ``loss_mask`` column)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64 if large else np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(0, vocab_size, int(offsets[-1]), dtype=np.int64).astype(dtype)
    cls = pa.LargeListArray if large else pa.ListArray
    cols = {"input_ids": cls.from_arrays(pa.array(offsets), pa.array(values))}
    if loss_mask:
        m = rng.random(int(offsets[-1])) < 0.5
        cols["loss_mask"] = cls.from_arrays(pa.array(offsets), pa.array(m))
    return pa.table(cols)


def synthetic_source(n: int, dist: str = "lognormal", *, seed: int = 0, mean: float = 1000.0,
                     vocab_size: int = 32000, **kw):
    """A TokenSource over :func:`synthetic_table` with :func:`synthetic_lengths` lengths."""
    from .source import open_tokens
    lengths = synthetic_lengths(n, dist, seed=seed, mean=mean, **kw)
    return open_tokens(synthetic_table(lengths, vocab_size=vocab_size, seed=seed + 1), vocab_size=vocab_size)


def write_arrow(table: pa.Table, path, *, batch_rows: int = 65536) -> Path:
    """Write an Arrow IPC file (readable memory-mapped by open_tokens)."""
    path = Path(path)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        for b in table.to_batches(max_chunksize=batch_rows):
            w.write_batch(b)
    return path
