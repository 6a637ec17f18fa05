"""``lengen-data-demo``: the data pipeline end to end on the embedded corpus (the stdlib's sources).

Audit -> dataset decomposition -> packing (BFD vs concat-chunk) -> a few VSL curriculum batches.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from .. import backends
from .audit import audit
from .corpus import BYTE_VOCAB, embedded_corpus
from .curriculum import CURRICULA
from .decompose import decompose
from .loader import LoaderConfig, PackedLoader
from .pack import concat_chunk, pack_bfd
from .source import open_tokens


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def _text(tokens: np.ndarray, n: int = 60) -> str:
    s = bytes(tokens[:n].astype(np.uint8)).decode("utf-8", errors="replace")
    return s.replace("\n", "\\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lengen-data-demo", description=__doc__)
    p.add_argument("--context-len", type=int, default=4096, help="max_len: longest bucket / row length")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--tokens-per-batch", type=int, default=32768)
    p.add_argument("--curriculum", default="grow_p2", choices=CURRICULA)
    p.add_argument("--num-cycles", type=int, default=2)
    p.add_argument("--batches", type=int, default=6)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    ext = backends.describe()
    print(f"lengen_fast data pipeline demo (C++ extension: {ext['cpu_ext']}, OpenMP threads: {ext['omp_threads']})")

    _section("source: the Python standard library, byte-level tokens")
    table = embedded_corpus()
    src = open_tokens(table, vocab_size=BYTE_VOCAB)
    print(f"{len(src):,} files, {src.num_tokens:,} tokens (uint16, vocab {BYTE_VOCAB}), zero-copy views of Arrow "
          f"buffers; first file {table.column('path')[0].as_py()!r}: \"{_text(src.tokens(0))}...\"")

    _section(f"audit for a {args.context_len:,}-token context")
    print(audit(src, context_len=args.context_len, min_len=args.min_len))

    _section(f"dataset decomposition into power-of-two buckets ({args.min_len}..{args.context_len})")
    d = decompose(src, args.min_len, args.context_len)
    print(f"{'bucket':>8} {'pieces':>9} {'tokens':>12} {'share':>7}")
    for s, c, t in zip(d.bucket_lens, d.counts, d.tokens_per_bucket):
        print(f"{s:>8,} {c:>9,} {t:>12,} {100 * t / max(d.tokens_kept, 1):>6.1f}%")
    print(f"dropped: {d.tokens_dropped:,} tokens in {d.pieces_dropped:,} pieces shorter than {args.min_len} "
          f"({100 * d.tokens_dropped / max(d.tokens_total, 1):.2f}% of tokens); {d.num_empty} empty files; "
          "LoaderConfig(remainder=True) packs them into min_len rows instead")

    _section(f"packing into {args.context_len:,}-token rows")
    bfd = pack_bfd(src, args.context_len)
    cc = concat_chunk(src.lengths, args.context_len)
    for name, pk in (("best-fit decreasing", bfd), ("concat-chunk", cc)):
        e = pk.efficiency
        docs_per_row = np.bincount(pk.bin, minlength=pk.num_bins)
        cut = int(len(pk.doc) - np.count_nonzero(src.lengths))
        print(f"{name:<20} rows {e['bins']:>6,}  padding {e['padding_pct']:6.3f}%  truncated "
              f"{e['truncated_pct']:.1f}%  pieces/row {docs_per_row.mean():.2f}  document cuts {cut:,}")
    print("concat-chunk has no padding but cuts documents at every row end and lets attention cross "
          "documents; BFD only splits files longer than a row and keeps the rest whole")

    _section(f"VSL curriculum '{args.curriculum}' ({args.num_cycles} cycles), "
             f"{args.tokens_per_batch:,} tokens per batch")
    cfg = LoaderConfig(strategy="vsl", tokens_per_batch=args.tokens_per_batch, max_len=args.context_len,
                       min_len=args.min_len, curriculum=args.curriculum, num_cycles=args.num_cycles, seed=0)
    loader = PackedLoader(src, cfg)
    sched = loader._plan(0)[1]
    # mean bucket index (log2 length) in 64 slices of the epoch
    chunks = np.array_split(sched, min(len(sched), 64))
    glyphs = ".:-=+*#%@"
    top = max(loader.decomposition.num_buckets - 1, 1)
    spark = "".join(glyphs[int(round(c.mean() / top * (len(glyphs) - 1)))] for c in chunks)
    print(f"{len(loader)} steps per epoch; mean log2(seq_len) along the epoch (short '.' -> long '@'):")
    print(f"  [{spark}]")
    print(f"{'step':>5} {'seq_len':>8} {'pieces':>7} {'max_seqlen':>10} {'tokens':>8}  first piece")
    for i, b in enumerate(loader):
        if i >= args.batches:
            break
        first = b.input_ids[: min(int(b.cu_seqlens[1]), 50)].numpy()
        print(f"{b.step:>5} {b.seq_len:>8,} {len(b.cu_seqlens) - 1:>7} {b.max_seqlen:>10,} {b.num_tokens:>8,}  "
              f"\"{_text(first, 50)}\"")
    print(f"each batch: flat input_ids/labels/position_ids of {loader.tokens_per_rank:,} tokens, cu_seqlens "
          f"(int32), labels = ignore_index at every piece end; step 0 is from the longest bucket")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
