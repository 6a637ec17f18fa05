"""How does a prepared directory stay readable whatever happens to the run that writes it?

    out/shard-00000.arrow ...   Arrow IPC files, column ``input_ids`` list<uint16|uint32>
    out/tokenizer.json          the tokenizer of record
    out/manifest.json           ``complete``, the plan hash, tokenizer and source fingerprints, per-shard records
    out/.lengen-prepare.lock    while a run holds the directory (its pid); removed at the end

Every file is written by :mod:`lengen_fast.fsio` (a temporary name in the same directory, fsync, rename), so a
file under its final name is whole; a full disk is an OSError naming the file and leaves no partial file under
that name. Each shard carries the plan hash and its index in its schema metadata, so a rerun keeps exactly the
shards of the same plan. The manifest says ``complete`` only after every shard is written; until then
:func:`check_manifest` (and so ``open_tokens``) refuses the directory and names the shards still missing.
One run at a time: :class:`DirLock` (a POSIX lock, dropped by the kernel when its process dies).
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..fsio import atomic_write, atomic_write_text
from .files import MANIFEST_NAME, checked_offsets, lengths_hash

FORMAT = "lengen-tokens"
FORMAT_VERSION = 1
COLUMN = "input_ids"
LOCK_NAME = ".lengen-prepare.lock"
_BATCH_ROWS = 65536  # documents per IPC record batch
log = logging.getLogger("lengen_fast.data.prepare")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.arrow"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:32]


def shard_record(path: Path, text_bytes: int | None = None) -> dict:
    """Counts and hashes of a written shard, read back through its memory map (offsets only)."""
    with pa.memory_map(str(path), "r") as mm:
        table = pa.ipc.open_file(mm).read_all()
        chunks = table.column(COLUMN).chunks
        lengths = (np.concatenate([np.diff(checked_offsets(c, str(path))) for c in chunks]) if chunks
                   else np.zeros(0, np.int64))
        meta = table.schema.metadata or {}
    rec = {"file": path.name, "bytes": path.stat().st_size, "docs": int(lengths.shape[0]),
           "tokens": int(lengths.sum()), "lengths_hash": lengths_hash(lengths), "sha256": file_sha256(path)}
    rec["text_bytes"] = int(text_bytes if text_bytes is not None else meta.get(b"lengen.text_bytes", b"0"))
    return rec


def write_shard(out_dir, index: int, lengths: np.ndarray, values: np.ndarray, plan: str, text_bytes: int,
                hook=None) -> dict:
    """Shard ``index`` from (n,) lengths and (sum,) token values, written atomically; returns its record.

    ``hook(point, index)`` runs after the first record batch is in the temporary file (the crash tests)."""
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    large = offsets[-1] >= (1 << 31)
    cls, off_t = (pa.LargeListArray, np.int64) if large else (pa.ListArray, np.int32)
    arr = cls.from_arrays(pa.array(offsets.astype(off_t)), pa.array(values))
    schema = pa.schema([pa.field(COLUMN, arr.type)],
                       metadata={"lengen.plan": plan, "lengen.shard": str(index), "lengen.text_bytes": str(text_bytes)})
    table = pa.Table.from_arrays([arr], schema=schema)
    final = Path(out_dir) / shard_name(index)

    def write(f):
        with pa.ipc.new_file(f, schema) as w:
            for b in table.to_batches(max_chunksize=_BATCH_ROWS):
                w.write_batch(b)
                if hook is not None:
                    f.flush()
                    hook("write", index)

    atomic_write(final, write)
    rec = shard_record(final, text_bytes)
    rec["index"] = index
    return rec


def finished_shard(path: Path, plan: str, index: int) -> bool:
    """True when ``path`` is a complete shard written by this plan (resume)."""
    try:
        with pa.memory_map(str(path), "r") as mm:
            meta = pa.ipc.open_file(mm).schema.metadata or {}
    except (pa.ArrowException, OSError):
        return False
    return meta.get(b"lengen.plan") == plan.encode() and meta.get(b"lengen.shard") == str(index).encode()


def remove_leftovers(out: Path) -> list[Path]:
    """Temporary files of a killed run: fsio's ``.tmp-NAME.PID`` and the older ``.NAME.tmp-PID``."""
    gone = []
    for p in list(out.glob(".tmp-*")) + list(out.glob(".*.tmp-*")):
        try:
            p.unlink()
            gone.append(p)
        except OSError:
            pass
    return gone


# -- the manifest ------------------------------------------------------------------------------------
def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_text(Path(out) / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


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


def unfinished_shards(directory, m: dict) -> list[str]:
    """The shard files an unfinished manifest still waits for (missing, partial, or from another plan)."""
    n = (m.get("source") or {}).get("num_tasks")
    if not isinstance(n, int):
        return []
    d = Path(directory)
    return [shard_name(i) for i in range(n) if not finished_shard(d / shard_name(i), str(m.get("plan")), i)]


def check_manifest(directory, *, column: str = COLUMN, tokenizer=None) -> tuple[list[Path], list[dict], int]:
    """(shard paths, their manifest records, vocab_size) of a complete prepared directory.

    Refuses an unfinished preparation (naming the first shard it lacks), another column, a tokenizer other than
    ``tokenizer`` (when given), and a shard that has disappeared (open_tokens then checks sizes, counts, lengths).
    """
    from .tokenizer import load_tokenizer, tokenizer_fingerprint
    directory = Path(directory)
    m = read_manifest(directory)
    where = str(directory / MANIFEST_NAME)
    if not m.get("complete"):
        todo = unfinished_shards(directory, m)
        what = (f"{len(todo)} of {m['source']['num_tasks']} shards are not finished (first: {todo[0]!r})" if todo
                else "every shard is written but the manifest was not finalized")
        raise ValueError(f"{where}: the preparation did not finish: {what}; rerun `lengen-data prepare` with the "
                         "same arguments to resume it")
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
        if file_sha256(p) != rec.get("sha256"):
            raise ValueError(f"shard {str(p)!r} changed since the manifest was written (sha256 differs)")


# -- one writer per directory -------------------------------------------------------------------------
class LockHeld(OSError):
    """Another live ``prepare`` holds the output directory."""


_HELD: set[str] = set()  # POSIX locks do not exclude the same process: its own holds are tracked here


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    """``with DirLock(out):`` one prepare at a time on ``out``.

    A POSIX lock (``fcntl.lockf``) on ``out/.lengen-prepare.lock``, which holds the owner's pid and host. The
    kernel drops the lock when the owner dies (SIGKILL included) and forked workers do not inherit it, so a
    lock file whose lock is free is stale: it is taken over with a warning naming the dead pid."""

    def __init__(self, directory):
        self.path = Path(directory) / LOCK_NAME
        self.fd = -1
        self.stale: dict | None = None

    def _owner(self, fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> "DirLock":
        key = str(self.path.resolve())
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if key in _HELD:
                    raise BlockingIOError(errno.EAGAIN, "held in this process")
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                o = self._owner(fd)
                os.close(fd)
                raise LockHeld(f"{str(self.path.parent)!r} is being prepared by another process (pid "
                               f"{o.get('pid', '?')} on {o.get('host', '?')}, since {o.get('started', '?')}; lock "
                               f"{str(self.path)!r}): wait for it, or stop it and rerun") from None
            try:  # the previous owner may have unlinked the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        prev = self._owner(fd)
        if prev.get("pid") is not None:
            self.stale = prev
            state = "no longer running" if (prev.get("host") == socket.gethostname() and not _pid_alive(prev["pid"])) \
                else "no longer holding it"
            log.warning("taking over the stale lock %r left by pid %s on %s (%s): an interrupted run is resumed",
                        str(self.path), prev.get("pid"), prev.get("host"), state)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        _HELD.add(key)
        return self

    def __exit__(self, *exc) -> None:
        _HELD.discard(str(self.path.resolve()))
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = -1
