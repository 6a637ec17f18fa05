"""Measure corpus preparation (issues 13, 22): tokenize MB per CPU-second, HF vs tiktoken; open a 1B-token directory.

    python scripts/measure_prepare.py tokenize [--mb 4] [--vocab 8192] [--workers 1,2] [--corpus stdlib|docs]
                                               [--repeats 3] [--out bench]
    python scripts/measure_prepare.py scaling [--mb 32] [--repeats 5] [--out bench]
    python scripts/measure_prepare.py open1b --dir /work/tmp-1b [--tokens 1e9] [--keep]

tokenize: two tokenizers of --vocab tokens trained on the same texts (stdlib sources, or prose): one by rustbpe
(what --train-tokenizer makes), one by HF's BpeTrainer with GPT-2's ByteLevel split. Each runs on both engines
side by side, in interleaved rounds: the encoder alone (this process, one thread) and ``prepare`` end to end
(JSONL input, --workers processes, engine=hf | tiktoken, TOKENIZERS_PARALLELISM=false). Prints MB of text per
CPU-second (user+system of this process and the workers, robust to neighbours) and wall MB/s, and appends one
row per configuration to OUT/results.csv (throughput = MB/CPU-s).
scaling: prepare on tiktoken with 1 and 2 workers in interleaved rounds, with the cores the run used and how busy
the machine was (/proc/stat) in each round: on a shared machine only rounds without a neighbour show the speed-up.
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


def _doc_texts(limit_mb: float):
    """English prose that every Debian/Ubuntu machine has: the packages' copyright and README files,
    plus the .md/.rst/.txt documentation shipped in this Python's site-packages."""
    roots = [Path("/usr/share/doc"), Path(sysconfig.get_paths()["purelib"])]
    files = []
    for r in roots:
        files += sorted(f for f in r.rglob("*") if f.is_file() and not f.is_symlink()
                        and (f.name == "copyright" or f.suffix in (".md", ".rst", ".txt")))
    out, total = [], 0
    for f in files:
        try:
            t = f.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not t.strip():
            continue
        out.append(t)
        total += len(t.encode())
        if total >= limit_mb * 1e6:
            break
    return out, total


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the prepare workers), user + system."""
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _hf_gpt2_style(texts, vocab: int):
    """A GPT-2-style HF byte-level BPE (HF's trainer and ByteLevel split), <|endoftext|> as the last id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab - 1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return tok


def tokenize(args) -> None:
    """HF tokenizers vs tiktoken side by side, the same tokenizer and texts, interleaved rounds: the encoders alone
    (in this process, one thread) and `prepare` end to end (engine=hf | tiktoken, 1 and 2 workers)."""
    import platform
    from importlib.metadata import version

    import numpy as np

    from lengen_fast.bench.common import Timing, device_name, record
    from lengen_fast.data.prepare import prepare, train_bpe
    from lengen_fast.data.tokenizer import choose_encoder
    if args.out:
        os.environ["LENGEN_RESULTS"] = str(Path(args.out) / "results.csv")
    texts, total = (_stdlib_texts if args.corpus == "stdlib" else _doc_texts)(args.mb)
    mb = total / 1e6
    work = Path(tempfile.mkdtemp(prefix="lengen-prep-"))
    workers = [int(w) for w in args.workers.split(",")]
    vers = {k: version(k) for k in ("tiktoken", "tokenizers", "rustbpe")}
    try:
        with open(work / "corpus.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        toks = {}
        c0 = _cpu()
        toks["trained"] = train_bpe(texts, args.vocab)
        print(f"rustbpe: {args.vocab}-token vocabulary trained on {mb:.1f} MB in {_cpu() - c0:.1f} CPU-s")
        c0 = _cpu()
        toks["hf_gpt2"] = _hf_gpt2_style(texts, args.vocab)
        print(f"HF BpeTrainer: {args.vocab}-token vocabulary trained on {mb:.1f} MB in {_cpu() - c0:.1f} CPU-s")
        for name, tok in toks.items():
            tok.save(str(work / f"{name}.json"))
        print(f"text {mb:.2f} MB ({len(texts)} {args.corpus} documents); {device_name()}; {platform.python_version()}; "
              f"{vers}; load {os.getloadavg()[0]:.2f}")
        res: dict = {}
        for rep in range(args.repeats):
            for name, tok in toks.items():
                for engine in ("hf", "tiktoken"):
                    enc = choose_encoder(tok, False, [], engine=engine).make()
                    c0, t0 = time.process_time(), time.perf_counter()
                    lengths, _ = enc.encode(texts, np.uint16)
                    res.setdefault(("encode", name, engine, 1), []).append(
                        (time.perf_counter() - t0, time.process_time() - c0, int(lengths.sum()), ""))
                    for w in workers:
                        out = work / f"out-{name}-{engine}-{w}"
                        c0, t0 = _cpu(), time.perf_counter()
                        m = prepare(work / "corpus.jsonl", out, tokenizer=str(work / f"{name}.json"), workers=w,
                                    shard_mb=args.shard_mb, engine=engine, progress=False)
                        res.setdefault(("prepare", name, engine, w), []).append(
                            (time.perf_counter() - t0, _cpu() - c0, m["totals"]["tokens"],
                             m["tokenizer"]["engine"]))
                        shutil.rmtree(out)
        med = (lambda xs: sorted(xs)[len(xs) // 2])
        print(f"{'op':8} {'tokenizer':9} {'engine':9} {'workers':>7} {'tokens':>10} {'MB/CPU-s':>9} {'wall MB/s':>10}"
              f" {'CPU-s':>7}  (runs: MB/CPU-s)")
        for (op, name, engine, w), runs in res.items():
            wall, cpu = med([r[0] for r in runs]), med([r[1] for r in runs])
            per_cpu = [mb / r[1] for r in runs]
            assert all(r[3] in ("", engine) for r in runs), runs  # the engine asked for is the one that ran
            print(f"{op:8} {name:9} {engine:9} {w:>7} {runs[0][2]:>10,} {mb / cpu:>9.2f} {mb / wall:>10.2f} {cpu:>7.2f}"
                  f"  ({' '.join(f'{x:.2f}' for x in per_cpu)})")
            q = sorted(r[0] * 1e3 for r in runs)
            cfg = {"corpus": args.corpus, "mb": round(mb, 2), "docs": len(texts), "vocab": args.vocab,
                   "tokenizer": name, "workers": w, "shard_mb": args.shard_mb, **vers}
            record(f"tokenize_{op}", cfg, "tiktoken" if engine == "tiktoken" else "hf_tokenizers",
                   Timing(wall * 1e3, q[0], q[-1], q), throughput=mb / cpu, unit="MB/CPU-s",
                   note=f"wall {mb / wall:.2f} MB/s; CPU {cpu:.2f} s; {runs[0][2]} tokens; load "
                        f"{os.getloadavg()[0]:.2f}; {args.repeats} interleaved rounds, medians")
        for name in toks:
            a, b = res[("encode", name, "hf", 1)][0][2], res[("encode", name, "tiktoken", 1)][0][2]
            assert a == b, (name, a, b)  # the same ids, so the same counts
    finally:
        shutil.rmtree(work)


def _busy() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def scaling(args) -> None:
    """prepare on tiktoken with 1 and 2 workers, interleaved rounds; per round the cores our run used and the share
    of the machine that was busy (/proc/stat), so rounds where a neighbour held a core can be told apart."""
    from lengen_fast.bench.common import Timing, record
    from lengen_fast.data.prepare import prepare, train_bpe
    if args.out:
        os.environ["LENGEN_RESULTS"] = str(Path(args.out) / "results.csv")
    texts, total = _stdlib_texts(args.mb)
    mb = total / 1e6
    work = Path(tempfile.mkdtemp(prefix="lengen-scale-"))
    try:
        with open(work / "corpus.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        train_bpe(texts[: len(texts) // 4], args.vocab).save(str(work / "tok.json"))
        ncpu = os.cpu_count() or 1
        print(f"{mb:.1f} MB of stdlib sources, {args.vocab}-token rustbpe vocabulary, engine tiktoken, shard_mb "
              f"{args.shard_mb}, {ncpu} cores")
        for r in range(args.repeats):
            for w in (1, 2):
                s0, t0, c0 = _busy(), time.perf_counter(), _cpu()
                prepare(work / "corpus.jsonl", work / "out", tokenizer=str(work / "tok.json"), workers=w,
                        shard_mb=args.shard_mb, engine="tiktoken", progress=False)
                wall, cpu = time.perf_counter() - t0, _cpu() - c0
                d = [b - a for a, b in zip(s0, _busy())]
                busy = (sum(d) - d[3] - d[4]) / max(sum(d), 1) * ncpu
                print(f"round {r} workers {w}: wall {mb / wall:6.2f} MB/s  {mb / cpu:6.2f} MB/CPU-s  cores used by "
                      f"this run {cpu / wall:4.2f}, machine busy {busy:4.2f} of {ncpu}")
                record("tokenize_scaling", {"corpus": "stdlib", "mb": round(mb, 2), "vocab": args.vocab, "workers": w,
                                            "shard_mb": args.shard_mb, "round": r}, "tiktoken",
                       Timing(wall * 1e3, wall * 1e3, wall * 1e3, [wall * 1e3]), throughput=mb / cpu,
                       unit="MB/CPU-s", note=f"wall {mb / wall:.2f} MB/s; cores used {cpu / wall:.2f}; machine busy "
                                             f"{busy:.2f} of {ncpu}")
                shutil.rmtree(work / "out")
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
    from lengen_fast.data.shards import COLUMN, FORMAT, FORMAT_VERSION, shard_name, shard_record, write_manifest
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
            recs.append(shard_record(d / shard_name(i), 0))
        tok = {"fingerprint": "synthetic", "source": "synthetic", "file": None, "vocab_size": 65536,
               "add_special_tokens": False}
        write_manifest(d, {
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
    t = sub.add_parser("tokenize", help="HF tokenizers vs tiktoken, side by side (rows to --out/results.csv)")
    t.add_argument("--mb", type=float, default=4)
    t.add_argument("--vocab", type=int, default=8192)
    t.add_argument("--workers", default="1,2", help="comma-separated worker counts for prepare")
    t.add_argument("--shard-mb", type=float, default=0.5)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--out", default=None, help="append rows to OUT/results.csv (e.g. bench)")
    t.add_argument("--corpus", choices=("stdlib", "docs"), default="stdlib",
                   help="stdlib: Python sources; docs: copyright/README/.md/.rst/.txt prose on this machine")
    sc = sub.add_parser("scaling", help="tiktoken prepare, 1 vs 2 workers, with the machine's busy share per round")
    sc.add_argument("--mb", type=float, default=32)
    sc.add_argument("--vocab", type=int, default=8192)
    sc.add_argument("--shard-mb", type=float, default=2)
    sc.add_argument("--repeats", type=int, default=5)
    sc.add_argument("--out", default=None, help="append rows to OUT/results.csv (e.g. bench)")
    o = sub.add_parser("open1b")
    o.add_argument("--dir", required=True)
    o.add_argument("--tokens", default="1e9")
    o.add_argument("--shards", type=int, default=8)
    o.add_argument("--repeats", type=int, default=3)
    o.add_argument("--keep", action="store_true")
    args = p.parse_args()
    {"tokenize": tokenize, "scaling": scaling, "open1b": open1b}[args.cmd](args)


if __name__ == "__main__":
    main()
