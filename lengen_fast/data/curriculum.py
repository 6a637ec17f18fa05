"""Variable-sequence-length curricula: which bucket each step draws its batch from.

Following the Dataset Decomposition paper (Pouransari et al. 2024) and OLMo-core's VSL loader:
each bucket i (sequence length min_len * 2^i) offers ``n_i`` batches of a constant number of
tokens; its batches are split evenly over ``num_cycles`` cycles, and inside a cycle the next
batch comes from bucket i with probability proportional to (batches of i left) * odds_i:

  natural      odds 1 for all buckets: the data's own length mix, in random order
  grow_p2      odds 2^(K-1-i): short buckets are drained first, lengths grow through each cycle
  grow_linear  odds K - i: a gentler growth
  shrink       odds 2^i: the reverse of grow_p2, long sequences first
  uniform      each bucket contributes the same number of batches per cycle (the smallest
               bucket's count, as OLMo-core balances its grow curricula), in random order

Sampling without replacement with per-batch odds is done in one vectorized sort
(Efraimidis-Spirakis keys log(u) / odds). The longest non-empty bucket's first batch is moved
to step 0 so that an out-of-memory error shows up at once.
"""
from __future__ import annotations

import numpy as np

CURRICULA = ("natural", "grow_p2", "grow_linear", "uniform", "shrink")


def bucket_odds(curriculum: str, num_buckets: int) -> np.ndarray:
    """(K,) odds per bucket, shortest bucket first."""
    i = np.arange(num_buckets, dtype=np.float64)
    if curriculum in ("natural", "uniform"):
        return np.ones(num_buckets)
    if curriculum == "grow_p2":
        return np.exp2(num_buckets - 1 - i)
    if curriculum == "grow_linear":
        return num_buckets - i
    if curriculum == "shrink":
        return np.exp2(i)
    raise ValueError(f"curriculum must be one of {CURRICULA}, got {curriculum!r}")


def check_curriculum(curriculum: str, num_cycles: int) -> None:
    if curriculum not in CURRICULA:
        raise ValueError(f"curriculum must be one of {CURRICULA}, got {curriculum!r}")
    if not isinstance(num_cycles, (int, np.integer)) or isinstance(num_cycles, bool) or num_cycles < 1:
        raise ValueError(f"num_cycles must be a positive int, got {num_cycles!r}")


def bucket_schedule(batches_per_bucket, curriculum: str = "natural", num_cycles: int = 1, *,
                    rng: np.random.Generator) -> np.ndarray:
    """(S,) bucket index for every step of one epoch.

    batches_per_bucket: (K,) full batches each bucket can fill. Every batch is used once
    (``uniform`` uses the same count from every non-empty bucket).
    """
    check_curriculum(curriculum, num_cycles)
    n = np.asarray(batches_per_bucket, dtype=np.int64)
    k = n.shape[0]
    if curriculum == "uniform":
        nz = n > 0
        n = np.where(nz, n[nz].min() if nz.any() else 0, 0)
    odds = bucket_odds(curriculum, k)
    # batches of bucket i in cycle c: an even split of n_i over the cycles
    per_cycle = np.stack([np.diff((n[i] * np.arange(num_cycles + 1)) // num_cycles) for i in range(k)], 1) \
        if k else np.zeros((num_cycles, 0), np.int64)
    steps = []
    for c in range(num_cycles):
        ids = np.repeat(np.arange(k, dtype=np.int64), per_cycle[c])
        if ids.size == 0:
            continue
        keys = np.log(rng.random(ids.shape[0])) / odds[ids]
        steps.append(ids[np.argsort(-keys, kind="stable")])
    sched = np.concatenate(steps) if steps else np.zeros(0, dtype=np.int64)
    if sched.size:
        first_long = int(np.argmax(sched == sched.max()))
        if first_long:
            sched = np.concatenate([sched[first_long:first_long + 1], sched[:first_long], sched[first_long + 1:]])
    return sched
