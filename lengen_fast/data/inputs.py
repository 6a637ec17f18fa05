"""Which text does ``prepare`` read, in what order, and in which units of work?

Input: the text column of Parquet files, JSONL files (one JSON object per line; blank lines are not documents)
or plain-text files (one document per file), given as files, a directory (recursive), a glob or a list; or a HF
``datasets.Dataset``. One input row is one document; an empty text is an empty document.
Files that hold no text get an error naming the file (and the line, row or byte): invalid UTF-8, a binary file
(a NUL byte), a JSONL line that does not parse, a Parquet file without the text column or not Parquet at all, a
JSON string with a lone surrogate. A 0-byte file holds no document: it is skipped, and listed in the manifest
(``source.skipped_empty``) and the log.

The plan: pieces (Parquet row groups, split by rows when big; JSONL byte ranges cut at line starts; whole text
files; row ranges of a Dataset), none much larger than the target, grouped in input order into tasks of about
the target size. One task becomes one shard, so the output order is the input order for any worker count.
"""
from __future__ import annotations

import glob as globmod
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PARQUET = (".parquet", ".pq")
JSONL = (".jsonl", ".ndjson", ".json")
TEXT = (".txt", ".text", ".md")
INPUT_SUFFIXES = PARQUET + JSONL + TEXT

_DATASET = None  # the Dataset being prepared: inherited by forked workers, never pickled per task


def set_dataset(dataset) -> None:
    global _DATASET
    _DATASET = dataset


def input_files(source) -> list[Path]:
    """Sorted input files from a file, directory (recursive), glob, or list of those."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("prepare: an empty list of inputs")
        out = []
        for s in source:
            out += input_files(s)
        return out
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"prepare: the input must be a path, glob, list of paths or a datasets.Dataset; "
                        f"got {type(source).__name__}")
    s = os.fspath(source)
    p = Path(s)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in INPUT_SUFFIXES)
        if not files:
            raise ValueError(f"prepare: directory {s!r} holds no input files ({', '.join(INPUT_SUFFIXES)})")
        return files
    if p.is_file():
        if p.suffix not in INPUT_SUFFIXES:
            raise ValueError(f"prepare: {s!r} is not an input file (suffix one of {', '.join(INPUT_SUFFIXES)})")
        return [p]
    if any(ch in s for ch in "*?["):
        files = sorted(Path(f) for f in globmod.glob(s, recursive=True)
                       if Path(f).is_file() and Path(f).suffix in INPUT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"prepare: no input files match {s!r}")
        return files
    raise FileNotFoundError(f"prepare: no such file or directory {s!r}")


def is_dataset(obj) -> bool:
    return any(c.__module__.startswith("datasets") for c in type(obj).__mro__) and hasattr(obj, "features")


def _check_string_type(t: pa.DataType, where: str, column: str) -> None:
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))):
        raise TypeError(f"{where}: column {column!r} holds {t} values, not strings (text)")


def _parquet_pieces(f: Path, column: str, target: int) -> list[tuple]:
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"prepare: {str(f)!r} is not a readable Parquet file: {e}") from e
    names = pf.schema_arrow.names
    if column not in names:
        raise ValueError(f"prepare: text column {column!r} not found in {str(f)!r}; available: {names}")
    _check_string_type(pf.schema_arrow.field(column).type, f"prepare: {str(f)!r}", column)
    md = pf.metadata
    # the leaf column of the text field (leaf indices differ from field indices after nested fields)
    ci = next((j for j in range(md.num_columns) if md.schema.column(j).path == column), None)
    out, row = [], 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        n = rg.num_rows
        est = rg.column(ci).total_uncompressed_size if ci is not None else rg.total_byte_size
        cuts = np.linspace(0, n, max(1, math.ceil(est / target)) + 1).astype(np.int64)
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b > a:
                out.append(("parquet", str(f), row + int(a), row + int(b), est * int(b - a) // max(n, 1)))
        row += n
    return out


def _jsonl_pieces(f: Path, size: int, target: int) -> list[tuple]:
    parts = max(1, math.ceil(size / target))
    cuts = [0]
    with open(f, "rb") as fh:
        for k in range(1, parts):
            fh.seek(max(k * size // parts, cuts[-1]))
            fh.readline()  # to the start of the next line
            pos = fh.tell()
            if cuts[-1] < pos < size:
                cuts.append(pos)
    cuts.append(size)
    return [("jsonl", str(f), a, b, b - a) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def plan_pieces(files: list[Path], column: str, target: int) -> tuple[list[tuple], list[str]]:
    """((kind, path, lo, hi, est_bytes) pieces in input order, the 0-byte files skipped)."""
    out, empty = [], []
    for f in files:
        size = f.stat().st_size
        if size == 0:
            empty.append(str(f))
        elif f.suffix in PARQUET:
            out += _parquet_pieces(f, column, target)
        elif f.suffix in JSONL:
            out += _jsonl_pieces(f, size, target)
        else:
            out.append(("text", str(f), 0, 1, size))
    return out, empty


def dataset_pieces(ds, column: str, target: int) -> list[tuple]:
    feats = getattr(ds, "features", None) or {}
    if column not in feats:
        raise ValueError(f"prepare: text column {column!r} not found in the dataset; available: {list(feats)}")
    dtype = getattr(feats[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise TypeError(f"prepare: the dataset's column {column!r} holds {feats[column]}, not strings (text)")
    n = len(ds)
    nbytes = max(int(getattr(ds.data, "nbytes", 0) or 0), 1)
    rows = max(1, int(target * n / nbytes)) if n else 1
    return [("dataset", "<datasets.Dataset>", a, min(a + rows, n), (min(a + rows, n) - a) * nbytes // max(n, 1))
            for a in range(0, n, rows)]


def group_tasks(pieces: list[tuple], target: int) -> list[list[tuple]]:
    """Consecutive pieces grouped into tasks of about ``target`` bytes (one shard each)."""
    tasks, cur, size = [], [], 0
    for p in pieces:
        if cur and size + p[4] > target:
            tasks.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p[4]
    if cur:
        tasks.append(cur)
    return tasks


def source_fingerprint(files: list[Path] | None, dataset=None) -> dict:
    """Identifies the input: every file's path, size and mtime (cheap), or the Dataset's fingerprint."""
    if dataset is not None:
        fp = str(getattr(dataset, "_fingerprint", None) or "")
        if not fp:
            raise ValueError("prepare: the dataset has no _fingerprint to identify it; save it with save_to_disk "
                             "and load it back, or pass its files")
        d = {"dataset": fp, "rows": len(dataset)}
    else:
        d = {"files": [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                       for f in files]}
    d["fingerprint"] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:32]
    return d


# -- reading text (in the workers) ---------------------------------------------------------------------
def _line_number(path: str, byte_pos: int, index_in_piece: int) -> int:
    with open(path, "rb") as f:
        return f.read(byte_pos).count(b"\n") + index_in_piece + 1


def _utf8(v: str, where: str) -> int:
    """Bytes of ``v`` in UTF-8; a lone surrogate (from a JSON escape) is an error naming ``where``."""
    try:
        return len(v.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} holds a lone surrogate ({v[e.start]!r} at character {e.start}): not valid "
                         "Unicode text") from None


def _parquet_texts(path: str, lo: int, hi: int, column: str):
    pf = pq.ParquetFile(path)
    row = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > lo and row < hi:
            a, b = max(lo - row, 0), min(hi - row, n)
            col = pf.read_row_group(g, columns=[column]).column(column).slice(a, b - a)
            if col.null_count:
                first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"prepare: {path!r} row {row + a + first}: column {column!r} is null, not a string")
            try:
                texts = col.to_pylist()
            except UnicodeDecodeError:
                bad = next(k for k in range(len(col)) if not _decodes(col[k]))
                raise ValueError(f"prepare: {path!r} row {row + a + bad}: column {column!r} is not valid UTF-8 "
                                 "text") from None
            yield texts, int(pc.sum(pc.binary_length(col)).as_py() or 0)
        row += n


def _decodes(scalar) -> bool:
    try:
        scalar.as_py()
        return True
    except UnicodeDecodeError:
        return False


def _jsonl_texts(path: str, lo: int, hi: int, column: str):
    with open(path, "rb") as f:
        f.seek(lo)
        data = f.read(hi - lo)
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"prepare: {path!r} is a binary file, not JSONL text (a NUL byte at offset {lo + nul}, line "
                         f"{_line_number(path, lo + nul, 0)})")
    texts, nbytes = [], 0
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        where = f"prepare: {path!r} line {{}}"
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as e:
            raise ValueError(where.format(_line_number(path, lo, i)) + f": not valid UTF-8 text (byte {e.start} of "
                             f"the line: {e.reason})") from None
        except ValueError as e:
            raise ValueError(where.format(_line_number(path, lo, i)) + f": not valid JSON ({e})") from None
        if not isinstance(obj, dict) or column not in obj:
            keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(where.format(_line_number(path, lo, i)) + f": no text column {column!r} (found {keys})")
        v = obj[column]
        if not isinstance(v, str):
            raise TypeError(where.format(_line_number(path, lo, i)) + f": column {column!r} holds a "
                            f"{type(v).__name__}, not a string")
        try:
            nbytes += len(v) if v.isascii() else len(v.encode("utf-8"))
        except UnicodeEncodeError:  # the line number costs a read of the file: only on the error path
            _utf8(v, where.format(_line_number(path, lo, i)) + f": column {column!r}")
        texts.append(v)
    yield texts, nbytes


def _text_file(path: str):
    data = Path(path).read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"prepare: {path!r} is a binary file, not text (a NUL byte at offset {nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prepare: {path!r} is not UTF-8 text (byte {e.start}): {e.reason}") from None
    yield [text], len(data)


def read_texts(piece: tuple, column: str):
    """Yields (list of str, their UTF-8 bytes) for one piece; errors name the file and row, line or byte."""
    kind, path, lo, hi, _ = piece
    if kind == "parquet":
        yield from _parquet_texts(path, lo, hi, column)
    elif kind == "jsonl":
        yield from _jsonl_texts(path, lo, hi, column)
    elif kind == "text":
        yield from _text_file(path)
    else:  # dataset
        vals = _DATASET[lo:hi][column]
        nbytes = 0
        for i, v in enumerate(vals):
            if not isinstance(v, str):
                raise TypeError(f"prepare: dataset row {lo + i}: column {column!r} holds a {type(v).__name__}, "
                                "not a string")
            nbytes += _utf8(v, f"prepare: dataset row {lo + i}: column {column!r}")
        yield vals, nbytes


def iter_texts(tasks: list, column: str):
    """Every document's text in plan order (tokenizer training), one piece in memory at a time."""
    for task in tasks:
        for piece in task:
            for texts, _ in read_texts(piece, column):
                yield from texts


def _head(piece: tuple, nbytes: int) -> tuple:
    """The first ~``nbytes`` of a JSONL or Dataset piece (whole lines, whole rows); other pieces whole."""
    kind, path, lo, hi, est = piece
    if kind == "jsonl" and hi - lo > nbytes:
        with open(path, "rb") as f:
            f.seek(lo + nbytes)
            f.readline()  # lo is a line start: read to the end of the line that holds lo + nbytes
            end = min(f.tell(), hi)
        return kind, path, lo, end, end - lo
    if kind == "dataset" and est > nbytes:
        end = lo + max(1, (hi - lo) * nbytes // est)
        return kind, path, lo, end, nbytes
    return piece


def sample_texts(tasks: list, column: str, max_bytes: int, spread: int = 8) -> list[str]:
    """About ``max_bytes`` of text from the starts of ``spread`` evenly spaced tasks (a document longer than its
    share is cut): what the tiktoken path is checked on before it runs. Deterministic for a plan."""
    if max_bytes <= 0 or not tasks:
        return []
    picks = sorted(set(np.linspace(0, len(tasks) - 1, min(spread, len(tasks))).round().astype(int).tolist()))
    share = max(max_bytes // len(picks), 1)
    out = []
    for t in picks:
        left = share
        for texts, _ in read_texts(_head(tasks[t][0], share), column):
            for s in texts:
                out.append(s[:left])
                left -= len(out[-1].encode("utf-8", "surrogatepass"))
                if left <= 0:
                    break
            break  # the first batch of the task's first piece
    return out
