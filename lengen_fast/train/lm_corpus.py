"""Which real, offline text does ``lengen-train lm`` train on by default, and how is it split?

The Python standard library, cut into top-level units so that the length distribution looks like
web text (median of a few hundred bytes, long tail) rather than like whole source files (median
~8 kB): every module docstring, every top-level ``def`` / ``class`` (with its decorators), and every
run of other top-level statements (imports, assignments) becomes one document. Tokens are bytes
(0..255) and every document ends with an end-of-document token ``EOD = 256`` (vocabulary 257), so
concat-and-chunk arms see where one document stops and the next begins, as with an EOS separator.

Held-out documents are those of whole files chosen by a hash of the file's path, so no definition
of a held-out module (nor a near copy from the same file) is ever trained on.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..data.corpus import stdlib_files

EOD = 256
VOCAB = 257


@dataclass
class LMCorpus:
    """train / heldout: Arrow tables with an ``input_ids`` list<uint16> column (one row per document)."""
    train: pa.Table
    heldout: pa.Table
    vocab_size: int
    name: str
    eod: int | None = EOD


def split_units(src: bytes) -> list[bytes]:
    """One module's source -> its documents (see module doc); [] when it does not parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            return []
    lines = src.splitlines(keepends=True)
    off = np.zeros(len(lines) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lines], out=off[1:])
    docs, run = [], None  # run: [first line, last line] of consecutive plain statements

    def flush():
        nonlocal run
        if run is not None:
            docs.append(src[off[run[0]]:off[run[1]]])
            run = None

    for i, node in enumerate(tree.body):
        first = node.lineno - 1
        for d in getattr(node, "decorator_list", []):
            first = min(first, d.lineno - 1)
        last = node.end_lineno
        is_doc = i == 0 and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
            and isinstance(node.value.value, str)
        if is_doc or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            flush()
            docs.append(src[off[first]:off[last]])
        else:
            run = [first, last] if run is None else [run[0], last]
    flush()
    return [d for d in docs if d.strip()]


def _heldout_file(rel: str, frac: float) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little")
    return h / 2 ** 64 < frac


def _table(docs: list[bytes]) -> pa.Table:
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) + 1 for d in docs], out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.uint16)
    for d, a in zip(docs, offsets[:-1]):
        values[a:a + len(d)] = np.frombuffer(d, dtype=np.uint8)
        values[a + len(d)] = EOD
    return pa.table({"input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))})


@functools.lru_cache(maxsize=4)
def stdlib_corpus(heldout_frac: float = 0.05, limit: int | None = None) -> LMCorpus:
    """The embedded corpus (deterministic for a given Python build). ``limit``: first files only (tests)."""
    if not 0 < heldout_frac < 1:
        raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for f in stdlib_files(limit):
        rel = str(f.relative_to(root))
        (held if _heldout_file(rel, heldout_frac) else train).extend(split_units(f.read_bytes()))
    if not train or not held:
        raise ValueError(f"the embedded corpus split left no {'training' if not train else 'held-out'} documents "
                         f"(files={limit or 'all'}, heldout_frac={heldout_frac}); use more files")
    return LMCorpus(_table(train), _table(held), VOCAB, f"python-stdlib-units ({root.name})")
