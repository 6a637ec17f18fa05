"""How good is a language model on held-out documents, and where in a document?

Every held-out document is scored alone (its own attention segment, positions from 0), many
documents packed per forward through varlen attention, with the chunked loss so no (N, V) logits
are held. ``validation_loss`` is the mean next-token loss over documents cut at the training
context L (the time-to-target curve); ``loss_by_position`` averages the loss of every token whose
position falls in a bucket [a, b) of position edges 0, L, 2L, 4L, 8L, with the document counts
behind each bucket. Extrapolation arms pass a RopeScaling per call: the model is never mutated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

EVAL_TOKENS = 16384  # tokens per evaluation forward


@dataclass
class EvalDocs:
    """Held-out documents as token arrays (each already cut to the length it is scored at)."""
    docs: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return int(sum(len(d) for d in self.docs))


def _batches(docs: list[np.ndarray], max_tokens: int):
    """Yield lists of document indices whose total length is <= max_tokens (or one longer document)."""
    cur, n = [], 0
    for i, d in enumerate(docs):
        if cur and n + len(d) > max_tokens:
            yield cur
            cur, n = [], 0
        cur.append(i)
        n += len(d)
    if cur:
        yield cur


@torch.no_grad()
def token_losses(model, docs: list[np.ndarray], *, device: torch.device, rope_scaling=None, autocast=None,
                 max_tokens: int = EVAL_TOKENS, loss_chunk: int = 4096) -> list[np.ndarray]:
    """Per-document next-token losses: a list of (len(doc) - 1,) float32 arrays, one per document."""
    was = model.training
    model.eval()
    out: list[np.ndarray] = []
    for idx in _batches(docs, max_tokens):
        parts = [np.asarray(docs[i], dtype=np.int64) for i in idx]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        cu = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        tokens = torch.from_numpy(np.concatenate(parts))                                 # (N,)
        labels = torch.full_like(tokens, -100)
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lens]))       # (N,)
        for a, b in zip(cu[:-1], cu[1:]):
            labels[a:b - 1] = tokens[a + 1:b]
        args = [t.to(device, non_blocking=True) for t in (tokens, torch.from_numpy(cu.astype(np.int32)),
                                                            positions, labels)]
        with (autocast() if autocast is not None else _null()):
            loss = model(args[0], args[1], int(lens.max()), args[2], labels=args[3], rope_scaling=rope_scaling,
                         loss_chunk=loss_chunk, reduction="none")                       # (N,)
        loss = loss.float().cpu().numpy()
        out += [loss[a:b - 1] for a, b in zip(cu[:-1], cu[1:])]
    model.train(was)
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def validation_loss(model, val: EvalDocs, **kw) -> float:
    """Mean next-token loss over all tokens of the (already cut) validation documents."""
    losses = token_losses(model, val.docs, **kw)
    tot = sum(float(x.sum()) for x in losses)
    n = sum(x.shape[0] for x in losses)
    return tot / max(1, n)


def position_edges(context: int, multiples: list[float]) -> list[int]:
    """Bucket edges 0, L, then m * L for every multiple m > 1 (sorted): buckets [0, L), [L, 2L), ..."""
    return [0, context] + [int(round(m * context)) for m in sorted(set(multiples)) if m > 1]


def choose_position_docs(heldout: list[np.ndarray], edges: list[int], per_bucket: int,
                         seed: int = 0) -> tuple[EvalDocs, list[str]]:
    """Held-out documents for loss by position: for every bucket [a, b), up to ``per_bucket`` documents
    that cover it whole (length >= b), else the longest ones that enter it (length > a), each cut at b;
    a document is used once, at the highest bucket that picked it (it also covers every bucket below).
    Returns (docs, notes about buckets that no held-out document reaches, or reaches only in part)."""
    rng = np.random.default_rng(seed)
    lens = np.array([len(d) for d in heldout], dtype=np.int64)
    used: set[int] = set()
    chosen: list[np.ndarray] = []
    notes = []
    longest = int(lens.max()) if lens.size else 0
    for a, b in reversed(list(zip(edges[:-1], edges[1:]))):
        free = np.array([i for i in range(len(heldout)) if i not in used], dtype=np.int64)
        full = free[lens[free] >= b] if free.size else free
        if full.size:
            pick = rng.permutation(full)[:per_bucket]
        else:
            part = free[lens[free] > a + 1] if free.size else free  # at least one target position >= a
            pick = part[np.argsort(-lens[part], kind="stable")][:per_bucket]
            if longest <= a + 1:
                notes.append(f"no held-out document is longer than {a} tokens: bucket [{a}, {b}) is skipped "
                             f"(longest held-out document: {longest} tokens)")
            elif longest < b:
                notes.append(f"no held-out document reaches {b} tokens: bucket [{a}, {b}) is scored only up to "
                             f"position {longest - 1}")
        for i in pick:
            used.add(int(i))
            chosen.append(np.asarray(heldout[int(i)])[:b])
    return EvalDocs(chosen), list(reversed(notes))


def loss_by_position(model, docs: EvalDocs, edges: list[int], **kw) -> list[dict]:
    """One row per bucket [a, b): mean loss of targets at positions a..b-1 (the target's position is its
    index in the document, so position p's loss is predicting token p from tokens < p), with the token
    and document counts behind it; loss is None where no document reaches the bucket."""
    losses = token_losses(model, docs.docs, **kw)
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        tot, n, nd = 0.0, 0, 0
        for x in losses:  # x[j] is the loss of target position j + 1
            seg = x[max(0, a - 1):max(0, b - 1)]
            if seg.size:
                tot += float(seg.sum())
                n += int(seg.size)
                nd += 1
        rows.append({"lo": a, "hi": b, "loss": tot / n if n else None, "tokens": n, "docs": nd})
    return rows


# two-sided 95% Student-t quantiles for 1..30 degrees of freedom (no scipy dependency)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(xs, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval of the mean over seeds (nan bounds for fewer than 2 values)."""
    xs = np.asarray([x for x in xs if x is not None and not math.isnan(x)], dtype=np.float64)
    if xs.size == 0:
        return math.nan, math.nan, math.nan
    m = float(xs.mean())
    if xs.size < 2:
        return m, math.nan, math.nan
    if level != 0.95:
        raise ValueError(f"t_interval: only level=0.95 is tabulated, got {level}")
    df = xs.size - 1
    t = _T95[df - 1] if df <= len(_T95) else 1.96
    h = float(t * xs.std(ddof=1) / math.sqrt(xs.size))
    return m, m - h, m + h


def verdict(diffs, better: str) -> dict:
    """Paired differences (arm - baseline) over seeds -> {"mean", "lo", "hi", "n", "verdict"}.

    better: "higher" or "lower" (what counts as the arm being better). "holds" only when the 95% interval
    excludes zero on the better side; "opposite" when it excludes zero on the other side; else "inconclusive".
    """
    m, lo, hi = t_interval(diffs)
    n = sum(1 for d in diffs if d is not None and not math.isnan(d))
    if math.isnan(lo):
        v = "inconclusive"
    elif (lo > 0 and better == "higher") or (hi < 0 and better == "lower"):
        v = "holds"
    elif (hi < 0 and better == "higher") or (lo > 0 and better == "lower"):
        v = "opposite"
    else:
        v = "inconclusive"
    return {"mean": m, "lo": lo, "hi": hi, "n": n, "verdict": v}
