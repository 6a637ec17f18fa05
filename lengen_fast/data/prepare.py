"""Corpus preparation: how does a text corpus become memory-mapped token shards for the loader?

    prepare("corpus/*.parquet", "tokens/", tokenizer="tokenizer.json")   # or PrepareConfig(...)
    src = open_tokens("tokens/")                                         # all shards, zero-copy

Input: the text column of Parquet files, JSONL files (one JSON object per line) or plain-text
files (one document per file), given as files, a directory, a glob or a list; or a HF
``datasets.Dataset``. One input row is one document (an empty text gives an empty document).
Tokenizer: a local ``tokenizer.json``, a directory for ``AutoTokenizer.from_pretrained`` (nothing
is downloaded), or ``train_tokenizer=V``: a byte-level BPE of V tokens trained on the corpus.

Output directory:
  shard-00000.arrow ...  Arrow IPC files, column ``input_ids`` list<uint16|uint32> (uint16 when
                         the vocabulary fits), opened memory-mapped by ``open_tokens``
  tokenizer.json         the tokenizer that produced them
  manifest.json          tokenizer fingerprint, source fingerprint, per-shard counts and hashes

How it runs: the input is cut into tasks of about ``shard_mb`` MB of text (Parquet row groups,
byte ranges of JSONL files on line boundaries, groups of text files, row ranges of a Dataset);
each task becomes one shard, written to a temporary name and renamed, so a shard on disk is
finished. Tasks run in a process pool over the cores; each process holds one task's text at a
time, never the corpus. A rerun skips shards already written by the same plan (resume), and the
same inputs and tokenizer always give the same bytes (deterministic).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob as globmod
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .source import MANIFEST_NAME, lengths_hash

FORMAT = "lengen-tokens"
FORMAT_VERSION = 1
TOKENIZER_NAME = "tokenizer.json"
COLUMN = "input_ids"
PARQUET = (".parquet", ".pq")
JSONL = (".jsonl", ".ndjson", ".json")
TEXT = (".txt", ".text", ".md")
INPUT_SUFFIXES = PARQUET + JSONL + TEXT
DTYPES = ("auto", "uint16", "uint32")
_DTYPE_MAX = {"uint16": 1 << 16, "uint32": 1 << 32}
_BATCH_ROWS = 65536  # documents per IPC record batch


@dataclass
class PrepareConfig:
    tokenizer: str | None = None          # tokenizer.json, or a directory for AutoTokenizer (local only)
    train_tokenizer: int | None = None    # instead: train a byte-level BPE of this vocabulary size
    text_column: str = "text"             # Parquet/JSONL/Dataset column holding the text
    add_special_tokens: bool = False      # apply the tokenizer's template (BOS/EOS) to every document
    dtype: str = "auto"                   # token type: auto (uint16 when the vocabulary fits) | uint16 | uint32
    shard_mb: float = 64.0                # text MB per task, i.e. per output shard
    workers: int = 0                      # processes; 0: every core
    progress: bool = True                 # a tqdm bar on a terminal, plain lines (every 10 s) in a log
    overwrite: bool = False               # replace an output directory prepared from other inputs/tokenizer


def _check_config(c: PrepareConfig) -> None:
    if (c.tokenizer is None) == (c.train_tokenizer is None):
        raise ValueError("give exactly one of tokenizer (a tokenizer.json or a local directory) and "
                         "train_tokenizer (a vocabulary size)")
    if c.train_tokenizer is not None and (not isinstance(c.train_tokenizer, int) or isinstance(c.train_tokenizer, bool)
                                          or c.train_tokenizer < 257):
        raise ValueError(f"train_tokenizer must be an int vocabulary size >= 257 (256 bytes + merges), "
                         f"got {c.train_tokenizer!r}")
    if c.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {c.dtype!r}")
    if not isinstance(c.text_column, str) or not c.text_column:
        raise ValueError(f"text_column must be a non-empty str, got {c.text_column!r}")
    if not isinstance(c.shard_mb, (int, float)) or isinstance(c.shard_mb, bool) or not 0 < c.shard_mb < 1e6:
        raise ValueError(f"shard_mb must be a positive number of MB, got {c.shard_mb!r}")
    if not isinstance(c.workers, int) or isinstance(c.workers, bool) or c.workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0: every core), got {c.workers!r}")


# -- tokenizers ---------------------------------------------------------------------------------
def load_tokenizer(spec):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json path, a local directory, or an object.

    Directories go through ``AutoTokenizer.from_pretrained(..., local_files_only=True)`` and must
    hold a fast tokenizer; its backend (the same ids as the transformers tokenizer) is returned.
    """
    from tokenizers import Tokenizer
    if isinstance(spec, Tokenizer):
        return spec
    backend = getattr(spec, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a path to tokenizer.json, a local directory, or a tokenizers/"
                        f"transformers tokenizer; got {type(spec).__name__}")
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer: no such file or directory {str(path)!r} (only local tokenizers are "
                                "used; nothing is downloaded)")
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer: cannot read {str(path)!r} as a tokenizers JSON file: {e}") from e
    if (path / TOKENIZER_NAME).is_file() and not (path / "tokenizer_config.json").exists():
        return load_tokenizer(path / TOKENIZER_NAME)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; say which path failed
        raise ValueError(f"tokenizer: AutoTokenizer cannot load the directory {str(path)!r}: {e}") from e
    backend = getattr(tok, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(f"tokenizer: {str(path)!r} holds a slow (Python) tokenizer; prepare needs a fast one "
                         "(a tokenizer.json)")
    return backend


def tokenizer_fingerprint(tok, add_special_tokens: bool = False) -> str:
    """sha256 of the tokenizer's canonical JSON (vocabulary, merges, normalizer, template)."""
    h = hashlib.sha256(tok.to_str().encode())
    h.update(b"special" if add_special_tokens else b"plain")
    return h.hexdigest()[:32]


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens (GPT-2 style) trained on an iterable of str."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def token_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """The smallest of uint16/uint32 that holds ``vocab_size`` ids, or ``dtype`` after checking it fits."""
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= _DTYPE_MAX["uint16"] else "uint32"
    if vocab_size > _DTYPE_MAX[dtype]:
        raise ValueError(f"the tokenizer's vocabulary of {vocab_size:,} tokens is too large for dtype {dtype} "
                         f"(at most {_DTYPE_MAX[dtype]:,} ids)")
    return dtype


# -- input discovery and the plan -----------------------------------------------------------------
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


def _is_dataset(obj) -> bool:
    return any(c.__module__.startswith("datasets") for c in type(obj).__mro__) and hasattr(obj, "features")


def _check_string_type(t: pa.DataType, where: str, column: str) -> None:
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))):
        raise TypeError(f"{where}: column {column!r} holds {t} values, not strings (text)")


def _pieces(files: list[Path], column: str, target: int) -> list[tuple]:
    """(kind, path, lo, hi, est_bytes) units in input order; none is much larger than ``target``."""
    out = []
    for f in files:
        if f.suffix in PARQUET:
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
            row = 0
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                n = rg.num_rows
                est = rg.column(ci).total_uncompressed_size if ci is not None else rg.total_byte_size
                parts = max(1, math.ceil(est / target))
                cuts = np.linspace(0, n, parts + 1).astype(np.int64)
                for a, b in zip(cuts[:-1], cuts[1:]):
                    if b > a:
                        out.append(("parquet", str(f), row + int(a), row + int(b), est * int(b - a) // max(n, 1)))
                row += n
        elif f.suffix in JSONL:
            size = f.stat().st_size
            parts = max(1, math.ceil(size / target))
            cuts = [0]
            with open(f, "rb") as fh:
                for k in range(1, parts):
                    fh.seek(max(k * size // parts, cuts[-1]))
                    fh.readline()  # to the start of the next line
                    pos = fh.tell()
                    if pos < size and pos > cuts[-1]:
                        cuts.append(pos)
            cuts.append(size)
            out += [("jsonl", str(f), a, b, b - a) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        else:
            out.append(("text", str(f), 0, 1, f.stat().st_size))
    return out


def _dataset_pieces(ds, column: str, target: int) -> list[tuple]:
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


def _tasks(pieces: list[tuple], target: int) -> list[list[tuple]]:
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


# -- reading text (in the workers) ---------------------------------------------------------------
_DATASET = None  # the Dataset being prepared: inherited by forked workers, never pickled per task


def _line_number(path: str, byte_pos: int, index_in_piece: int) -> int:
    with open(path, "rb") as f:
        return f.read(byte_pos).count(b"\n") + index_in_piece + 1


def _texts(piece: tuple, column: str):
    """Yields lists of str for one piece; errors name the file and row (or line)."""
    kind, path, lo, hi, _ = piece
    if kind == "parquet":
        pf = pq.ParquetFile(path)
        md = pf.metadata
        row = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if row + n > lo and row < hi:
                col = pf.read_row_group(g, columns=[column]).column(column)
                a, b = max(lo - row, 0), min(hi - row, n)
                col = col.slice(a, b - a)
                if col.null_count:
                    first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                    raise ValueError(f"prepare: {path!r} row {row + a + first}: column {column!r} is null, "
                                     "not a string")
                yield col.to_pylist()
            row += n
    elif kind == "jsonl":
        with open(path, "rb") as f:
            f.seek(lo)
            data = f.read(hi - lo)
        texts = []
        for i, line in enumerate(data.split(b"\n")):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"prepare: {path!r} line {_line_number(path, lo, i)}: not valid JSON ({e})") from e
            if not isinstance(obj, dict) or column not in obj:
                keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"prepare: {path!r} line {_line_number(path, lo, i)}: no text column {column!r} "
                                 f"(found {keys})")
            v = obj[column]
            if not isinstance(v, str):
                raise TypeError(f"prepare: {path!r} line {_line_number(path, lo, i)}: column {column!r} holds a "
                                f"{type(v).__name__}, not a string")
            texts.append(v)
        yield texts
    elif kind == "text":
        data = Path(path).read_bytes()
        try:
            yield [data.decode("utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(f"prepare: {path!r} is not UTF-8 text (byte {e.start}): {e.reason}") from e
    else:  # dataset
        vals = _DATASET[lo:hi][column]
        for i, v in enumerate(vals):
            if not isinstance(v, str):
                raise TypeError(f"prepare: dataset row {lo + i}: column {column!r} holds a {type(v).__name__}, "
                                "not a string")
        yield vals


def iter_texts(tasks: list, column: str):
    """Every document's text in plan order (for tokenizer training), one piece in memory at a time."""
    for task in tasks:
        for piece in task:
            yield from (t for batch in _texts(piece, column) for t in batch)


# -- one task -> one shard -----------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tok_json: str, dataset, pool_process: bool = True) -> None:
    global _DATASET
    if pool_process:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from tokenizers import Tokenizer
    _WORKER["tok"] = Tokenizer.from_str(tok_json)
    if dataset is not None:
        _DATASET = dataset


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.arrow"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:32]


def _shard_record(path: Path, text_bytes: int | None = None) -> dict:
    """Counts and hashes of a written shard, read back through its memory map (offsets only)."""
    from .source import checked_offsets
    with pa.memory_map(str(path), "r") as mm:
        table = pa.ipc.open_file(mm).read_all()
        chunks = table.column(COLUMN).chunks
        lengths = (np.concatenate([np.diff(checked_offsets(c, str(path))) for c in chunks]) if chunks
                   else np.zeros(0, np.int64))
        meta = table.schema.metadata or {}
    rec = {"file": path.name, "bytes": path.stat().st_size, "docs": int(lengths.shape[0]),
           "tokens": int(lengths.sum()), "lengths_hash": lengths_hash(lengths), "sha256": _file_sha256(path)}
    rec["text_bytes"] = int(text_bytes if text_bytes is not None else meta.get(b"lengen.text_bytes", b"0"))
    return rec


def _run_task(args) -> dict:
    index, task, column, dtype, add_special, out_dir, plan = args
    tok = _WORKER["tok"]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    np_dtype = np.dtype(dtype)
    lengths, ids, text_bytes = [], [], 0
    for piece in task:
        for texts in _texts(piece, column):
            for a in range(0, len(texts), 1024):
                batch = texts[a:a + 1024]
                text_bytes += sum(len(t.encode("utf-8")) for t in batch)
                encs = [e.ids for e in encode(batch, add_special_tokens=add_special)]  # each .ids builds a list
                n = [len(e) for e in encs]
                lengths += n
                ids.append(np.fromiter(itertools.chain.from_iterable(encs), dtype=np_dtype, count=sum(n)))
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.concatenate(ids) if ids else np.zeros(0, np_dtype)
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    large = offsets[-1] >= (1 << 31)
    cls, off_t = (pa.LargeListArray, np.int64) if large else (pa.ListArray, np.int32)
    arr = cls.from_arrays(pa.array(offsets.astype(off_t)), pa.array(values))
    schema = pa.schema([pa.field(COLUMN, arr.type)],
                       metadata={"lengen.plan": plan, "lengen.shard": str(index), "lengen.text_bytes": str(text_bytes)})
    table = pa.Table.from_arrays([arr], schema=schema)
    final = Path(out_dir) / shard_name(index)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, schema) as w:
        for b in table.to_batches(max_chunksize=_BATCH_ROWS):
            w.write_batch(b)
    os.replace(tmp, final)  # a shard on disk is a finished shard
    rec = _shard_record(final, text_bytes)
    rec["index"] = index
    return rec


def _finished_shard(path: Path, plan: str, index: int) -> bool:
    """True when ``path`` is a complete shard written by this plan (resume)."""
    try:
        with pa.memory_map(str(path), "r") as mm:
            meta = pa.ipc.open_file(mm).schema.metadata or {}
    except (pa.ArrowException, OSError):
        return False
    return meta.get(b"lengen.plan") == plan.encode() and meta.get(b"lengen.shard") == str(index).encode()


# -- the manifest ------------------------------------------------------------------------------------
def read_manifest(directory) -> dict:
    """The parsed manifest.json of a prepared directory; a clear error when it is missing or damaged."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(Path(directory))!r} has no {MANIFEST_NAME}: not a prepared directory "
                                "(run `lengen-data prepare`)")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a {FORMAT} manifest")
    if m.get("version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format version {m.get('version')!r}; this lengen_fast reads "
                         f"version {FORMAT_VERSION}")
    for key, typ in (("shards", list), ("tokenizer", dict), ("vocab_size", int), ("column", str)):
        if not isinstance(m.get(key), typ):
            raise ValueError(f"{str(path)!r}: field {key!r} is missing or not a {typ.__name__}")
    return m


def check_manifest(directory, *, column: str = COLUMN, tokenizer=None) -> tuple[list[Path], list[dict], int]:
    """(shard paths, their manifest records, vocab_size) of a complete prepared directory.

    Refuses an unfinished preparation, another column, a tokenizer other than ``tokenizer`` (when
    given), and a shard that has disappeared (open_tokens then checks sizes, counts and lengths).
    """
    directory = Path(directory)
    m = read_manifest(directory)
    where = str(directory / MANIFEST_NAME)
    if not m.get("complete"):
        raise ValueError(f"{where}: the preparation did not finish ({len(m['shards'])} shards recorded); rerun "
                         "`lengen-data prepare` with the same arguments to resume it")
    if column != m["column"]:
        raise ValueError(f"column: {str(directory)!r} holds column {m['column']!r}, not {column!r}")
    if tokenizer is not None:
        want = tokenizer_fingerprint(load_tokenizer(tokenizer), bool(m["tokenizer"].get("add_special_tokens")))
        if want != m["tokenizer"].get("fingerprint"):
            raise ValueError(f"{where}: the corpus was tokenized with a different tokenizer "
                             f"({m['tokenizer'].get('source')!r}, fingerprint {m['tokenizer'].get('fingerprint')}) "
                             f"than the one requested ({tokenizer!r}, fingerprint {want})")
    paths, recs = [], []
    for rec in m["shards"]:
        ok = (isinstance(rec, dict) and isinstance(rec.get("file"), str) and "/" not in rec["file"]
              and rec["file"] not in ("", ".", "..") and isinstance(rec.get("lengths_hash"), str)
              and all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) and rec[k] >= 0
                      for k in ("bytes", "docs", "tokens")))
        if not ok:
            raise ValueError(f"{where}: a shard record is damaged (needs file, bytes, docs, tokens, lengths_hash): "
                             f"{rec!r}")
        p = directory / rec["file"]
        if not p.is_file():
            raise FileNotFoundError(f"{where}: shard {rec['file']!r} has disappeared from {str(directory)!r}")
        paths.append(p)
        recs.append(rec)
    return paths, recs, int(m["vocab_size"])


def verify_prepared(directory) -> None:
    """Full check: every shard's sha256 against the manifest (reads every byte; open_tokens checks less)."""
    paths, recs, _ = check_manifest(directory)
    for p, rec in zip(paths, recs):
        if _file_sha256(p) != rec.get("sha256"):
            raise ValueError(f"shard {str(p)!r} changed since the manifest was written (sha256 differs)")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# -- the driver ----------------------------------------------------------------------------------------
def prepare(source, out_dir, config: PrepareConfig | None = None, **overrides) -> dict:
    """Tokenize ``source`` into memory-mapped Arrow shards in ``out_dir``; returns the manifest.

    source: a file, directory, glob or list of Parquet/JSONL/text files, or a ``datasets.Dataset``.
    ``overrides`` set :class:`PrepareConfig` fields (``prepare(src, out, tokenizer="t.json")``).
    Rerunning with the same arguments resumes: shards already written are skipped.
    """
    from ..progress import progress

    import lengen_fast
    config = dataclasses.replace(config or PrepareConfig(), **overrides)
    _check_config(config)
    c = config
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    dataset = source if _is_dataset(source) else None
    if dataset is not None and type(dataset).__name__ == "IterableDataset":
        raise TypeError("prepare: an IterableDataset has no row count to plan shards with; materialise it "
                        "(datasets.Dataset.from_generator) or pass its files")
    target = int(c.shard_mb * 1e6)
    files = None
    if dataset is None:  # never read our own output back as input (out_dir inside an input directory)
        files = [f for f in input_files(source) if out.resolve() not in f.resolve().parents]
        if not files:
            raise ValueError(f"prepare: no input files outside out_dir {str(out)!r}")
    pieces = (_dataset_pieces(dataset, c.text_column, target) if dataset is not None
              else _pieces(files, c.text_column, target))
    tasks = _tasks(pieces, target)
    src_fp = source_fingerprint(files, dataset)
    out.mkdir(parents=True, exist_ok=True)
    old = None
    if (out / MANIFEST_NAME).exists():
        old = read_manifest(out)
    # the tokenizer: given, reused (trained earlier on the same source), or trained now
    if c.train_tokenizer is not None:
        tok_source = f"trained: byte-level BPE, vocab {c.train_tokenizer}"
        reuse = (old is not None and old["tokenizer"].get("source") == tok_source
                 and old.get("source", {}).get("fingerprint") == src_fp["fingerprint"]
                 and (out / TOKENIZER_NAME).is_file())
        if reuse:
            tok = load_tokenizer(out / TOKENIZER_NAME)
        else:
            tok = train_bpe(iter_texts(tasks, c.text_column), c.train_tokenizer)
    else:
        tok_source = str(Path(c.tokenizer).resolve()) if isinstance(c.tokenizer, (str, os.PathLike)) else "object"
        tok = load_tokenizer(c.tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab, c.dtype)
    tok_fp = tokenizer_fingerprint(tok, c.add_special_tokens)
    plan_desc = {"source": src_fp["fingerprint"], "tokenizer": tok_fp, "column": c.text_column, "dtype": dtype,
                 "tasks": tasks}
    plan = hashlib.sha256(json.dumps(plan_desc, sort_keys=True).encode()).hexdigest()[:32]
    if old is not None and not c.overwrite:
        if old["tokenizer"].get("fingerprint") != tok_fp:
            raise ValueError(f"{str(out / MANIFEST_NAME)!r} was written with a different tokenizer "
                             f"({old['tokenizer'].get('source')!r}) than the one requested ({tok_source!r}); "
                             "use a new out_dir, or overwrite=True (--overwrite) to replace it")
        if old.get("source", {}).get("fingerprint") != src_fp["fingerprint"]:
            raise ValueError(f"{str(out / MANIFEST_NAME)!r} was prepared from other inputs (or the inputs changed "
                             "since); use a new out_dir, or overwrite=True (--overwrite) to replace it")
        if old.get("complete") and old.get("plan") == plan:
            return old
    if old is not None and c.overwrite:
        for f in out.glob("shard-*.arrow"):
            f.unlink()
    for f in out.glob(".*.tmp-*"):  # leftovers of an interrupted run
        f.unlink()
    tok.save(str(out / TOKENIZER_NAME))
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "complete": False, "plan": plan,
        "created_by": f"lengen_fast {lengen_fast.__version__}", "column": COLUMN, "dtype": dtype,
        "vocab_size": vocab,
        "tokenizer": {"fingerprint": tok_fp, "source": tok_source, "file": TOKENIZER_NAME, "vocab_size": vocab,
                      "add_special_tokens": c.add_special_tokens},
        "source": {**src_fp, "text_column": c.text_column, "num_tasks": len(tasks)},
        "shard_mb": c.shard_mb, "shards": [], "totals": {},
    }
    _write_json(out / MANIFEST_NAME, manifest)
    # resume: shards written by this same plan are kept
    records: dict[int, dict] = {}
    todo = []
    for i, task in enumerate(tasks):
        p = out / shard_name(i)
        if p.exists() and _finished_shard(p, plan, i):
            records[i] = {**_shard_record(p), "index": i}
        else:
            todo.append(i)
    for p in out.glob("shard-*.arrow"):  # shards of another plan (e.g. more tasks before)
        if not p.name[6:11].isdigit() or int(p.name[6:11]) >= len(tasks):
            p.unlink()
    workers = c.workers or os.cpu_count() or 1
    args = [(i, tasks[i], c.text_column, dtype, c.add_special_tokens, str(out), plan) for i in todo]
    est = {i: sum(p[4] for p in tasks[i]) for i in range(len(tasks))}
    # a terminal: a tqdm bar; a log: a plain line every 10 s (lengen_fast.progress); in bytes of text
    bar = progress(total=sum(est.values()), initial=sum(est[i] for i in records), desc="prepare",
                   enabled=c.progress, unit="B")
    try:
        if workers == 1 or len(todo) <= 1:
            _init_worker(tok.to_str(), dataset, pool_process=False)
            results = map(_run_task, args)
            pool = None
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(tok.to_str(), dataset))
            results = pool.imap_unordered(_run_task, args)
        try:
            for rec in results:
                records[rec["index"]] = rec
                bar.update(est[rec["index"]])
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    finally:
        bar.close()
    shards = [{k: v for k, v in records[i].items() if k != "index"} for i in range(len(tasks))]
    manifest["shards"] = shards
    manifest["totals"] = {"docs": sum(s["docs"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                          "text_bytes": sum(s["text_bytes"] for s in shards), "shards": len(shards)}
    manifest["complete"] = True
    _write_json(out / MANIFEST_NAME, manifest)
    return manifest


# -- command line ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PrepareConfig()
    p.add_argument("inputs", nargs="+", help="Parquet/JSONL/text files, directories or globs")
    p.add_argument("--out", "-o", required=True, help="output directory (shards + manifest.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokenizer", help="a local tokenizer.json, or a directory for AutoTokenizer (no download)")
    g.add_argument("--train-tokenizer", type=int, metavar="V", help="train a byte-level BPE of V tokens")
    p.add_argument("--text-column", default=d.text_column)
    p.add_argument("--add-special-tokens", action="store_true", help="apply the tokenizer's BOS/EOS template")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES)
    p.add_argument("--shard-mb", type=float, default=d.shard_mb, help="text MB per shard")
    p.add_argument("--workers", type=int, default=d.workers, help="processes (0: every core)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a directory prepared from other inputs")


def run(args) -> int:
    cfg = PrepareConfig(tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer, text_column=args.text_column,
                        add_special_tokens=args.add_special_tokens, dtype=args.dtype, shard_mb=args.shard_mb,
                        workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite)
    src = args.inputs if len(args.inputs) > 1 else args.inputs[0]
    m = prepare(src, args.out, cfg)
    t = m["totals"]
    print(f"{args.out}: {t['shards']} shards, {t['docs']:,} documents, {t['tokens']:,} {m['dtype']} tokens "
          f"from {t['text_bytes'] / 1e6:,.1f} MB of text (vocab {m['vocab_size']:,})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lengen_fast.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
