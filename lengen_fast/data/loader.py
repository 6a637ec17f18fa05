"""PackedLoader: packed, document-masked batches at a constant number of tokens per step.

Strategies (``LoaderConfig.strategy``):
  vsl           dataset decomposition + a VSL curriculum: every step takes one bucket, i.e. one
                sequence length s, and tokens_per_batch // s pieces of length s
  pack          best-fit-decreasing bins of max_len tokens (several documents per row)
  concat_chunk  the fixed-length baseline: shuffled documents concatenated and cut every max_len

Every rank computes the same plan from the seed (no communication) and takes its own slice of
each global batch, so all ranks see the same bucket at each step and disjoint pieces.
"""
from __future__ import annotations

import dataclasses
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .curriculum import CURRICULA, bucket_schedule, check_curriculum
from .decompose import check_bucket_range, decompose
from .pack import Packing, concat_chunk, pack_bfd
from .source import TokenSource, open_tokens

STRATEGIES = ("vsl", "pack", "concat_chunk")
# fields that do not change which batches a rank sees (excluded from the resume check)
_RUNTIME_FIELDS = ("rank", "pin_memory", "prefetch", "backend", "infinite")


@dataclass
class LoaderConfig:
    strategy: str = "vsl"            # "vsl" | "pack" | "concat_chunk"
    tokens_per_batch: int = 65536    # global tokens per step (all ranks); each rank gets // world_size
    max_len: int = 8192              # longest bucket (vsl) or row length (pack, concat_chunk)
    min_len: int = 256               # shortest bucket (vsl); shorter remainders are dropped (and counted) ...
    remainder: bool = False          # ... unless True: then they are BFD-packed into min_len rows of that bucket
    curriculum: str = "natural"      # vsl: natural | grow_p2 | grow_linear | uniform | shrink
    num_cycles: int = 1
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    pin_memory: bool = False         # pinned host tensors (only when CUDA is available)
    prefetch: int = 2                # batches assembled ahead by a background thread (0: none)
    ignore_index: int = -100
    pad_id: int = 0
    infinite: bool = False           # iterate epoch after epoch instead of stopping at the epoch end
    backend: str | None = None       # gather backend: None (auto), "cpu" or "reference"


@dataclass
class Batch:
    """One rank's batch. N = tokens_per_batch // world_size for every step.

    input_ids, labels, position_ids: (N,) int64, real tokens first, padding after cu_seqlens[-1]
    (pad_id / ignore_index / 0). cu_seqlens: (P+1,) int32, one segment per document piece.
    row_cu_seqlens: (R+1,) int32, boundaries of the packed rows (each <= seq_len tokens).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    row_cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_len: int
    step: int          # global step (epoch * steps_per_epoch + step in epoch)
    epoch: int
    num_tokens: int    # real (non-padding) tokens
    bucket: int

    def to(self, device, non_blocking: bool = True) -> "Batch":
        mv = (lambda t: t.to(device, non_blocking=non_blocking))
        return dataclasses.replace(self, input_ids=mv(self.input_ids), labels=mv(self.labels),
                                   position_ids=mv(self.position_ids), cu_seqlens=mv(self.cu_seqlens),
                                   row_cu_seqlens=mv(self.row_cu_seqlens))


def _check_int(name, v, lo=None):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")


def validate_config(c: LoaderConfig) -> None:
    if c.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {c.strategy!r}")
    for name in ("tokens_per_batch", "max_len", "min_len", "num_cycles", "seed", "world_size", "rank", "prefetch"):
        _check_int(name, getattr(c, name), 0 if name in ("seed", "rank", "prefetch") else 1)
    if not isinstance(c.remainder, bool):
        raise TypeError(f"remainder must be a bool, got {type(c.remainder).__name__}")
    if c.remainder and c.strategy != "vsl":
        raise ValueError(f"remainder=True applies to strategy 'vsl' only (got strategy {c.strategy!r}, which "
                         "drops no tokens)")
    if c.strategy == "vsl":
        check_bucket_range(c.min_len, c.max_len)
        check_curriculum(c.curriculum, c.num_cycles)
    elif c.curriculum not in CURRICULA:
        raise ValueError(f"curriculum must be one of {CURRICULA}, got {c.curriculum!r}")
    if c.tokens_per_batch < c.max_len:
        raise ValueError(f"tokens_per_batch ({c.tokens_per_batch}) must be >= max_len ({c.max_len}): "
                         "a batch has to hold at least one full-length row")
    if c.rank >= c.world_size:
        raise ValueError(f"rank ({c.rank}) must be < world_size ({c.world_size})")
    if c.tokens_per_batch % c.world_size:
        raise ValueError(f"world_size ({c.world_size}) does not divide tokens_per_batch ({c.tokens_per_batch})")
    seq_lens = ([c.min_len << i for i in range((c.max_len // c.min_len).bit_length())]
                if c.strategy == "vsl" else [c.max_len])
    for s in seq_lens:
        rows = c.tokens_per_batch // s
        if rows % c.world_size:
            raise ValueError(f"world_size ({c.world_size}) does not divide the batch: tokens_per_batch="
                             f"{c.tokens_per_batch} holds {rows} rows of seq_len {s}")


@dataclass
class _Bucket:
    seq_len: int
    rows_per_batch: int        # global rows per step
    num_rows: int
    # vsl: one piece per row
    doc: np.ndarray | None = None
    start: np.ndarray | None = None
    # pack / concat_chunk: rows are bins of a Packing
    packing: object = None
    offs: np.ndarray | None = None   # (num_bins + 1,) first piece of each bin


class _BufferPool:
    """Recycles (3, N) int64 batch buffers once no tensor refers to them any more.

    torch.from_numpy keeps the numpy array alive for as long as any tensor or view shares its
    memory, so an array whose only references are this pool's is free to overwrite. Reusing it
    skips the kernel zeroing fresh pages, a large part of batch assembly.
    """

    def __init__(self, size: int):
        self.size = size
        self.arrays: list[np.ndarray] = []

    def get(self, n: int) -> np.ndarray:
        for a in self.arrays:
            # references: the pool list, the loop variable and getrefcount's argument
            if a.shape[1] == n and sys.getrefcount(a) <= 3:
                return a
        a = np.empty((3, n), dtype=np.int64)
        if len(self.arrays) < self.size:
            self.arrays.append(a)
        return a


def _remainder_bucket(b: _Bucket, d) -> _Bucket:
    """The min_len bucket with the remainder pieces (< min_len) added as BFD bins of min_len tokens:
    rows [0, num_rows) keep one full piece each, the bins follow (several pieces per row, masked apart)."""
    p = pack_bfd(d.rem_len, b.seq_len)                        # pieces < capacity: never split
    n = b.num_rows
    rem_doc, rem_start = d.rem_doc.astype(np.int64), d.rem_start.astype(np.int64)
    packing = Packing(
        bin=np.concatenate([np.arange(n, dtype=np.int64), n + p.bin]),
        doc=np.concatenate([b.doc.astype(np.int64), rem_doc[p.doc]]),
        start=np.concatenate([b.start.astype(np.int64), rem_start[p.doc] + p.start]),
        length=np.concatenate([np.full(n, b.seq_len, dtype=np.int64), p.length]),
        num_bins=n + p.num_bins, capacity=b.seq_len,
        tokens_total=n * b.seq_len + p.tokens_total, tokens_truncated=0)
    return _Bucket(b.seq_len, b.rows_per_batch, packing.num_bins, packing=packing, offs=packing.bin_offsets)


class PackedLoader:
    """Iterable of :class:`Batch` (see module doc). ``len()`` is the steps per epoch.

    One ``for`` loop runs to the end of the current epoch (forever with ``infinite``);
    ``state_dict()`` taken after any batch resumes exactly at the next one.
    """

    def __init__(self, source, config: LoaderConfig | None = None):
        self.config = config = config or LoaderConfig()
        validate_config(config)
        self.source = source if isinstance(source, TokenSource) else open_tokens(source)
        if len(self.source) == 0:
            raise ValueError("source has no documents")
        self.decomposition = None
        self._static_buckets: list[_Bucket] | None = None
        c = config
        if c.strategy == "vsl":
            self.decomposition = d = decompose(self.source.lengths, c.min_len, c.max_len, remainder=c.remainder)
            self._static_buckets = [
                _Bucket(int(s), c.tokens_per_batch // int(s), int(d.counts[i]), doc=d.docs[i], start=d.starts[i])
                for i, s in enumerate(d.bucket_lens)]
            if c.remainder and d.rem_len.shape[0]:
                self._static_buckets[0] = _remainder_bucket(self._static_buckets[0], d)
        elif c.strategy == "pack":
            p = pack_bfd(self.source.lengths, c.max_len)
            self.packing = p
            self._static_buckets = [_Bucket(c.max_len, c.tokens_per_batch // c.max_len, p.num_bins, packing=p,
                                            offs=p.bin_offsets)]
        self._epoch = 0
        self._step = 0
        self._plan_cache: tuple[int, tuple] | None = None
        self._pool = None if config.pin_memory and torch.cuda.is_available() else _BufferPool(config.prefetch + 4)
        self._steps = len(self._plan(0)[1])
        if self._steps == 0:
            rows = [(b.seq_len, b.num_rows, b.rows_per_batch) for b in self._buckets(0)]
            raise ValueError(f"the source cannot fill a single batch of tokens_per_batch={c.tokens_per_batch} "
                             f"(seq_len, rows available, rows per batch): {rows}")

    # -- the plan ---------------------------------------------------------------------------
    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, epoch, stream])

    def _buckets(self, epoch: int) -> list[_Bucket]:
        if self._static_buckets is not None:
            return self._static_buckets
        c = self.config  # concat_chunk: a fresh document order every epoch
        order = self._rng(epoch, 1_000_003).permutation(len(self.source))
        p = concat_chunk(self.source.lengths, c.max_len, order=order)
        return [_Bucket(c.max_len, c.tokens_per_batch // c.max_len, p.num_bins, packing=p, offs=p.bin_offsets)]

    def _plan(self, epoch: int):
        """(buckets, schedule (S,) bucket per step, ordinal (S,) batch index inside the bucket, perms)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        c = self.config
        buckets = self._buckets(epoch)
        perms = [self._rng(epoch, i).permutation(b.num_rows) if c.strategy != "concat_chunk"
                 else np.arange(b.num_rows) for i, b in enumerate(buckets)]
        nb = np.array([b.num_rows // b.rows_per_batch for b in buckets], dtype=np.int64)
        if c.strategy == "vsl":
            sched = bucket_schedule(nb, c.curriculum, c.num_cycles, rng=self._rng(epoch, 10_000))
        else:
            sched = np.zeros(int(nb[0]), dtype=np.int64)
        ordinal = np.zeros_like(sched)
        for b in range(len(buckets)):
            sel = sched == b
            ordinal[sel] = np.arange(int(sel.sum()))
        plan = (buckets, sched, ordinal, perms)
        self._plan_cache = (epoch, plan)
        return plan

    def __len__(self) -> int:
        return self._steps

    @property
    def tokens_per_rank(self) -> int:
        return self.config.tokens_per_batch // self.config.world_size

    def pieces(self, epoch: int, step: int):
        """This rank's pieces at (epoch, step): (bucket, seq_len, doc, start, length, row_fill)."""
        c = self.config
        buckets, sched, ordinal, perms = self._plan(epoch)
        b = int(sched[step])
        bk = buckets[b]
        per_rank = bk.rows_per_batch // c.world_size
        lo = int(ordinal[step]) * bk.rows_per_batch + c.rank * per_rank
        rows = perms[b][lo:lo + per_rank]
        if bk.packing is None:
            n = rows.shape[0]
            length = np.full(n, bk.seq_len, dtype=np.int64)
            return b, bk.seq_len, bk.doc[rows], bk.start[rows], length, length
        p, offs = bk.packing, bk.offs
        first, cnt = offs[rows], offs[rows + 1] - offs[rows]
        idx = np.repeat(first - np.cumsum(cnt) + cnt, cnt) + np.arange(int(cnt.sum()))
        fill = np.add.reduceat(p.length[idx], np.cumsum(cnt) - cnt) if idx.size else np.zeros(0, np.int64)
        return b, bk.seq_len, p.doc[idx], p.start[idx], p.length[idx], fill

    def make_batch(self, epoch: int, step: int) -> Batch:
        c = self.config
        b, seq_len, doc, start, length, fill = self.pieces(epoch, step)
        n = self.tokens_per_rank
        ids, labels, pos, cu = self.source.gather(doc, start, length, n, ignore_index=c.ignore_index,
                                                  pad_id=c.pad_id, pin_memory=c.pin_memory, backend=c.backend,
                                                  out=None if self._pool is None else self._pool.get(n))
        row_cu = np.zeros(fill.shape[0] + 1, dtype=np.int64)
        np.cumsum(fill, out=row_cu[1:])
        return Batch(ids, labels, pos, torch.from_numpy(cu.astype(np.int32)),
                     torch.from_numpy(row_cu.astype(np.int32)), int(length.max()) if length.size else 0,
                     seq_len, epoch * self._steps + step, epoch, int(cu[-1]), b)

    # -- iteration and resume -----------------------------------------------------------------
    def _positions(self, epoch: int, step: int) -> Iterator[tuple[int, int]]:
        while True:
            while step < self._steps:
                yield epoch, step
                step += 1
            if not self.config.infinite:
                return
            epoch, step = epoch + 1, 0

    def _produce(self, epoch: int, step: int) -> Iterator[Batch]:
        for e, s in self._positions(epoch, step):
            yield self.make_batch(e, s)

    def _prefetched(self, epoch: int, step: int) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.config.prefetch)
        stop = threading.Event()
        done = object()

        def work():
            try:
                for item in self._produce(epoch, step):
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                item = done
            except BaseException as e:  # handed to the consumer
                item = e
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        t = threading.Thread(target=work, name="lengen-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=5)

    def __iter__(self) -> Iterator[Batch]:
        if self._step >= self._steps:
            self._epoch, self._step = self._epoch + 1, 0
        gen = (self._prefetched if self.config.prefetch > 0 else self._produce)(self._epoch, self._step)
        for batch in gen:
            s = batch.step - batch.epoch * self._steps + 1
            self._epoch, self._step = (batch.epoch, s) if s < self._steps else (batch.epoch + 1, 0)
            yield batch

    def _fingerprint(self) -> dict:
        cfg = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in _RUNTIME_FIELDS}
        return {"config": cfg, "source": self.source.fingerprint()}

    def state_dict(self) -> dict:
        return {"version": 1, **self._fingerprint(), "epoch": self._epoch, "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        check_state(state)
        mine = self._fingerprint()
        theirs = state["config"]
        diff = {k: (theirs.get(k), v) for k, v in mine["config"].items() if theirs.get(k) != v}
        if diff:
            desc = ", ".join(f"{k}: saved {a!r} != current {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"state_dict config does not match this loader ({desc})")
        if state["source"] != mine["source"]:
            raise ValueError(f"state_dict was saved for a different source ({state['source']} != "
                             f"{mine['source']})")
        if state["step"] > self._steps:
            raise ValueError(f"state_dict['step'] = {state['step']} out of range (steps per epoch: {self._steps})")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])


def check_state(state) -> None:
    """Refuse a loader state with missing fields, wrong types or negative counters, naming the field.

    A state comes from a checkpoint file, so it is untrusted like any other file.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state_dict must be a dict (from PackedLoader.state_dict()), got {type(state).__name__}")
    if "epoch" not in state or "step" not in state:
        raise ValueError("state_dict is not a PackedLoader state (missing 'epoch'/'step')")
    for key in ("version", "config", "source"):
        if key not in state:
            raise ValueError(f"state_dict is not a PackedLoader state (missing {key!r})")
    v = state["version"]
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v != 1:
        raise ValueError(f"state_dict['version'] must be 1, got {v!r}")
    for key in ("epoch", "step"):
        x = state[key]
        if not isinstance(x, (int, np.integer)) or isinstance(x, bool):
            raise TypeError(f"state_dict[{key!r}] must be an int, got {type(x).__name__} ({x!r})")
        if x < 0:
            raise ValueError(f"state_dict[{key!r}] must be >= 0, got {x}")
    if not isinstance(state["config"], dict):
        raise TypeError(f"state_dict['config'] must be a dict, got {type(state['config']).__name__}")
    if not isinstance(state["source"], str):
        raise TypeError(f"state_dict['source'] must be a str (the source fingerprint), got "
                        f"{type(state['source']).__name__}")
