"""Zero-copy token sources: Arrow arrays/tables, Parquet, memory-mapped Arrow IPC, HF datasets.

A :class:`TokenSource` keeps numpy views of the Arrow buffers plus three small per-document
arrays (length, address of the first token, chunk id), so opening a file costs memory in
proportion to the number of documents, never the number of tokens. Tokens are copied exactly
once, by :meth:`TokenSource.gather`, straight into the batch tensors.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .. import backends

# token value type -> gather dtype code (csrc/data/gather.cpp: TokCode)
_TOKEN_TYPES = {pa.int32(): 0, pa.int64(): 1, pa.uint16(): 2, pa.uint32(): 3}
_MASK_TYPES = (pa.bool_(), pa.uint8(), pa.int8())


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


class TokenSource:
    """Documents of token ids viewed in place.

    Attributes: ``lengths`` (N,) int64, ``num_tokens``, ``num_empty``, ``dtype`` (numpy token
    dtype), ``vocab_size`` (or None), ``has_loss_mask``.
    """

    def __init__(self, chunks: list, column: str, mask_chunks: list | None = None,
                 indices: np.ndarray | None = None, vocab_size: int | None = None, owner=None,
                 value_type: pa.DataType = pa.int32()):
        self.column = column
        self.vocab_size = vocab_size
        self._owner = owner  # keeps a memory map / table alive
        self._values: list[np.ndarray] = []
        self._mask_values: list[np.ndarray] = []
        lengths, addrs, chunk_ids, mask_addrs = [], [], [], []
        self._tok_code = _TOKEN_TYPES[value_type]
        self.dtype = np.dtype(value_type.to_pandas_dtype())
        row = 0
        for ci, ch in enumerate(chunks):
            offsets = ch.offsets.to_numpy(zero_copy_only=True).astype(np.int64, copy=False)  # (n+1,)
            vals = ch.values.to_numpy(zero_copy_only=True)  # the whole child buffer, a view
            base = vals.ctypes.data if vals.size else 0
            self._values.append(vals)
            lengths.append(np.diff(offsets))
            addrs.append((base + offsets[:-1] * vals.itemsize).astype(np.uint64))
            chunk_ids.append(np.full(len(ch), ci, dtype=np.int32))
            if mask_chunks is not None:
                m = mask_chunks[ci]
                moffs = m.offsets.to_numpy(zero_copy_only=True).astype(np.int64, copy=False)
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
        if indices is not None:  # HF datasets select()/shuffle(): a row mapping, applied to the index only
            self.lengths = self.lengths[indices]
            self._addr = self._addr[indices]
            self._chunk = self._chunk[indices]
            if self._mask_addr is not None:
                self._mask_addr = self._mask_addr[indices]
        self.num_tokens = int(self.lengths.sum())
        self.num_empty = int((self.lengths == 0).sum())
        self._fingerprint: str | None = None

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
            raise ValueError(f"column {self.column!r}: token {int(wrong[0])} in document {d} {what}")
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


# -- opening ---------------------------------------------------------------------------------
def _read_path(path: Path, column: str, mask_column: str | None):
    if not path.exists():
        raise FileNotFoundError(f"source: no such file {str(path)!r}")
    cols = [column] + ([mask_column] if mask_column else [])
    if path.suffix in (".parquet", ".pq"):
        schema = pq.read_schema(path)
        for c in cols:
            if c not in schema.names:
                raise ValueError(f"column {c!r} not found in {path.name}; available: {schema.names}")
        return pq.read_table(path, columns=cols, memory_map=True), None
    mm = pa.memory_map(str(path), "r")
    try:
        table = pa.ipc.open_file(mm).read_all()
    except pa.ArrowInvalid:
        mm.seek(0)
        try:
            table = pa.ipc.open_stream(mm).read_all()
        except pa.ArrowInvalid as e:
            raise ValueError(f"source: {path.name} is neither an Arrow IPC file/stream nor Parquet") from e
    return table, mm


def _hf_table(source):
    """The Arrow table and row mapping behind a ``datasets.Dataset`` (duck-typed)."""
    data = getattr(source, "data", None)
    table = getattr(data, "table", None)
    if table is None:
        inner = getattr(source, "_data", None)
        table = getattr(inner, "table", inner)
    if not isinstance(table, pa.Table):
        return None, None
    idx = getattr(source, "_indices", None)
    if idx is not None:
        idx_table = getattr(idx, "table", idx)
        idx = np.asarray(idx_table.column(0).to_numpy(), dtype=np.int64)
    return table, idx


def _column(table: pa.Table, name: str, arg: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ValueError(f"{arg}: column {name!r} not found; available: {table.column_names}")
    return table.column(name)


def _check_list_column(col: pa.ChunkedArray, name: str, allowed, what: str) -> list:
    t = col.type
    if not _is_list(t) or t.value_type not in allowed:
        raise TypeError(f"column {name!r} must be a list or large_list of {what}, got {t}")
    if col.null_count:
        first = next(i for i, v in enumerate(pc.is_null(col).to_numpy(zero_copy_only=False)) if v)
        raise ValueError(f"column {name!r} has {col.null_count} null documents (first at row {first})")
    chunks = [c for c in col.chunks]
    for c in chunks:
        if c.values.null_count and pc.sum(pc.is_null(c.flatten())).as_py():
            raise ValueError(f"column {name!r} has null tokens inside a document")
    return chunks


def open_tokens(source, column: str = "input_ids", *, loss_mask_column: str | None = None,
                vocab_size: int | None = None) -> TokenSource:
    """Open a token column without copying the tokens.

    source: pyarrow Array / ChunkedArray / Table, a Parquet path, an Arrow IPC path (memory
    mapped), or a HF ``datasets.Dataset``. The column must be list or large_list of int32,
    int64, uint16 or uint32 (chunked or sliced). ``loss_mask_column`` (list of bool/uint8, same
    lengths) marks the tokens that are scored. With ``vocab_size`` every token is checked once
    here (one pass over the data); gather() checks the tokens it copies in any case.
    """
    if vocab_size is not None and (not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    owner = None
    indices = None
    mask_col = None
    if isinstance(source, (str, os.PathLike)):
        source, owner = _read_path(Path(source), column, loss_mask_column)
    elif not isinstance(source, (pa.Table, pa.Array, pa.ChunkedArray)):
        table, indices = _hf_table(source)
        if table is None:
            raise TypeError("source must be a pyarrow Array/ChunkedArray/Table, a Parquet or Arrow IPC path, "
                            f"or a datasets.Dataset; got {type(source).__name__}")
        source = table
    if isinstance(source, pa.Table):
        col = _column(source, column, "column")
        if loss_mask_column is not None:
            mask_col = _column(source, loss_mask_column, "loss_mask_column")
        owner = owner or source
    else:
        if loss_mask_column is not None:
            raise ValueError("loss_mask_column needs a table source (got a bare array)")
        col = source if isinstance(source, pa.ChunkedArray) else pa.chunked_array([source])
        owner = owner or col
    if pa.types.is_null(col.type):
        raise ValueError(f"column {column!r} is entirely null")
    chunks = _check_list_column(col, column, tuple(_TOKEN_TYPES), "int32/int64/uint16/uint32")
    mask_chunks = None
    if mask_col is not None:
        mask_chunks = _check_list_column(mask_col, loss_mask_column, _MASK_TYPES, "bool/uint8/int8")
        if [len(c) for c in mask_chunks] != [len(c) for c in chunks]:
            # align the mask's chunking with the token column's (slices are views)
            whole = mask_col.combine_chunks()
            starts = np.cumsum([0] + [len(c) for c in chunks[:-1]])
            mask_chunks = [whole.slice(int(o), len(c)) for o, c in zip(starts, chunks)]
    if indices is not None and indices.size and (indices.min() < 0 or indices.max() >= len(col)):
        raise ValueError("source: the dataset's row mapping (_indices) points outside its table")
    if vocab_size is not None:
        for ci, c in enumerate(chunks):
            flat = c.flatten()
            if len(flat) == 0:
                continue
            mm = pc.min_max(flat).as_py()
            if mm["min"] < 0 or mm["max"] >= vocab_size:
                bad_val = mm["min"] if mm["min"] < 0 else mm["max"]
                tok_pos = pc.index(flat, bad_val).as_py()
                offs = c.offsets.to_numpy(zero_copy_only=False)
                doc = int(np.searchsorted(offs, offs[0] + tok_pos, side="right") - 1)
                doc += sum(len(x) for x in chunks[:ci])
                what = "is negative" if bad_val < 0 else f"is >= vocab_size={vocab_size}"
                raise ValueError(f"column {column!r}: token {bad_val} in document {doc} {what}")
    return TokenSource(chunks, column, mask_chunks, indices, vocab_size, owner, col.type.value_type)
