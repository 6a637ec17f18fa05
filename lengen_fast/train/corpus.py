"""Which real, offline text does a corpus run train on, and which documents are held out?

One hold-out rule for every text source (:func:`heldout_mask`): a document is held out when a hash of its key
falls below ``heldout_frac``. The key of an embedded document is its stdlib file's path (so no definition of a
held-out module, nor a near copy from the same file, is ever trained on); the key of a prepared corpus's document
is its index. A held-out embedded definition that repeats a training definition byte for byte (a short
``__repr__``, a bare ``pass``) is dropped from the held-out set. The tasks workload's natural text and the corpus workload use the same rule through
:func:`load_corpus`.

The embedded corpus is the Python standard library, cut into definitions so that the length distribution looks
like web text (median ~200 bytes, mean ~560, a long tail) rather than like whole source files (median ~8 kB):
every module docstring, every ``def`` (with its decorators), every class header (the class line, its docstring and
attributes up to its first nested definition) with each of its methods and nested classes cut the same way, and
every run of other statements (imports, assignments) becomes one document. With whole classes 74% of the tokens
sat in documents of >= 2048 tokens (web text has far fewer there); cut this way 41% do, and after decomposition at
L=2048 the tokens spread over every bucket (6/10/14/17/16/38% in 64..2048).

Tokens are bytes (0..255) and every document ends with an end-of-document token ``EOD = 256`` (vocabulary 257),
so concat-and-chunk arms see where one document stops and the next begins, as with an EOS separator. The held-out
files are also kept whole (plus EOD) as ``long_heldout``: long documents (up to ~100 kB) to measure loss by
position at 1-8x the training context, which no single definition reaches.
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


def heldout_mask(keys, frac: float) -> np.ndarray:
    """THE hold-out rule: key i is held out when the first 8 bytes of sha256(key) / 2**64 < frac (deterministic,
    independent of the seed and of the other keys)."""
    if not 0 < frac < 1:
        raise ValueError(f"heldout_frac must be in (0, 1), got {frac}")
    h = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:8], "little") for k in keys]
    return np.asarray([x / 2 ** 64 < frac for x in h], dtype=bool)


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
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(limit)
    held_mask = heldout_mask([str(f.relative_to(root)) for f in files], heldout_frac)
    train, held, whole = [], [], []
    for f, is_held in zip(files, held_mask):
        src = f.read_bytes()
        units = split_units(src)
        if is_held:
            held.extend(units)
            if units:  # parses: the same files the held-out definitions come from
                whole.append(src)
        else:
            train.extend(units)
    seen = set(train)     # a definition repeated verbatim in a training file is not held out (e.g. `pass` bodies)
    held = [u for u in held if u not in seen]
    if not train or not held:
        raise ValueError(f"the embedded corpus split left no {'training' if not train else 'held-out'} documents "
                         f"(files={limit or 'all'}, heldout_frac={heldout_frac}); use more files")
    return LMCorpus(_table(train), _table(held), VOCAB, f"python-stdlib-defs ({root.name})", long_heldout=_table(whole))


# ------------------------------------------------------------------------------------------ loading
@dataclass
class Corpus:
    """Training documents (a TokenSource), held-out documents (token arrays) and, for the embedded corpus, the
    held-out files whole (long documents for loss by position; None: use ``heldout``)."""
    train: object
    heldout: list[np.ndarray]
    vocab_size: int
    name: str
    long_heldout: list[np.ndarray] | None = None


def load_corpus(source: str = "", *, column: str = "input_ids", heldout_frac: float = 0.05, files: int = 0,
                vocab_size: int = 0) -> Corpus:
    """``source`` "" = the embedded stdlib definitions (``files``: first N stdlib files, 0 = all); else anything
    ``open_tokens`` opens (a lengen-data prepare directory, a Parquet/Arrow file, a glob). Held out by
    :func:`heldout_mask` (embedded: file paths; prepared: document indices)."""
    from ..data import open_tokens
    if not source:
        c = stdlib_corpus(heldout_frac, files or None)
        src = open_tokens(c.train, vocab_size=c.vocab_size)
        held_src, long_src = open_tokens(c.heldout), open_tokens(c.long_heldout)
        return Corpus(src, [held_src.tokens(i) for i in range(len(held_src))], c.vocab_size, c.name,
                      [long_src.tokens(i) for i in range(len(long_src))])
    try:
        src = open_tokens(source, column=column)
    except FileNotFoundError as e:
        raise ValueError(f"corpus {source!r}: {e}") from None
    if len(src) < 2:
        raise ValueError(f"corpus {source!r} has {len(src)} documents; need training and held-out ones")
    vocab = vocab_size or src.vocab_size
    if not vocab:
        vocab = 1 + max(int(src.tokens(i).max()) for i in range(len(src)) if src.lengths[i])
    held = heldout_mask(range(len(src)), heldout_frac)
    if held.all() or not held.any():
        raise ValueError(f"corpus {source!r}: heldout_frac={heldout_frac} leaves no "
                         f"{'training' if held.all() else 'held-out'} documents among {len(src)}")
    tr_idx, ho_idx = np.flatnonzero(~held), np.flatnonzero(held)
    return Corpus(src.select(tr_idx), [src.tokens(int(i)) for i in ho_idx], int(vocab), str(source))


def training_subset(src, tokens: int, seed: int, min_doc_len: int = 0):
    """A seed-chosen random subset of documents holding about ``tokens`` tokens (>= min_doc_len each),
    so that one epoch is the budget and a curriculum runs its whole course once."""
    rng = np.random.default_rng([seed, 7919])
    cand = np.flatnonzero(src.lengths >= max(1, min_doc_len))
    if cand.size == 0:
        raise ValueError(f"no training document has >= {min_doc_len} tokens")
    order = rng.permutation(cand)
    cum = np.cumsum(src.lengths[order])
    k = int(np.searchsorted(cum, tokens)) + 1
    if k > order.size:
        warnings.warn(f"the training documents hold {int(cum[-1])} tokens, fewer than the {tokens} asked for: "
                      "arms will see them more than once (epochs > 1 in the report)", stacklevel=2)
    return src.select(np.sort(order[:k]))


def corpus_stats(corpus: Corpus, val_docs: list, pos_docs: list) -> dict:
    lens = corpus.train.lengths
    hl = np.array([len(d) for d in corpus.heldout])
    q = (lambda a: {p: int(np.percentile(a, p)) for p in (25, 50, 75, 90, 99)} if len(a) else {})
    return {"name": corpus.name, "vocab_size": corpus.vocab_size, "train_docs": int(len(lens)),
            "train_tokens": int(lens.sum()), "train_length_percentiles": q(lens),
            "heldout_docs": int(len(hl)), "heldout_tokens": int(hl.sum()), "heldout_max_len": int(hl.max()),
            "val_docs": len(val_docs), "val_tokens": int(sum(len(d) for d in val_docs)),
            "position_source": "whole held-out files" if corpus.long_heldout else "odd held-out documents",
            "position_docs": len(pos_docs), "position_doc_lens": [len(d) for d in pos_docs]}
