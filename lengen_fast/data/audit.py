"""Length audit: does the data support the training plan?

Reports a power-of-two length histogram (documents and token share per bucket), percentiles,
and plain-language warnings, e.g. that most documents are far shorter than the context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .decompose import check_lengths


@dataclass
class AuditReport:
    num_docs: int
    num_tokens: int
    num_empty: int
    mean: float
    percentiles: dict          # {"p50": .., "p90": .., "p99": .., "max": ..}
    buckets: list              # [{"lo": 2^k, "hi": 2^(k+1), "docs": n, "docs_pct": .., "tokens_pct": ..}]
    context_len: int | None
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        p = self.percentiles
        lines = [f"documents: {self.num_docs:,}   tokens: {self.num_tokens:,}   empty: {self.num_empty:,}",
                 f"length: mean {self.mean:,.0f}  p50 {p['p50']:,}  p90 {p['p90']:,}  p99 {p['p99']:,}  "
                 f"max {p['max']:,}",
                 f"{'length bucket':>22} {'docs':>10} {'docs %':>8} {'tokens %':>9}"]
        for b in self.buckets:
            rng = "0" if b["hi"] == 1 else f"[{b['lo']:,}, {b['hi']:,})"
            bar = "#" * int(round(b["tokens_pct"] / 2.5))
            lines.append(f"{rng:>22} {b['docs']:>10,} {b['docs_pct']:>7.1f}% {b['tokens_pct']:>8.1f}%  {bar}")
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def audit(source_or_lengths, *, context_len: int | None = None, min_len: int = 256) -> AuditReport:
    """Audit document lengths (a TokenSource or an int array) against a planned ``context_len``.

    ``min_len`` is the shortest decomposition bucket: tokens in documents shorter than it are
    the ones decompose() would drop.
    """
    lengths = check_lengths(source_or_lengths, "source_or_lengths")
    if context_len is not None and (not isinstance(context_len, (int, np.integer)) or context_len < 1):
        raise ValueError(f"context_len must be a positive int, got {context_len!r}")
    n = int(lengths.shape[0])
    total = int(lengths.sum())
    empty = int((lengths == 0).sum())
    pct = (lambda q: int(np.percentile(lengths, q, method="lower")) if n else 0)
    perc = {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": int(lengths.max()) if n else 0}
    # bucket k holds 2^(k-1) <= L < 2^k; bucket 0 holds empty documents
    k = np.zeros(n, dtype=np.int64)
    nz = lengths > 0
    k[nz] = np.floor(np.log2(lengths[nz])).astype(np.int64) + 1
    docs = np.bincount(k, minlength=1)
    toks = np.bincount(k, weights=lengths, minlength=1)
    buckets = []
    for i in range(docs.shape[0]):
        if docs[i] == 0:
            continue
        lo = 0 if i == 0 else 1 << (i - 1)
        buckets.append({"lo": lo, "hi": 1 if i == 0 else 1 << i, "docs": int(docs[i]),
                        "docs_pct": 100.0 * docs[i] / n, "tokens_pct": 100.0 * toks[i] / total if total else 0.0})
    warnings = []
    if n == 0:
        warnings.append("the source has no documents")
    if empty:
        warnings.append(f"{empty:,} documents ({100 * empty / max(n, 1):.1f}%) are empty; they are skipped")
    short = int((lengths[nz] < min_len).sum()) if n else 0
    short_tok = int(lengths[(lengths < min_len)].sum())
    if total and short_tok / total > 0.05:
        warnings.append(f"{100 * short_tok / total:.0f}% of tokens ({short:,} documents) are in documents shorter "
                        f"than min_len={min_len}; decompose() drops them unless min_len is lowered or "
                        "remainder=True")
    if context_len is not None and n:
        frac_short = float((lengths < context_len // 8).mean())
        if frac_short > 0.5:
            warnings.append(f"{100 * frac_short:.0f}% of documents are shorter than {max(context_len // 8, 1):,} "
                            f"tokens; a {context_len:,}-token context will rarely see a long document")
        long_tok = float(lengths[lengths >= context_len // 2].sum()) / total if total else 0.0
        if long_tok < 0.05:
            warnings.append(f"only {100 * long_tok:.1f}% of tokens are in documents of at least "
                            f"{context_len // 2:,} tokens: too few to train (or evaluate) a {context_len:,}-token "
                            "context on real long documents")
        over = float(lengths[lengths > context_len].sum()) / total if total else 0.0
        if over > 0.25:
            warnings.append(f"{100 * over:.0f}% of tokens are in documents longer than the {context_len:,}-token "
                            "context; they will be split into pieces")
    return AuditReport(n, total, empty, float(lengths.mean()) if n else 0.0, perc, buckets, context_len, warnings)
