"""Which real, offline text does ``lengen-train lm`` train on by default, and how is it split?

The Python standard library, cut into definitions so that the length distribution looks like web text (median
~200 bytes, mean ~560, a long tail) rather than like whole source files (median ~8 kB): every module docstring,
every ``def`` (with its decorators), every class header (the class line, its docstring and attributes up to its
first nested definition) with each of its methods and nested classes cut the same way, and every run of other
statements (imports, assignments) becomes one document. Cutting classes into methods matters: with whole classes
74% of the tokens sat in documents of >= 2048 tokens (web text has far fewer there); cut this way 41% do, and
after decomposition at L=2048 the tokens spread over every bucket (6/10/14/17/16/38% in 64..2048).

Tokens are bytes (0..255) and every document ends with an end-of-document token ``EOD = 256`` (vocabulary 257),
so concat-and-chunk arms see where one document stops and the next begins, as with an EOS separator.

Held-out documents are those of whole files chosen by a hash of the file's path, so no definition of a held-out
module (nor a near copy from the same file) is ever trained on. The held-out files are also kept whole (plus EOD)
as ``long_heldout``: long documents (up to ~100 kB) to measure loss by position at 1-8x the training context,
which no single definition reaches.
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
    """train / heldout: Arrow tables with an ``input_ids`` list<uint16> column (one row per document);
    long_heldout: the held-out files whole, for loss by position (None: use ``heldout``)."""
    train: pa.Table
    heldout: pa.Table
    vocab_size: int
    name: str
    eod: int | None = EOD
    long_heldout: pa.Table | None = None


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
    docs: list[bytes] = []

    def first_line(node) -> int:  # 0-based, decorators included
        return min([node.lineno - 1] + [d.lineno - 1 for d in getattr(node, "decorator_list", [])])

    def walk(body: list, top: bool) -> None:
        run = None  # [first line, end line) of consecutive plain statements

        def flush():
            nonlocal run
            if run is not None:
                docs.append(src[off[run[0]]:off[run[1]]])
                run = None

        for i, node in enumerate(body):
            first, last = first_line(node), node.end_lineno
            is_doc = top and i == 0 and isinstance(node, ast.Expr) and \
                isinstance(getattr(node, "value", None), ast.Constant) and isinstance(node.value.value, str)
            inner = [j for j, n in enumerate(getattr(node, "body", []))
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))] \
                if isinstance(node, ast.ClassDef) else []
            if inner:                                   # a class: its header, then its definitions
                flush()
                docs.append(src[off[first]:off[first_line(node.body[inner[0]])]])
                walk(node.body[inner[0]:], False)
            elif is_doc or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                flush()
                docs.append(src[off[first]:off[last]])
            else:
                run = [first, last] if run is None else [run[0], last]
        flush()

    walk(tree.body, True)
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
    train, held, whole = [], [], []
    for f in stdlib_files(limit):
        rel = str(f.relative_to(root))
        src = f.read_bytes()
        units = split_units(src)
        if _heldout_file(rel, heldout_frac):
            held.extend(units)
            if units:  # parses: the same files the held-out definitions come from
                whole.append(src)
        else:
            train.extend(units)
    if not train or not held:
        raise ValueError(f"the embedded corpus split left no {'training' if not train else 'held-out'} documents "
                         f"(files={limit or 'all'}, heldout_frac={heldout_frac}); use more files")
    return LMCorpus(_table(train), _table(held), VOCAB, f"python-stdlib-defs ({root.name})", long_heldout=_table(whole))
