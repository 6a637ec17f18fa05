"""Measure corpus preparation (issue 13): tokenize MB/s per core, and opening a 1B-token prepared directory.

    python scripts/measure_prepare.py tokenize [--mb 40] [--vocab 32000] [--workers 1]
    python scripts/measure_prepare.py open1b --dir /work/tmp-1b [--tokens 1e9] [--keep]

tokenize: trains a byte-level BPE (an HF fast tokenizer, the ``tokenizers`` library) on the stdlib
sources, writes them as JSONL, and times ``prepare`` alone (the tokenizer is given, not trained)
with one process per core, TOKENIZERS_PARALLELISM=false. Prints MB of text per second per core.
open1b: writes a synthetic prepared directory of ~1B uint16 tokens (lognormal lengths, mean 1000;
zero tokens, written from untouched calloc memory), then in a fresh interpreter times
``open_tokens(dir)`` and the anonymous / total RSS it adds. Deletes the directory unless --keep.
Not a test: figures go to notes/data.md with the command.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stdlib_texts(limit_mb: float):
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts:
            continue
        t = f.read_text(encoding="utf-8", errors="replace")
        out.append(t)
        total += len(t.encode())
        if total >= limit_mb * 1e6:
            break
    return out, total


def tokenize(args) -> None:
    from lengen_fast.data.prepare import prepare, train_bpe
    texts, total = _stdlib_texts(args.mb)
    work = Path(tempfile.mkdtemp(prefix="lengen-prep-"))
    try:
        with open(work / "corpus.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        t0 = time.perf_counter()
        tok = train_bpe(texts[: max(len(texts) // 4, 1)], args.vocab)
        t_train = time.perf_counter() - t0
        tok.save(str(work / "tokenizer.json"))
        import resource

        def cpu():
            a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

        rates, cpu_rates, enc_rates = [], [], []
        for rep in range(args.repeats):
            c0 = time.process_time()
            tok.encode_batch_fast(texts, add_special_tokens=False)  # the tokenizer alone, in-process
            enc_rates.append(total / 1e6 / (time.process_time() - c0))
            out = work / f"out{rep}"
            c0 = cpu()
            t0 = time.perf_counter()
            m = prepare(work / "corpus.jsonl", out, tokenizer=str(work / "tokenizer.json"), workers=args.workers,
                        shard_mb=args.shard_mb, progress=False)
            dt = time.perf_counter() - t0
            rates.append(m["totals"]["text_bytes"] / 1e6 / dt / args.workers)
            cpu_rates.append(m["totals"]["text_bytes"] / 1e6 / (cpu() - c0))
            shutil.rmtree(out)
        print(f"text {total / 1e6:.1f} MB ({len(texts)} stdlib files), BPE vocab {tok.get_vocab_size()} "
              f"(trained on a quarter in {t_train:.1f} s), {m['totals']['tokens']:,} tokens, workers={args.workers}")
        med = (lambda xs: sorted(xs)[len(xs) // 2])
        print(f"prepare, wall clock: {' '.join(f'{r:.2f}' for r in rates)} MB/s per worker (median {med(rates):.2f})")
        print(f"prepare, CPU time:   {' '.join(f'{r:.2f}' for r in cpu_rates)} MB per CPU-second "
              f"(median {med(cpu_rates):.2f})")
        print(f"tokenizer alone (encode_batch_fast, CPU time): {' '.join(f'{r:.2f}' for r in enc_rates)} MB per "
              f"CPU-second (median {med(enc_rates):.2f})")
    finally:
        shutil.rmtree(work)


_OPEN_CHILD = r"""
import sys, time, gc
sys.path.insert(0, sys.argv[2])
import numpy as np
from lengen_fast.data import open_tokens
def anon():
    d = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        d[k] = int(v.split()[0]) / 1024 if v.strip().endswith("kB") else 0
    return d["RssAnon"], d["VmRSS"]
open_tokens(sys.argv[3])  # a small file first: imports, thread pools, allocator arenas
gc.collect()
a0, r0 = anon()
t0 = time.perf_counter()
src = open_tokens(sys.argv[1])
dt = time.perf_counter() - t0
a1, r1 = anon()
n = len(src)
doc = np.arange(0, n, n // 64)
src.gather(doc, np.zeros(doc.shape[0], np.int64), np.minimum(src.lengths[doc], 64), 64 * doc.shape[0])
a2, r2 = anon()
print(f"open_tokens: {dt:.3f} s for {n:,} documents, {src.num_tokens:,} tokens in {len(src.paths)} shards; "
      f"RssAnon +{a1 - a0:.1f} MiB, VmRSS +{r1 - r0:.1f} MiB (after one batch: +{a2 - a0:.1f} / +{r2 - r0:.1f} MiB)")
"""


def open1b(args) -> None:
    import numpy as np
    import pyarrow as pa

    from lengen_fast.data.corpus import synthetic_lengths
    from lengen_fast.data.prepare import (COLUMN, FORMAT, FORMAT_VERSION, _shard_record, shard_name,
                                          _write_json)
    target = int(float(args.tokens))
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=False)
    try:
        lengths = synthetic_lengths(int(target / 1000 * 1.05), seed=0, mean=1000)
        cut = int(np.searchsorted(np.cumsum(lengths), target)) + 1
        lengths = lengths[:cut]
        parts = np.array_split(lengths, args.shards)
        t0 = time.perf_counter()
        recs = []
        for i, ln in enumerate(parts):
            offs = np.zeros(ln.shape[0] + 1, np.int32)
            np.cumsum(ln, out=offs[1:])
            vals = np.zeros(int(offs[-1]), np.uint16)  # calloc: untouched zero pages
            arr = pa.ListArray.from_arrays(pa.array(offs), pa.array(vals))
            schema = pa.schema([pa.field(COLUMN, arr.type)])
            with pa.OSFile(str(d / shard_name(i)), "wb") as f, pa.ipc.new_file(f, schema) as w:
                for b in pa.Table.from_arrays([arr], schema=schema).to_batches(max_chunksize=65536):
                    w.write_batch(b)
            del vals, arr
            recs.append(_shard_record(d / shard_name(i), 0))
        tok = {"fingerprint": "synthetic", "source": "synthetic", "file": None, "vocab_size": 65536,
               "add_special_tokens": False}
        _write_json(d / "manifest.json", {
            "format": FORMAT, "version": FORMAT_VERSION, "complete": True, "plan": "synthetic", "column": COLUMN,
            "dtype": "uint16", "vocab_size": 65536, "tokenizer": tok, "source": {"fingerprint": "synthetic"},
            "shards": recs, "totals": {"docs": int(lengths.shape[0]), "tokens": int(lengths.sum())}})
        size = sum(f.stat().st_size for f in d.iterdir()) / 2**30
        print(f"wrote {int(lengths.sum()):,} tokens, {lengths.shape[0]:,} documents, {args.shards} shards, "
              f"{size:.2f} GiB in {time.perf_counter() - t0:.1f} s")
        small = d.parent / (d.name + "-small.arrow")
        from lengen_fast.data import synthetic_table, write_arrow
        write_arrow(synthetic_table([3, 4], vocab_size=10), small)
        for rep in range(args.repeats):
            subprocess.run([sys.executable, "-c", _OPEN_CHILD, str(d), str(Path(__file__).resolve().parents[1]),
                            str(small)], check=True)
        small.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize")
    t.add_argument("--mb", type=float, default=40)
    t.add_argument("--vocab", type=int, default=32000)
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--shard-mb", type=float, default=16)
    t.add_argument("--repeats", type=int, default=3)
    o = sub.add_parser("open1b")
    o.add_argument("--dir", required=True)
    o.add_argument("--tokens", default="1e9")
    o.add_argument("--shards", type=int, default=8)
    o.add_argument("--repeats", type=int, default=3)
    o.add_argument("--keep", action="store_true")
    args = p.parse_args()
    (tokenize if args.cmd == "tokenize" else open1b)(args)


if __name__ == "__main__":
    main()
