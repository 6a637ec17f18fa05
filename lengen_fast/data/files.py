"""Which files hold token shards, and are they safe to hand to native code?

Files are untrusted: every list chunk's offsets are checked (:func:`checked_offsets`) before anything follows
them, and any pyarrow/OS/decoding error while reading a Parquet or Arrow IPC file becomes a ValueError naming
the file. ``source.py`` builds the :class:`TokenSource` from what these functions return.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_TOKEN_TYPES = {pa.int32(): 0, pa.int64(): 1, pa.uint16(): 2, pa.uint32(): 3}
_MASK_TYPES = (pa.bool_(), pa.uint8(), pa.int8())


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


# -- validation of untrusted buffers -----------------------------------------------------------
def checked_offsets(chunk: pa.Array, where: str) -> np.ndarray:
    """(n+1,) int64 offsets of one list chunk, checked against its values buffer.

    Files are untrusted: a corrupted offset would send the native gather outside the memory map.
    Offsets must start at >= 0, never decrease, and end at or before the length of the values
    array. O(documents), vectorized, and the offsets stay a view when they are already int64.
    ``where`` names the file or column in the error.
    """
    if len(chunk) == 0:  # an empty array may carry an empty offsets buffer
        return np.zeros(1, dtype=np.int64)
    offsets = chunk.offsets.to_numpy(zero_copy_only=True).astype(np.int64, copy=False)  # (n+1,)
    n_values = len(chunk.values)
    if offsets.shape[0] != len(chunk) + 1:
        raise ValueError(f"{where}: corrupted list offsets: {offsets.shape[0]} offsets for {len(chunk)} documents")
    if offsets[0] < 0:
        raise ValueError(f"{where}: corrupted list offsets: the first offset is {int(offsets[0])} (< 0)")
    dec = np.flatnonzero(offsets[1:] < offsets[:-1])
    if dec.size:
        d = int(dec[0])
        raise ValueError(f"{where}: corrupted list offsets: they decrease at document {d} "
                         f"({int(offsets[d])} -> {int(offsets[d + 1])})")
    if offsets[-1] > n_values:
        raise ValueError(f"{where}: corrupted list offsets: the last offset {int(offsets[-1])} is past the end of "
                         f"the values buffer ({n_values} values)")
    return offsets


# -- opening ---------------------------------------------------------------------------------
_PARQUET_SUFFIXES = (".parquet", ".pq")
_IPC_SUFFIXES = (".arrow", ".ipc", ".feather", ".arrows", ".stream")
SHARD_SUFFIXES = _PARQUET_SUFFIXES + _IPC_SUFFIXES
MANIFEST_NAME = "manifest.json"


def _read_path(path: Path, column: str, mask_column: str | None):
    """(table, owner) of one Parquet or Arrow IPC file; every failure is a ValueError naming the file."""
    if not path.exists():
        raise FileNotFoundError(f"source: no such file {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"source: {str(path)!r} is a directory inside a list of shards; pass the directory "
                         "itself (or a glob) to open all its shards, or list the shard files")
    cols = [column] + ([mask_column] if mask_column else [])
    if path.suffix in _PARQUET_SUFFIXES:
        try:
            schema = pq.read_schema(path)
            schema.names  # noqa: B018 - decodes the field names (bytes from the file)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"source: {str(path)!r} is not a readable Parquet file (corrupted or truncated?): "
                             f"{e}") from e
        for c in cols:
            if c not in schema.names:
                raise ValueError(f"column {c!r} not found in {path.name}; available: {schema.names}")
        try:
            table = pq.read_table(path, columns=cols, memory_map=True)
            table.validate()  # buffer sizes against lengths: O(columns)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"source: cannot read Parquet file {str(path)!r} (corrupted or truncated?): {e}") from e
        return table, None
    try:
        mm = pa.memory_map(str(path), "r")
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"source: cannot memory-map {str(path)!r}: {e}") from e
    errors = []
    with open(path, "rb") as f:
        is_file_format = f.read(6) == b"ARROW1"  # the IPC file magic; streams have none
    kinds = (("IPC file", pa.ipc.open_file),) if is_file_format else (("IPC stream", pa.ipc.open_stream),)
    for kind, opener in kinds:
        try:
            mm.seek(0)
            table = opener(mm).read_all()
            table.schema.names  # noqa: B018 - decodes the field names (bytes from the file)
            # Cheap structural check: every buffer is as large as the lengths say (O(columns));
            # the list offsets themselves are checked by checked_offsets.
            table.validate()
            return table, mm
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            errors.append(f"as an {kind}: {e}")
    if path.suffix in _IPC_SUFFIXES or is_file_format:
        raise ValueError(f"source: cannot read Arrow IPC file {str(path)!r} (corrupted or truncated?); "
                         + "; ".join(errors))
    raise ValueError(f"source: {path.name} is neither an Arrow IPC file/stream nor Parquet ("
                     + "; ".join(errors) + ")")


def _has_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def resolve_shards(source) -> tuple[list[Path], Path | None]:
    """(shard paths, directory holding a manifest or None) for a file, directory, glob or list.

    A directory: its manifest's shards when it has ``manifest.json`` (see prepare.py), else its
    ``*.arrow``/``*.ipc``/``*.feather``/``*.parquet`` files in sorted order (not recursive).
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("source: an empty list of shards")
        bad = [s for s in source if not isinstance(s, (str, os.PathLike))]
        if bad:
            raise TypeError("source must be a pyarrow Array/ChunkedArray/Table, a datasets.Dataset, a path, or a "
                            f"list of shard paths; got a list holding {type(bad[0]).__name__}")
        return [Path(s) for s in source], None
    s = os.fspath(source)
    path = Path(s)
    if path.is_dir():
        if (path / MANIFEST_NAME).exists():
            return [], path
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SHARD_SUFFIXES)
        if not files:
            raise ValueError(f"source: directory {s!r} has no {MANIFEST_NAME} and no token shards "
                             f"({', '.join('*' + x for x in SHARD_SUFFIXES)})")
        return files, None
    if not path.exists() and _has_glob(s):
        import glob
        files = sorted(Path(p) for p in glob.glob(s) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"source: no files match {s!r}")
        return files, None
    return [path], None


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


def _check_list_column(col: pa.ChunkedArray, name: str, allowed, what: str, where: str = "") -> list:
    t = col.type
    if not _is_list(t) or t.value_type not in allowed:
        raise TypeError(f"{where + ': ' if where else ''}column {name!r} must be a list or large_list of {what}, "
                        f"got {t}")
    chunks = [c for c in col.chunks]
    for c in chunks:  # before anything (flatten, is_null, native code) follows the offsets
        checked_offsets(c, where or f"column {name!r}")
    if col.null_count:
        first = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"column {name!r} has {col.null_count} null documents (first at row {first})")
    for c in chunks:
        if c.values.null_count and pc.sum(pc.is_null(c.flatten())).as_py():
            raise ValueError(f"column {name!r} has null tokens inside a document")
    return chunks


def _check_vocab(chunks: list, column: str, vocab_size: int, row0: int = 0, where: str = "") -> None:
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
            doc += row0 + sum(len(x) for x in chunks[:ci])
            what = "is negative" if bad_val < 0 else f"is >= vocab_size={vocab_size}"
            raise ValueError(f"{where + ': ' if where else ''}column {column!r}: token {bad_val} in document {doc} "
                             f"{what}")


def _table_chunks(table: pa.Table, column: str, loss_mask_column: str | None, where: str):
    """(token chunks, mask chunks or None, value type) of one table, validated."""
    for name, arg in ((column, "column"), (loss_mask_column, "loss_mask_column")):
        if where and name is not None and name not in table.column_names:
            raise ValueError(f"{arg}: column {name!r} not found in {Path(where).name}; available: "
                             f"{table.column_names}")
    col = _column(table, column, "column")
    mask_col = _column(table, loss_mask_column, "loss_mask_column") if loss_mask_column is not None else None
    if pa.types.is_null(col.type):
        raise ValueError(f"{where + ': ' if where else ''}column {column!r} is entirely null")
    chunks = _check_list_column(col, column, tuple(_TOKEN_TYPES), "int32/int64/uint16/uint32", where)
    mask_chunks = None
    if mask_col is not None:
        mask_chunks = _check_list_column(mask_col, loss_mask_column, _MASK_TYPES, "bool/uint8/int8", where)
        if [len(c) for c in mask_chunks] != [len(c) for c in chunks]:
            # align the mask's chunking with the token column's (slices are views)
            whole = mask_col.combine_chunks()
            starts = np.cumsum([0] + [len(c) for c in chunks[:-1]])
            mask_chunks = [whole.slice(int(o), len(c)) for o, c in zip(starts, chunks)]
    return chunks, mask_chunks, col.type.value_type



def lengths_hash(lengths: np.ndarray) -> str:
    """Hash of (N,) document lengths: how a manifest recognises its shards cheaply."""
    return hashlib.blake2b(np.ascontiguousarray(lengths, dtype=np.int64).tobytes(), digest_size=8).hexdigest()
