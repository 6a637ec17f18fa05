"""Dataset decomposition into power-of-two buckets (Pouransari et al. 2024, "Dataset Decomposition").

A document of length L becomes L // max_len pieces of max_len, then one piece of 2^k for every
set bit k of L % max_len with 2^k >= min_len, largest first, laid out back to back from the
start of the document. Bits below min_len are dropped (counted) or, with ``remainder=True``,
kept as one shorter piece in a remainder bucket. Buckets hold (doc, start) index pairs only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .. import backends


def _pow2(name: str, v) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 or (int(v) & (int(v) - 1)):
        raise ValueError(f"{name} must be a positive power of two, got {v!r}")
    return int(v)


def check_lengths(lengths, name: str = "lengths", *, nonneg: bool = True) -> np.ndarray:
    """(N,) int64 view/copy of ``lengths``; ValueError on wrong rank, non-integers or (``nonneg``) negatives."""
    if hasattr(lengths, "lengths") and not isinstance(lengths, np.ndarray):
        lengths = lengths.lengths  # a TokenSource
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if nonneg and arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative (document {int(np.argmin(arr))} has {int(arr.min())})")
    return arr


def check_bucket_range(min_len, max_len) -> tuple[int, int]:
    min_len, max_len = _pow2("min_len", min_len), _pow2("max_len", max_len)
    if min_len > max_len:
        raise ValueError(f"min_len ({min_len}) must be <= max_len ({max_len})")
    return min_len, max_len


@dataclass
class Decomposition:
    """Per-bucket index arrays. Bucket i holds pieces of length ``bucket_lens[i]`` = min_len * 2^i."""

    min_len: int
    max_len: int
    docs: list          # per bucket: (n_i,) document index, ascending (int32 from C++ when it fits, else int64)
    starts: list        # per bucket: (n_i,) first token of the piece in its document (same dtype)
    rem_doc: np.ndarray | None     # remainder bucket (remainder=True): pieces shorter than min_len
    rem_start: np.ndarray | None
    rem_len: np.ndarray | None
    num_docs: int
    tokens_total: int
    tokens_dropped: int
    pieces_dropped: int
    num_empty: int

    @property
    def bucket_lens(self) -> np.ndarray:
        return self.min_len << np.arange(len(self.docs), dtype=np.int64)

    @property
    def num_buckets(self) -> int:
        return len(self.docs)

    @property
    def counts(self) -> np.ndarray:
        return np.array([d.shape[0] for d in self.docs], dtype=np.int64)

    @property
    def tokens_per_bucket(self) -> np.ndarray:
        return self.counts * self.bucket_lens

    @property
    def tokens_kept(self) -> int:
        return self.tokens_total - self.tokens_dropped

    def bucket(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc, start, length) arrays of bucket i; i == num_buckets is the remainder bucket."""
        if i == self.num_buckets and self.rem_doc is not None:
            return self.rem_doc, self.rem_start, self.rem_len
        if not 0 <= i < self.num_buckets:
            raise IndexError(f"bucket {i} out of range (num_buckets={self.num_buckets})")
        d = self.docs[i]
        return d, self.starts[i], np.full(d.shape[0], int(self.bucket_lens[i]), dtype=np.int64)

    def to_arrow(self, bucket: int | None = None) -> pa.Table:
        """Columns doc, start, length (int64): one bucket, or all buckets in order (remainder last)."""
        ids = [bucket] if bucket is not None else list(range(self.num_buckets + (self.rem_doc is not None)))
        parts = [self.bucket(i) for i in ids]
        cols = [np.concatenate([p[j] for p in parts]).astype(np.int64, copy=False) if parts
                else np.zeros(0, np.int64) for j in range(3)]
        return pa.table({"doc": cols[0], "start": cols[1], "length": cols[2]})

    def summary(self) -> dict:
        return {"min_len": self.min_len, "max_len": self.max_len,
                "buckets": {int(s): int(c) for s, c in zip(self.bucket_lens, self.counts)},
                "remainder_pieces": None if self.rem_doc is None else int(self.rem_doc.shape[0]),
                "tokens_total": self.tokens_total, "tokens_dropped": self.tokens_dropped,
                "pieces_dropped": self.pieces_dropped, "empty_docs": self.num_empty}


def _finish(lengths, min_len, max_len, docs, starts, rem, dropped_tokens, dropped_pieces,
            total=None, empty=None) -> Decomposition:
    total = int(lengths.sum()) if total is None else int(total)
    empty = int((lengths == 0).sum()) if empty is None else int(empty)
    return Decomposition(min_len, max_len, list(docs), list(starts), rem[0], rem[1], rem[2],
                         int(lengths.shape[0]), total, int(dropped_tokens), int(dropped_pieces), empty)


def _decompose_cpu(lengths, min_len, max_len, remainder):
    try:
        d, s, rd, rs, rl, dt, dp, total, empty = backends.cpu_ext().data_decompose(lengths, min_len, max_len,
                                                                                   remainder)
    except ValueError:
        check_lengths(lengths)  # the C++ pass found a negative length: name the document
        raise
    rem = (rd, rs, rl) if remainder else (None, None, None)
    return _finish(lengths, min_len, max_len, d, s, rem, dt, dp, total, empty)


def decompose_numpy(lengths, min_len=256, max_len=8192, *, remainder=False) -> Decomposition:
    """Vectorized numpy implementation (one pass per bit); the fallback without the C++ extension."""
    lengths = check_lengths(lengths)
    min_len, max_len = check_bucket_range(min_len, max_len)
    lmin, lmax = min_len.bit_length() - 1, max_len.bit_length() - 1
    q = lengths >> lmax
    r = lengths & (max_len - 1)
    base = q << lmax
    docs, starts = [], []
    for k in range(lmin, lmax):
        sel = np.flatnonzero((r >> k) & 1)
        docs.append(sel)
        starts.append(base[sel] + ((r[sel] >> (k + 1)) << (k + 1)))
    top = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), q)
    # offset of each max_len piece inside its document: 0, max_len, 2 max_len, ...
    first = np.repeat(np.cumsum(q) - q, q)
    docs.append(top)
    starts.append((np.arange(top.shape[0], dtype=np.int64) - first) << lmax)
    low = r & (min_len - 1)
    if remainder:
        sel = np.flatnonzero(low)
        rem = (sel, base[sel] + r[sel] - low[sel], low[sel])
        dt, dp = 0, 0
    else:
        rem = (None, None, None)
        dt, dp = int(low.sum()), int(np.count_nonzero(low))
    return _finish(lengths, min_len, max_len, docs, starts, rem, dt, dp)


def decompose_ref(lengths, min_len=256, max_len=8192, *, remainder=False) -> Decomposition:
    """Per-document Python loop of the DD algorithm: the spec the fast versions are tested against."""
    lengths = check_lengths(lengths)
    min_len, max_len = check_bucket_range(min_len, max_len)
    nb = (max_len // min_len).bit_length()
    docs = [[] for _ in range(nb)]
    starts = [[] for _ in range(nb)]
    rem = ([], [], [])
    dt = dp = 0
    for i, length in enumerate(lengths.tolist()):
        pos = 0
        while length - pos >= max_len:
            docs[nb - 1].append(i)
            starts[nb - 1].append(pos)
            pos += max_len
        size = max_len // 2
        while size >= min_len:
            if length - pos >= size:
                b = size.bit_length() - min_len.bit_length()
                docs[b].append(i)
                starts[b].append(pos)
                pos += size
            size //= 2
        if length > pos:
            if remainder:
                rem[0].append(i)
                rem[1].append(pos)
                rem[2].append(length - pos)
            else:
                dt += length - pos
                dp += 1
    as64 = (lambda x: np.asarray(x, dtype=np.int64))
    r = tuple(as64(x) for x in rem) if remainder else (None, None, None)
    return _finish(lengths, min_len, max_len, [as64(d) for d in docs], [as64(s) for s in starts], r, dt, dp)


_IMPLS = {"cpu": _decompose_cpu, "reference": lambda l, a, b, r: decompose_numpy(l, a, b, remainder=r)}


def decompose(lengths, min_len: int = 256, max_len: int = 8192, *, remainder: bool = False,
              backend: str | None = None) -> Decomposition:
    """Split every document into power-of-two pieces (see module doc).

    lengths: (N,) ints or a TokenSource. Returns a :class:`Decomposition`; dropped tokens
    (pieces shorter than min_len) are counted in ``tokens_dropped``.
    """
    impl = backends.select("data", torch.device("cpu"), backend, supported=_IMPLS.keys())
    # The C++ counting pass rejects negatives itself, which saves a full min() pass over the lengths.
    lengths = check_lengths(lengths, nonneg=impl != "cpu")
    min_len, max_len = check_bucket_range(min_len, max_len)
    return _IMPLS[impl](lengths, min_len, max_len, bool(remainder))
