"""Zero-copy token sources: Arrow arrays/tables, Parquet, memory-mapped Arrow IPC, HF datasets.

A :class:`TokenSource` keeps numpy views of the Arrow buffers plus three small per-document
arrays (length, address of the first token, chunk id), so opening a file costs memory in
proportion to the number of documents, never the number of tokens. Tokens are copied exactly
once, by :meth:`TokenSource.gather`, straight into the batch tensors.
"""
from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import backends
# the file side (validation, discovery, reading) lives in files.py; these names are part of source's API
from .files import (_TOKEN_TYPES, MANIFEST_NAME, SHARD_SUFFIXES, _check_list_column, _check_vocab,  # noqa: F401
                    _hf_table, _read_path, _table_chunks, checked_offsets, lengths_hash, resolve_shards)

class TokenSource:
    """Documents of token ids viewed in place.

    Attributes: ``lengths`` (N,) int64, ``num_tokens``, ``num_empty``, ``dtype`` (numpy token
    dtype), ``vocab_size`` (or None), ``has_loss_mask``, ``paths`` (shard files, when opened from
    files) and ``prepared_dir`` (when opened from a ``lengen-data prepare`` directory).
    """

    def __init__(self, chunks: list, column: str, mask_chunks: list | None = None,
                 indices: np.ndarray | None = None, vocab_size: int | None = None, owner=None,
                 value_type: pa.DataType = pa.int32()):
        self.column = column
        self.vocab_size = vocab_size
        self._owner = owner  # keeps a memory map / table alive
        self.paths: list = []  # the shard files, when opened from files
        self._chunk_where: list[str] | None = None  # file of each chunk, named in errors
        self.prepared_dir: Path | None = None  # a `lengen-data prepare` directory (its tokenizer.json, manifest.json)
        self._values: list[np.ndarray] = []
        self._mask_values: list[np.ndarray] = []
        lengths, addrs, chunk_ids, mask_addrs = [], [], [], []
        self._tok_code = _TOKEN_TYPES[value_type]
        self.dtype = np.dtype(value_type.to_pandas_dtype())
        row = 0
        for ci, ch in enumerate(chunks):
            offsets = checked_offsets(ch, f"column {column!r} chunk {ci}")  # (n+1,)
            vals = ch.values.to_numpy(zero_copy_only=True)  # the whole child buffer, a view
            base = vals.ctypes.data if vals.size else 0
            self._values.append(vals)
            lengths.append(np.diff(offsets))
            addrs.append((base + offsets[:-1] * vals.itemsize).astype(np.uint64))
            chunk_ids.append(np.full(len(ch), ci, dtype=np.int32))
            if mask_chunks is not None:
                m = mask_chunks[ci]
                moffs = checked_offsets(m, f"loss mask chunk {ci}")
                mlen = np.diff(moffs)
                bad = np.flatnonzero(mlen != lengths[-1])
                if bad.size:
                    raise ValueError(f"loss_mask_column: document {row + int(bad[0])} has {int(mlen[bad[0]])} "
                                     f"mask entries but {int(lengths[-1][bad[0]])} tokens in {column!r}")
                mv = m.values
                if mv.type == pa.bool_():
                    mv = pc.cast(mv, pa.uint8())  # bit-packed in Arrow: one byte per token (a copy)
                mvals = mv.to_numpy(zero_copy_only=True).view(np.uint8)
                self._mask_values.append(mvals)
                mbase = mvals.ctypes.data if mvals.size else 0
                mask_addrs.append((mbase + moffs[:-1]).astype(np.uint64))
            row += len(ch)
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
        self.lengths = cat(lengths, np.int64)
        self._addr = cat(addrs, np.uint64)
        self._chunk = cat(chunk_ids, np.int32)
        self._mask_addr = cat(mask_addrs, np.uint64) if mask_chunks is not None else None
        self._fingerprint: str | None = None
        self._reindex(indices)  # HF datasets select()/shuffle(): a row mapping, applied to the index only

    def _reindex(self, indices: np.ndarray | None) -> None:
        if indices is not None:
            self.lengths = self.lengths[indices]
            self._addr = self._addr[indices]
            self._chunk = self._chunk[indices]
            if self._mask_addr is not None:
                self._mask_addr = self._mask_addr[indices]
            self._fingerprint = None
        self.num_tokens = int(self.lengths.sum())
        self.num_empty = int((self.lengths == 0).sum())

    def select(self, indices) -> "TokenSource":
        """A TokenSource of documents ``indices`` (in that order) viewing the same buffers: only the (N,)
        index arrays are copied, never tokens."""
        idx = np.asarray(indices, dtype=np.int64)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"select: document indices must be in [{-n}, {n}), got {int(idx.min())}..{int(idx.max())}")
        sub = copy.copy(self)
        sub._reindex(idx)
        return sub

    # -- views ------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def has_loss_mask(self) -> bool:
        return self._mask_addr is not None

    def _view(self, values: list[np.ndarray], addr: np.ndarray, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document index {i} out of range for {n} documents")
        vals = values[self._chunk[i]]
        base = vals.ctypes.data if vals.size else 0
        off = (int(addr[i]) - base) // vals.itemsize
        return vals[off:off + int(self.lengths[i])]

    def tokens(self, i: int) -> np.ndarray:
        """Document i as a read-only numpy view of the Arrow buffer (no copy)."""
        return self._view(self._values, self._addr, i)

    def loss_mask(self, i: int) -> np.ndarray:
        """Document i's loss mask (uint8 view); raises when the source has none."""
        if self._mask_addr is None:
            raise ValueError("this TokenSource was opened without loss_mask_column")
        return self._view(self._mask_values, self._mask_addr, i)

    def fingerprint(self) -> str:
        """Hash of the document lengths: identifies the data in a loader state_dict."""
        if self._fingerprint is None:
            h = hashlib.blake2b(self.lengths.tobytes(), digest_size=8)
            self._fingerprint = f"{len(self)}:{self.num_tokens}:{h.hexdigest()}"
        return self._fingerprint

    # -- batch assembly -------------------------------------------------------------------
    def gather(self, doc: np.ndarray, start: np.ndarray, length: np.ndarray, total: int, *,
               ignore_index: int = -100, pad_id: int = 0, pin_memory: bool = False,
               backend: str | None = None, out: np.ndarray | None = None):
        """Copy pieces (doc, start, length) back to back into flat (total,) int64 tensors.

        Returns (input_ids, labels, position_ids, cu_seqlens int64 numpy). labels[t] is the next
        token inside the same piece, else ignore_index (piece ends, padding, and tokens whose
        loss mask is 0). Positions restart at 0 in every piece. [cu[-1], total) is padding.
        ``out``: an optional (3, total) int64 array to write into (ids, labels, positions).
        """
        doc = np.ascontiguousarray(doc, dtype=np.int64)
        start = np.ascontiguousarray(start, dtype=np.int64)
        length = np.ascontiguousarray(length, dtype=np.int64)
        cu = np.zeros(doc.shape[0] + 1, dtype=np.int64)
        np.cumsum(length, out=cu[1:])
        if cu[-1] > total:
            raise ValueError(f"pieces hold {int(cu[-1])} tokens, more than total={total}")
        if doc.size and (doc.min() < 0 or doc.max() >= len(self)):
            raise ValueError("gather: doc index out of range")
        if doc.size and ((start < 0).any() or (start + length > self.lengths[doc]).any()):
            raise ValueError("gather: a piece (start, length) runs past the end of its document")
        if out is not None:
            if out.shape != (3, total) or out.dtype != np.int64 or not out.flags.c_contiguous:
                raise ValueError(f"out must be a C-contiguous (3, {total}) int64 array")
            ids, labels, pos = torch.from_numpy(out).unbind(0)
        elif pin_memory and torch.cuda.is_available():  # torch's caching pinned-host allocator
            ids, labels, pos = (torch.empty(total, dtype=torch.int64, pin_memory=True) for _ in range(3))
        else:
            # One (3, total) allocation: numpy maps big arrays fresh with transparent huge pages,
            # so the page faults of new output memory (which otherwise dominate batch assembly,
            # as glibc trims and re-faults 4 KiB heap pages) cost a few 2 MiB faults.
            ids, labels, pos = torch.from_numpy(np.empty((3, total), dtype=np.int64)).unbind(0)
        impl = backends.select("data", torch.device("cpu"), backend, supported=("cpu", "reference"))
        if impl == "cpu":
            bad = backends.cpu_ext().data_gather(
                self._addr.ctypes.data, 0 if self._mask_addr is None else self._mask_addr.ctypes.data,
                self._tok_code, doc.ctypes.data, start.ctypes.data, length.ctypes.data, cu.ctypes.data,
                int(doc.shape[0]), ids.data_ptr(), labels.data_ptr(), pos.data_ptr(), int(total),
                int(ignore_index), int(pad_id), int(self.vocab_size or 0))
        else:
            bad = gather_ref(self, doc, start, length, cu, ids.numpy(), labels.numpy(), pos.numpy(),
                             ignore_index, pad_id)
        if bad >= 0:
            d = int(doc[bad])
            toks = self.tokens(d)[start[bad]:start[bad] + length[bad]].astype(np.int64)
            wrong = toks[(toks < 0) | ((toks >= self.vocab_size) if self.vocab_size else False)]
            what = "is negative" if wrong[0] < 0 else f"is >= vocab_size={self.vocab_size}"
            shard = f"{self._chunk_where[self._chunk[d]]}: " if self._chunk_where else ""
            raise ValueError(f"{shard}column {self.column!r}: token {int(wrong[0])} in document {d} {what}")
        return ids, labels, pos, cu


def gather_ref(src: TokenSource, doc, start, length, cu, ids, labels, pos, ignore_index, pad_id) -> int:
    """Pure-numpy reference of csrc/data/gather.cpp; returns the first bad piece or -1."""
    bad = -1
    for p in range(doc.shape[0]):
        o, n = int(cu[p]), int(length[p])
        if n == 0:
            continue
        t = src.tokens(int(doc[p]))[start[p]:start[p] + n].astype(np.int64)
        if bad < 0 and (t.min() < 0 or (src.vocab_size and t.max() >= src.vocab_size)):
            bad = p
        ids[o:o + n] = t
        pos[o:o + n] = np.arange(n)
        labels[o:o + n] = ignore_index
        labels[o:o + n - 1] = t[1:]
        if src.has_loss_mask:
            m = src.loss_mask(int(doc[p]))[start[p]:start[p] + n]
            labels[o:o + n - 1][m[1:] == 0] = ignore_index
    tail = int(cu[-1])
    ids[tail:] = pad_id
    labels[tail:] = ignore_index
    pos[tail:] = 0
    return bad

def _open_shards(paths: list[Path], column: str, loss_mask_column: str | None, vocab_size: int | None,
                 expect: list[dict] | None = None, scan_vocab: bool = True) -> TokenSource:
    """One TokenSource over all shards: their chunks side by side, nothing copied.

    ``expect``: the manifest's record per shard (bytes, docs, tokens, lengths hash), checked so a
    shard that changed since the manifest was written is refused by name.
    """
    chunks, mask_chunks, owners, chunk_where = [], [] if loss_mask_column else None, [], []
    value_type = None
    for i, path in enumerate(paths):
        rec = expect[i] if expect is not None else None
        if rec is not None:
            if not path.exists():
                raise FileNotFoundError(f"source: shard {str(path)!r} listed in the manifest has disappeared")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise ValueError(f"source: shard {str(path)!r} changed since the manifest was written "
                                 f"({size} bytes, the manifest says {rec['bytes']})")
        table, mm = _read_path(path, column, loss_mask_column)
        owners.append((table, mm))
        ch, mch, vt = _table_chunks(table, column, loss_mask_column, str(path))
        if value_type is None:
            value_type = vt
        elif vt != value_type:
            raise TypeError(f"source: shard {str(path)!r} holds {vt} tokens but {str(paths[0])!r} holds "
                            f"{value_type}; all shards must share one token type")
        if rec is not None:
            n_docs = sum(len(c) for c in ch)
            lengths = np.concatenate([np.diff(checked_offsets(c, str(path))) for c in ch]) if ch else \
                np.zeros(0, np.int64)
            got = {"docs": n_docs, "tokens": int(lengths.sum()), "lengths_hash": lengths_hash(lengths)}
            diff = [f"{k} {got[k]} != {rec[k]}" for k in got if k in rec and got[k] != rec[k]]
            if diff:
                raise ValueError(f"source: shard {str(path)!r} changed since the manifest was written "
                                 f"({', '.join(diff)})")
        if vocab_size is not None and scan_vocab:
            _check_vocab(ch, column, vocab_size, sum(len(c) for c in chunks), str(path))
        chunks += ch
        chunk_where += [str(path)] * len(ch)
        if mask_chunks is not None:
            mask_chunks += mch
    src = TokenSource(chunks, column, mask_chunks, None, vocab_size, owners, value_type)
    src.paths = list(paths)
    src._chunk_where = chunk_where
    return src

def open_tokens(source, column: str = "input_ids", *, loss_mask_column: str | None = None,
                vocab_size: int | None = None, tokenizer=None) -> TokenSource:
    """Open a token column without copying the tokens.

    source: pyarrow Array / ChunkedArray / Table, a HF ``datasets.Dataset``, or files: a Parquet
    or Arrow IPC path (memory mapped), a directory of such shards (a ``lengen-data prepare``
    output with its manifest, or any directory of ``*.arrow``/``*.parquet`` files), a glob, or a
    list of shard paths. All shards open at once as one source; IPC shards stay memory-mapped, so
    memory grows with the number of documents, not tokens (Parquet shards are decoded).
    The column must be list or large_list of int32, int64, uint16 or uint32 (chunked or sliced).
    ``loss_mask_column`` (list of bool/uint8, same lengths) marks the tokens that are scored.
    With ``vocab_size`` every token is checked once here (one pass over the data); gather()
    checks the tokens it copies in any case. A prepared directory supplies its own vocab_size
    (checked lazily by gather) and, with ``tokenizer`` (a tokenizer.json path, a directory, or a
    tokenizers/transformers object), refuses a manifest written with a different tokenizer.
    Every file's list offsets are validated before any native code reads them.
    """
    if vocab_size is not None and (not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(source, (str, os.PathLike, list, tuple)):
        paths, prepared = resolve_shards(source)
        if prepared is not None:
            from .shards import check_manifest  # the manifest's format lives with its writer
            paths, expect, m_vocab = check_manifest(prepared, column=column, tokenizer=tokenizer)
            if vocab_size is not None and vocab_size < m_vocab:
                raise ValueError(f"vocab_size={vocab_size} is smaller than the prepared corpus' vocabulary "
                                 f"({m_vocab}, {str(prepared / MANIFEST_NAME)!r})")
            src = _open_shards(paths, column, loss_mask_column, vocab_size or m_vocab, expect,
                               scan_vocab=vocab_size is not None)
            src.prepared_dir = prepared
            return src
        if tokenizer is not None:
            raise ValueError("tokenizer= is checked against a prepared directory's manifest; "
                             f"{os.fspath(source) if not isinstance(source, (list, tuple)) else 'a list of shards'} "
                             f"has no {MANIFEST_NAME}")
        return _open_shards(paths, column, loss_mask_column, vocab_size)
    indices = None
    if not isinstance(source, (pa.Table, pa.Array, pa.ChunkedArray)):
        table, indices = _hf_table(source)
        if table is None:
            if _is_iterable_dataset(source):
                raise TypeError(
                    "source is a datasets.IterableDataset: decomposition and packing need every document's "
                    "length up front, which a stream cannot give. Materialise it first, e.g. "
                    "datasets.Dataset.from_generator(lambda: (yield from iterable_ds), features=iterable_ds.features) "
                    "or load_dataset(..., streaming=False), or write token shards with `lengen-data prepare`")
            raise TypeError("source must be a pyarrow Array/ChunkedArray/Table, a Parquet or Arrow IPC path, "
                            "a directory, glob or list of shards, or a datasets.Dataset; "
                            f"got {type(source).__name__}")
        source = table
    if isinstance(source, pa.Table):
        owner = source
        chunks, mask_chunks, value_type = _table_chunks(source, column, loss_mask_column, "")
        n_rows = source.num_rows
    else:
        if loss_mask_column is not None:
            raise ValueError("loss_mask_column needs a table source (got a bare array)")
        col = source if isinstance(source, pa.ChunkedArray) else pa.chunked_array([source])
        owner = col
        if pa.types.is_null(col.type):
            raise ValueError(f"column {column!r} is entirely null")
        chunks = _check_list_column(col, column, tuple(_TOKEN_TYPES), "int32/int64/uint16/uint32")
        mask_chunks, value_type, n_rows = None, col.type.value_type, len(col)
    if indices is not None and indices.size and (indices.min() < 0 or indices.max() >= n_rows):
        raise ValueError("source: the dataset's row mapping (_indices) points outside its table")
    if vocab_size is not None:
        _check_vocab(chunks, column, vocab_size)
    return TokenSource(chunks, column, mask_chunks, indices, vocab_size, owner, value_type)


def _is_iterable_dataset(obj) -> bool:
    return any(c.__name__ == "IterableDataset" and "datasets" in c.__module__ for c in type(obj).__mro__)
