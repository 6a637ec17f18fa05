"""Packing documents into fixed-capacity rows: best-fit-decreasing, first-fit and concat-chunk.

Every packer returns a :class:`Packing`: pieces (bin, doc, start, length) sorted by bin, so a
row of the batch is ``doc[bin == b]`` laid out back to back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .. import backends
from .decompose import check_lengths


@dataclass
class Packing:
    """Pieces sorted by bin: bin, doc, start, length are (P,) int64 arrays."""

    bin: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    num_bins: int
    capacity: int
    tokens_total: int       # tokens in the input documents
    tokens_truncated: int   # tokens cut off (split_long=False)

    @property
    def tokens_packed(self) -> int:
        return int(self.length.sum())

    @property
    def bin_offsets(self) -> np.ndarray:
        """(num_bins + 1,) index of each bin's first piece."""
        return np.searchsorted(self.bin, np.arange(self.num_bins + 1, dtype=np.int64))

    @property
    def bin_fill(self) -> np.ndarray:
        """(num_bins,) tokens in each bin."""
        return np.bincount(self.bin, weights=self.length, minlength=self.num_bins).astype(np.int64)

    @property
    def efficiency(self) -> dict:
        """padding_pct: share of the bins' slots left empty; truncated_pct: share of input tokens lost."""
        slots = self.num_bins * self.capacity
        return {"bins": self.num_bins,
                "padding_pct": 100.0 * (slots - self.tokens_packed) / slots if slots else 0.0,
                "truncated_pct": 100.0 * self.tokens_truncated / self.tokens_total if self.tokens_total else 0.0}

    def to_arrow(self) -> pa.Table:
        return pa.table({"bin": self.bin, "doc": self.doc, "start": self.start, "length": self.length})


def _check_capacity(name: str, capacity) -> int:
    if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"{name} must be a positive int, got {capacity!r}")
    if capacity >= 1 << 30:
        raise ValueError(f"{name} must be < 2^30, got {capacity}")
    return int(capacity)


def _from_records(recs, num_bins, capacity, lengths, truncated) -> Packing:
    a = np.asarray(recs, dtype=np.int64).reshape(-1, 4)
    order = np.argsort(a[:, 0], kind="stable")
    a = a[order]
    return Packing(a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy(), a[:, 3].copy(), num_bins, capacity,
                   int(lengths.sum()), truncated)


def _long_docs(lengths, capacity, split_long):
    """Full bins for the split parts of long documents, and the items left for the packer."""
    recs, items, truncated, nb = [], [], 0, 0
    for i, length in enumerate(lengths.tolist()):
        if length > capacity and split_long:
            for j in range(length // capacity):
                recs.append((nb, i, j * capacity, capacity))
                nb += 1
            if length % capacity:
                items.append((length % capacity, i, length - length % capacity))
        elif length > capacity:
            items.append((capacity, i, 0))
            truncated += length - capacity
        elif length > 0:
            items.append((length, i, 0))
    return recs, items, truncated, nb


def pack_bfd_ref(lengths, capacity: int, *, split_long: bool = True) -> Packing:
    """Best-fit decreasing by linear scan over the open bins, O(N * bins): the spec for tests."""
    lengths = check_lengths(lengths)
    capacity = _check_capacity("capacity", capacity)
    recs, items, truncated, nb = _long_docs(lengths, capacity, split_long)
    items.sort(key=lambda t: (-t[0], t[1]))
    free: list[int] = []  # remaining space of each BFD bin
    for length, doc, start in items:
        best, best_free = -1, capacity + 1
        for b, f in enumerate(free):
            if length <= f < best_free:
                best, best_free = b, f
        if best < 0:
            free.append(capacity)
            best = len(free) - 1
        free[best] -= length
        recs.append((nb + best, doc, start, length))
    return _from_records(recs, nb + len(free), capacity, lengths, truncated)


def pack_first_fit_ref(lengths, capacity: int, *, split_long: bool = True, decreasing: bool = False) -> Packing:
    """First-fit (in document order, or decreasing), linear scan: the efficiency baseline."""
    lengths = check_lengths(lengths)
    capacity = _check_capacity("capacity", capacity)
    recs, items, truncated, nb = _long_docs(lengths, capacity, split_long)
    if decreasing:
        items.sort(key=lambda t: (-t[0], t[1]))
    free: list[int] = []
    for length, doc, start in items:
        for b, f in enumerate(free):
            if f >= length:
                break
        else:
            free.append(capacity)
            b = len(free) - 1
        free[b] -= length
        recs.append((nb + b, doc, start, length))
    return _from_records(recs, nb + len(free), capacity, lengths, truncated)


def _bfd_cpu(lengths, capacity, split_long) -> Packing:
    b, d, s, ln, nb, trunc = backends.cpu_ext().data_pack_bfd(lengths, capacity, split_long)
    return Packing(b, d, s, ln, int(nb), capacity, int(lengths.sum()), int(trunc))


_BFD = {"cpu": _bfd_cpu, "reference": lambda l, c, s: pack_bfd_ref(l, c, split_long=s)}


def pack_bfd(lengths, capacity: int, *, split_long: bool = True, backend: str | None = None) -> Packing:
    """Best-fit-decreasing packing into bins of ``capacity`` tokens, O(N log capacity) natively.

    Documents longer than capacity are split into full bins plus a remainder (split_long=True,
    nothing lost) or truncated to their first ``capacity`` tokens (counted in tokens_truncated).
    Empty documents are skipped.
    """
    lengths = check_lengths(lengths)
    capacity = _check_capacity("capacity", capacity)
    impl = backends.select("data", torch.device("cpu"), backend, supported=_BFD.keys())
    return _BFD[impl](lengths, capacity, bool(split_long))


def concat_chunk(lengths, seq_len: int, *, order: np.ndarray | None = None, drop_last: bool = False) -> Packing:
    """The fixed-length baseline: concatenate documents (in ``order``) and cut every seq_len tokens.

    Row b covers tokens [b * seq_len, (b + 1) * seq_len) of the concatenation; a document that
    crosses a row boundary becomes two pieces. The last row is partial unless drop_last.
    """
    lengths = check_lengths(lengths)
    seq_len = _check_capacity("seq_len", seq_len)
    docs = np.arange(lengths.shape[0], dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    ls = lengths[docs]
    keep = ls > 0
    docs, ls = docs[keep], ls[keep]
    total = int(ls.sum())
    ends = np.cumsum(ls)
    begins = ends - ls
    num_bins = (total // seq_len) if drop_last else -(-total // seq_len)
    limit = min(num_bins * seq_len, total)
    inside = begins < limit
    docs, begins, ends = docs[inside], begins[inside], np.minimum(ends[inside], limit)
    # document i covers rows begins_i // seq_len .. (ends_i - 1) // seq_len: one piece per row
    r0 = begins // seq_len
    cnt = (ends - 1) // seq_len - r0 + 1
    di = np.repeat(np.arange(docs.shape[0], dtype=np.int64), cnt)
    row = r0[di] + np.arange(di.shape[0], dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    lo = np.maximum(begins[di], row * seq_len)
    hi = np.minimum(ends[di], (row + 1) * seq_len)
    return Packing(row, docs[di], lo - begins[di], hi - lo, int(num_bins), seq_len, int(lengths.sum()),
                   total - int((hi - lo).sum()))
