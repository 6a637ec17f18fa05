"""Corpus preparation: how does a text corpus become memory-mapped token shards for the loader?

    prepare("corpus/*.parquet", "tokens/", tokenizer="tokenizer.json")   # or PrepareConfig(...)
    src = open_tokens("tokens/")                                         # all shards, zero-copy

What is read (inputs.py): the text column of Parquet, JSONL or plain-text files, or a HF ``datasets.Dataset``;
one input row is one document. The tokenizer (tokenizer.py): a local ``tokenizer.json``, a directory for
``AutoTokenizer`` (nothing is downloaded), or ``train_tokenizer=V`` (rustbpe, saved as a HF tokenizer.json). It
runs on tiktoken when that gives HF's ids, else on HF ``tokenizers`` (the manifest's ``tokenizer.engine``).
What is written and how it survives a crash (shards.py): shards, tokenizer.json, manifest.json.

How it runs: the input is cut into tasks of about ``shard_mb`` MB of text; each task becomes one shard. Tasks run
in a process pool over the cores; each process holds one task's text at a time, never the corpus. One run per
output directory (a lock). A rerun of the same command resumes: shards of the same plan are kept, and the result
is byte for byte the one an uninterrupted run writes (deterministic), manifest included.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fsio import atomic_write_text
from . import inputs
from .files import MANIFEST_NAME
from .inputs import (INPUT_SUFFIXES, dataset_pieces, group_tasks, input_files, is_dataset, iter_texts,  # noqa: F401
                     plan_pieces, read_texts, sample_texts, source_fingerprint)
from .shards import (COLUMN, FORMAT, FORMAT_VERSION, DirLock, LockHeld, check_manifest, finished_shard,  # noqa: F401
                     read_manifest, remove_leftovers, shard_name, shard_record, verify_prepared, write_manifest,
                     write_shard)
from .tokenizer import (ENGINES, TOKENIZER_NAME, choose_encoder, load_tokenizer, token_dtype,  # noqa: F401
                        tokenizer_fingerprint, train_bpe)

DTYPES = ("auto", "uint16", "uint32")
HOOK_ENV = "LENGEN_PREPARE_HOOK"  # tests: "kill@POINT[:K]" or "pause@POINT[:K]" (see _hook)
log = logging.getLogger("lengen_fast.data.prepare")


@dataclass
class PrepareConfig:
    tokenizer: str | None = None          # tokenizer.json, or a directory for AutoTokenizer (local only)
    train_tokenizer: int | None = None    # instead: train a byte-level BPE of this vocabulary size (rustbpe)
    text_column: str = "text"             # Parquet/JSONL/Dataset column holding the text
    add_special_tokens: bool = False      # apply the tokenizer's template (BOS/EOS) to every document
    dtype: str = "auto"                   # token type: auto (uint16 when the vocabulary fits) | uint16 | uint32
    shard_mb: float = 64.0                # text MB per task, i.e. per output shard
    workers: int = 0                      # processes; 0: every core
    engine: str = "auto"                  # auto: tiktoken when it gives HF's ids, else HF | tiktoken (or fail) | hf
    verify_mb: float = 1.0                # at most this many MB (1% of the corpus, >= 64 kB) on which tiktoken's
                                          # ids are compared with HF's before it runs; 0: the probe strings only
    progress: bool = True                 # a tqdm bar on a terminal, plain lines (every 10 s) in a log
    overwrite: bool = False               # replace an output directory prepared from other inputs/tokenizer


class WorkerDied(RuntimeError):
    """A worker process died without an exception (killed: out of memory, a signal)."""


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
    if c.engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {c.engine!r}")
    if not isinstance(c.verify_mb, (int, float)) or isinstance(c.verify_mb, bool) or not 0 <= c.verify_mb < 1e6:
        raise ValueError(f"verify_mb must be a number of MB >= 0, got {c.verify_mb!r}")


def _hook(point: str, k: int | None = None) -> None:
    """Crash tests: ``$LENGEN_PREPARE_HOOK=kill@shard:2`` SIGKILLs the run after its 2nd finished shard,
    ``pause@manifest`` prints a line and sleeps, ``killself@write:1`` kills only the worker writing shard 1.
    Points: locked, manifest, tokenizer, shard:K (K shards done in this run), write:I (shard I half written in its
    temporary file; ``kill`` there kills the parent first), finish, done."""
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return
    action, _, where = spec.partition("@")
    p, _, n = where.partition(":")
    if p != point or (n and k != int(n)):
        return
    if action == "pause":
        print(f"[hook] paused at {where} pid {os.getpid()}", flush=True)
        time.sleep(600)
    elif action in ("kill", "killself"):  # killself: only this process (a worker dies, its parent lives)
        parent = _WORKER.get("pool_parent")  # set in pool workers only
        if action == "kill" and parent and parent != os.getpid():
            os.kill(parent, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


# -- the workers ---------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _die_with_parent(parent: int) -> None:
    """A worker whose parent was killed stops too (Linux): no orphan keeps writing into the directory."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)


def _on_term(signum, frame) -> None:
    """A worker stopped by its parent (another task failed): remove its temporary file, then exit."""
    out = _WORKER.get("out")
    if out:
        for p in Path(out).glob(f".tmp-*.{os.getpid()}"):
            p.unlink(missing_ok=True)
    os._exit(1)


def _init_worker(spec, dataset, parent: int, pool_process: bool = True) -> None:
    if pool_process:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
        _die_with_parent(parent)
        signal.signal(signal.SIGTERM, _on_term)
        _WORKER["pool_parent"] = parent
    _WORKER["enc"] = spec.make()
    inputs.set_dataset(dataset)


def _run_task(args) -> dict:
    """One task -> one shard: read its pieces, encode, write atomically; returns the shard's record."""
    index, task, column, dtype, out_dir, plan = args
    _WORKER["out"] = out_dir
    enc = _WORKER["enc"]
    np_dtype = np.dtype(dtype)
    lengths, values, text_bytes = [], [], 0
    for piece in task:
        for texts, nbytes in read_texts(piece, column):
            n, v = enc.encode(texts, np_dtype, nbytes)
            lengths.append(n)
            values.append(v)
            text_bytes += nbytes
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    hook = _hook if os.environ.get(HOOK_ENV) else None
    return write_shard(out_dir, index, cat(lengths, np.int64), cat(values, np_dtype), plan, text_bytes, hook)


def _run_all(todo_args: list, workers: int, spec, dataset, on_done) -> None:
    """Every task through ``_run_task``; ``on_done(record)`` per finished shard. In-process for one worker."""
    if workers == 1 or len(todo_args) <= 1:
        _init_worker(spec, dataset, os.getpid(), pool_process=False)
        for a in todo_args:
            on_done(_run_task(a))
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ex = ProcessPoolExecutor(min(workers, len(todo_args)), mp_context=ctx, initializer=_init_worker,
                             initargs=(spec, dataset, os.getpid()))
    ok = False
    try:
        pending = {ex.submit(_run_task, a): a[0] for a in todo_args}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                index = pending.pop(f)
                try:
                    rec = f.result()
                except BrokenProcessPool:
                    raise WorkerDied(f"prepare: a worker process died while writing {shard_name(index)} or another "
                                     "shard (killed: out of memory, or a signal); the finished shards are kept: "
                                     "rerun the same command to resume") from None
                on_done(rec)
        ok = True
    finally:
        # on an error, stop at once: running tasks would only finish shards nobody waits for (SIGTERM: _on_term)
        for p in list(getattr(ex, "_processes", {}).values()) if not ok else ():
            if p.is_alive():
                p.terminate()
        ex.shutdown(wait=True, cancel_futures=True)


# -- the driver -------------------------------------------------------------------------------------------------
def _tokenizer(c: PrepareConfig, out: Path, old: dict | None, src_fp: dict, tasks: list):
    """(tokenizer, its source label): given, reused (trained earlier on the same source), or trained now."""
    if c.train_tokenizer is None:
        label = str(Path(c.tokenizer).resolve()) if isinstance(c.tokenizer, (str, os.PathLike)) else "object"
        return load_tokenizer(c.tokenizer), label
    label = f"trained: byte-level BPE (rustbpe), vocab {c.train_tokenizer}"
    saved = out / TOKENIZER_NAME
    if (old is not None and old["tokenizer"].get("source") == label and saved.is_file()
            and old.get("source", {}).get("fingerprint") == src_fp["fingerprint"]):
        tok = load_tokenizer(saved)
        if tokenizer_fingerprint(tok, c.add_special_tokens) == old["tokenizer"].get("fingerprint"):
            return tok, label  # the run being resumed trained it: training again would give the same
    log.info("training a %d-token byte-level BPE (rustbpe) on the corpus", c.train_tokenizer)
    return train_bpe(iter_texts(tasks, c.text_column), c.train_tokenizer), label


def prepare(source, out_dir, config: PrepareConfig | None = None, **overrides) -> dict:
    """Tokenize ``source`` into memory-mapped Arrow shards in ``out_dir``; returns the manifest.

    source: a file, directory, glob or list of Parquet/JSONL/text files, or a ``datasets.Dataset``.
    ``overrides`` set :class:`PrepareConfig` fields (``prepare(src, out, tokenizer="t.json")``).
    Rerunning with the same arguments resumes: shards already written are kept.
    """
    from ..progress import progress

    import lengen_fast
    c = dataclasses.replace(config or PrepareConfig(), **overrides)
    _check_config(c)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    dataset = source if is_dataset(source) else None
    if dataset is not None and type(dataset).__name__ == "IterableDataset":
        raise TypeError("prepare: an IterableDataset has no row count to plan shards with; materialise it "
                        "(datasets.Dataset.from_generator) or pass its files")
    target = int(c.shard_mb * 1e6)
    files, skipped = None, []
    if dataset is None:  # never read our own output back as input (out_dir inside an input directory)
        files = [f for f in input_files(source) if out.resolve() not in f.resolve().parents]
        if not files:
            raise ValueError(f"prepare: no input files outside out_dir {str(out)!r}")
        pieces, skipped = plan_pieces(files, c.text_column, target)
        if not pieces:
            raise ValueError(f"prepare: every input file is empty (0 bytes): {skipped[:3]}"
                             f"{' ...' if len(skipped) > 3 else ''}; nothing to tokenize")
        for f in skipped:
            log.warning("skipping the empty (0-byte) input file %r", f)
    else:
        pieces = dataset_pieces(dataset, c.text_column, target)
    tasks = group_tasks(pieces, target)
    src_fp = source_fingerprint(files, dataset)
    inputs.set_dataset(dataset)
    out.mkdir(parents=True, exist_ok=True)
    with DirLock(out):
        _hook("locked")
        old = None
        if (out / MANIFEST_NAME).exists():
            try:
                old = read_manifest(out)
            except ValueError:
                if not c.overwrite:
                    raise
        tok, tok_source = _tokenizer(c, out, old, src_fp, tasks)
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
                raise ValueError(f"{str(out / MANIFEST_NAME)!r} was prepared from other inputs (or the inputs "
                                 "changed since); use a new out_dir, or overwrite=True (--overwrite) to replace it")
            if old.get("complete") and old.get("plan") == plan:
                log.info("%s is already complete (%d shards)", out, len(old["shards"]))
                return old
        # the sample: 1% of the corpus, at least 64 kB, at most verify_mb (HF encodes it too: keep it small)
        total = sum(p[4] for p in pieces)
        sample = sample_texts(tasks, c.text_column, int(min(c.verify_mb * 1e6, max(64e3, total / 100))))
        spec = choose_encoder(tok, c.add_special_tokens, sample, c.engine)
        log.info("tokenizer engine: %s", spec.note)
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "complete": False, "plan": plan,
            "created_by": f"lengen_fast {lengen_fast.__version__}", "column": COLUMN, "dtype": dtype,
            "vocab_size": vocab,
            "tokenizer": {"fingerprint": tok_fp, "source": tok_source, "file": TOKENIZER_NAME, "vocab_size": vocab,
                          "add_special_tokens": c.add_special_tokens, "engine": spec.engine, "engine_note": spec.note},
            "source": {**src_fp, "text_column": c.text_column, "num_tasks": len(tasks), "skipped_empty": skipped},
            "shard_mb": c.shard_mb, "shards": [], "totals": {},
        }
        # order: the unfinished manifest first, so that from here on every reader refuses the directory
        write_manifest(out, manifest)
        _hook("manifest")
        atomic_write_text(out / TOKENIZER_NAME, tok.to_str(pretty=True))
        _hook("tokenizer")
        remove_leftovers(out)
        records: dict[int, dict] = {}
        todo = []
        for i in range(len(tasks)):  # resume: shards written by this same plan are kept
            p = out / shard_name(i)
            if p.exists() and finished_shard(p, plan, i):
                records[i] = {**shard_record(p), "index": i}
            else:
                todo.append(i)
        for p in out.glob("shard-*.arrow"):  # shards of another plan (e.g. more tasks before)
            if not p.name[6:11].isdigit() or int(p.name[6:11]) >= len(tasks):
                p.unlink()
        if records:
            log.info("resuming: %d of %d shards are already written", len(records), len(tasks))
        est = {i: sum(p[4] for p in tasks[i]) for i in range(len(tasks))}
        # a terminal: a tqdm bar; a log: a plain line every 10 s (lengen_fast.progress); in bytes of text
        bar = progress(total=sum(est.values()), initial=sum(est[i] for i in records), desc="prepare",
                       enabled=c.progress, unit="B")
        done_here = [0]

        def on_done(rec):
            records[rec["index"]] = rec
            bar.update(est[rec["index"]])
            done_here[0] += 1
            _hook("shard", done_here[0])

        try:
            _run_all([(i, tasks[i], c.text_column, dtype, str(out), plan) for i in todo],
                     c.workers or os.cpu_count() or 1, spec, dataset, on_done)
        finally:
            bar.close()
        _hook("finish")
        shards = [{k: v for k, v in records[i].items() if k != "index"} for i in range(len(tasks))]
        manifest["shards"] = shards
        manifest["totals"] = {"docs": sum(s["docs"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                              "text_bytes": sum(s["text_bytes"] for s in shards), "shards": len(shards)}
        manifest["complete"] = True
        write_manifest(out, manifest)
        _hook("done")
    return manifest


# -- command line ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PrepareConfig()
    p.add_argument("inputs", nargs="+", help="Parquet/JSONL/text files, directories or globs")
    p.add_argument("--out", "-o", required=True, help="output directory (shards + manifest.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokenizer", help="a local tokenizer.json, or a directory for AutoTokenizer (no download)")
    g.add_argument("--train-tokenizer", type=int, metavar="V", help="train a byte-level BPE of V tokens (rustbpe)")
    p.add_argument("--text-column", default=d.text_column)
    p.add_argument("--add-special-tokens", action="store_true", help="apply the tokenizer's BOS/EOS template")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES)
    p.add_argument("--shard-mb", type=float, default=d.shard_mb, help="text MB per shard")
    p.add_argument("--workers", type=int, default=d.workers, help="processes (0: every core)")
    p.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="auto: tiktoken when its ids equal HF's (checked), else HF; tiktoken: fail if not exact")
    p.add_argument("--verify-mb", type=float, default=d.verify_mb,
                   help="at most this many MB of the corpus (1%%, at least 64 kB) on which tiktoken's ids are "
                        "compared with HF's before it runs (0: only built-in probe strings)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a directory prepared from other inputs")


class _Stderr(logging.Handler):
    """``[prepare] message`` on whatever sys.stderr is at the time (a test's capture, a redirected log)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"[prepare] {record.getMessage()}", file=sys.stderr, flush=True)


def run(args) -> int:
    cfg = PrepareConfig(tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer, text_column=args.text_column,
                        add_special_tokens=args.add_special_tokens, dtype=args.dtype, shard_mb=args.shard_mb,
                        workers=args.workers, engine=args.engine, verify_mb=args.verify_mb,
                        progress=not args.no_progress, overwrite=args.overwrite)
    if not any(isinstance(h, _Stderr) for h in log.handlers):  # the engine, resumption, a taken-over lock
        log.addHandler(_Stderr())
        log.setLevel(logging.INFO)
    src = args.inputs if len(args.inputs) > 1 else args.inputs[0]
    m = prepare(src, args.out, cfg)
    t = m["totals"]
    print(f"{args.out}: {t['shards']} shards, {t['docs']:,} documents, {t['tokens']:,} {m['dtype']} tokens "
          f"from {t['text_bytes'] / 1e6:,.1f} MB of text (vocab {m['vocab_size']:,}, engine "
          f"{m['tokenizer']['engine']})")
    return 0


ERRORS = (ValueError, TypeError, OSError, ImportError, WorkerDied)  # what the command line reports as "error: ..." (exit 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lengen_fast.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
