"""Corpus preparation: text -> token shards -> open_tokens, resume, determinism, zero-copy, bad input."""
import gc
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lengen_fast.bench.common import proc_status_mib
from lengen_fast.data import audit, open_tokens, synthetic_table, write_arrow
from lengen_fast.data import cli as data_cli
from lengen_fast.data import prepare as prep
from lengen_fast.data.prepare import PrepareConfig, load_tokenizer, prepare, read_manifest

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "eta", "θ", "iota", "kappa", "λ", "mu", "\n", "  ", "数据"]


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(0, 60)) if i % 17 else 0  # some empty documents
        out.append(" ".join(rng.choice(WORDS, k)))
    return out


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = prep.train_bpe(_texts(300, seed=9), 320)
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Parquet (several row groups), JSONL and text files in one directory, and their texts in order."""
    d = tmp_path_factory.mktemp("corpus")
    texts = _texts(200)
    texts[180:] = [t or "solo" for t in texts[180:]]  # a text file is one document; a 0-byte file is skipped
    pq.write_table(pa.table({"id": list(range(80)), "text": texts[:80]}), d / "a.parquet", row_group_size=9)
    with open(d / "b.jsonl", "w") as f:
        for t in texts[80:180]:
            f.write(json.dumps({"meta": 1, "text": t}) + "\n")
    for i, t in enumerate(texts[180:]):
        (d / "c" if i == 0 else d).mkdir(exist_ok=True)
        (d / "c" / f"t{i:02d}.txt").write_text(t, encoding="utf-8")
    (d / "c" / "zz-empty.txt").write_bytes(b"")
    return d, texts


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def _check_round_trip(out, texts, tok):
    src = open_tokens(out)
    assert len(src) == len(texts)
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(src.tokens(i), _ids(tok, t), err_msg=f"document {i}")
    return src


def test_round_trip_multi_shard(tmp_path, corpus, tok_file):
    d, texts = corpus
    m = prepare(d, tmp_path / "out", tokenizer=str(tok_file), shard_mb=0.002, workers=2, progress=False)
    assert m["complete"] and m["dtype"] == "uint16" and m["totals"]["docs"] == len(texts)
    assert m["totals"]["shards"] > 5 and len(list((tmp_path / "out").glob("shard-*.arrow"))) == m["totals"]["shards"]
    assert m["source"]["skipped_empty"] == [str(d / "c" / "zz-empty.txt")]
    src = _check_round_trip(tmp_path / "out", texts, load_tokenizer(tok_file))
    assert src.dtype == np.uint16 and src.vocab_size == m["vocab_size"] and src.prepared_dir == tmp_path / "out"
    assert m["totals"]["tokens"] == src.num_tokens
    assert m["totals"]["text_bytes"] == sum(len(t.encode()) for t in texts)
    # the copied tokenizer is the one that was used
    assert prep.tokenizer_fingerprint(load_tokenizer(tmp_path / "out" / "tokenizer.json")) == \
        m["tokenizer"]["fingerprint"]
    # a glob and a list of inputs plan the same tasks
    m2 = prepare([str(d / "a.parquet"), str(d / "b.jsonl"), str(d / "c")], tmp_path / "out2", tokenizer=str(tok_file),
                 shard_mb=0.002, workers=1, progress=False)
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]


def test_autotokenizer_directory_and_special_tokens(tmp_path, corpus, tok_file):
    transformers = pytest.importorskip("transformers")
    d, texts = corpus
    from tokenizers.processors import TemplateProcessing
    tok = load_tokenizer(tok_file)
    tok.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "hf")
    for special in (False, True):
        out = tmp_path / f"out-{special}"
        prepare(d / "b.jsonl", out, tokenizer=str(tmp_path / "hf"), add_special_tokens=special, progress=False,
                workers=1)
        src = open_tokens(out)
        again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
        for i, t in enumerate(texts[80:180]):
            np.testing.assert_array_equal(src.tokens(i), again(t, add_special_tokens=special)["input_ids"])
        assert (src.tokens(0)[:1].tolist() == [0]) == special


def test_hf_dataset_input(tmp_path, tok_file):
    datasets = pytest.importorskip("datasets")
    texts = _texts(120, seed=3)
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(120))}).shuffle(seed=1).select(range(100))
    prepare(ds, tmp_path / "out", tokenizer=str(tok_file), shard_mb=0.001, workers=2, progress=False)
    _check_round_trip(tmp_path / "out", ds["text"], load_tokenizer(tok_file))


def test_trained_tokenizer_resume_and_determinism(tmp_path, corpus, monkeypatch):
    d, texts = corpus
    kw = dict(train_tokenizer=400, shard_mb=0.002, progress=False)
    full = prepare(d, tmp_path / "full", workers=2, **kw)
    tok = load_tokenizer(tmp_path / "full" / "tokenizer.json")
    assert 257 < tok.get_vocab_size() <= 400  # a small corpus may run out of merges first
    _check_round_trip(tmp_path / "full", texts, tok)
    # determinism: another run (one process this time) writes the same bytes
    again = prepare(d, tmp_path / "again", workers=1, **kw)
    assert again["shards"] == full["shards"] and again["tokenizer"] == full["tokenizer"]
    # an interrupted run: the 4th task dies
    calls = []
    real = prep._run_task

    def dying(args):
        calls.append(args[0])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(args)

    monkeypatch.setattr(prep, "_run_task", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(d, tmp_path / "cut", workers=1, **kw)
    assert not read_manifest(tmp_path / "cut")["complete"]
    with pytest.raises(ValueError, match="the preparation did not finish.*rerun `lengen-data prepare`"):
        open_tokens(tmp_path / "cut")
    # what a killed run can leave besides finished shards: a temporary and a damaged shard file
    (tmp_path / "cut" / ".shard-00005.arrow.tmp-999").write_bytes(b"partial")
    s1 = tmp_path / "cut" / "shard-00001.arrow"
    s1.write_bytes(s1.read_bytes()[:100])
    calls.clear()

    def counting(args):
        calls.append(args[0])
        return real(args)

    monkeypatch.setattr(prep, "_run_task", counting)
    resumed = prepare(d, tmp_path / "cut", workers=1, **kw)
    assert calls == [1] + list(range(3, full["totals"]["shards"]))  # finished shards 0 and 2 were skipped
    assert not list((tmp_path / "cut").glob(".*.tmp-*"))
    assert resumed["shards"] == full["shards"]
    calls.clear()
    prepare(d, tmp_path / "cut", workers=1, **kw)  # complete: nothing to do
    assert calls == []


def _anon_mb():
    mib = proc_status_mib("RssAnon")
    if mib != mib:
        pytest.skip("no /proc/self/status RssAnon")
    return mib


def test_zero_copy_across_shards(tmp_path):
    """Opening 1 shard or 8 shards of ~16 MiB each adds the same anonymous memory (documents, not tokens)."""
    d = tmp_path / "shards"
    d.mkdir()
    lengths = np.full(128, 65536, dtype=np.int64)  # 8M uint16 tokens = 16 MiB per shard
    for i in range(8):
        write_arrow(synthetic_table(lengths, vocab_size=60000, seed=i, dtype=np.uint16), d / f"s{i}.arrow")
    files = sorted(d.iterdir())
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    open_tokens(files[:1]).gather(np.arange(2), np.zeros(2, np.int64), np.full(2, 8), 16)  # warm up
    gc.collect()
    growth = []
    for k in (1, 2, 4, 8):
        before = _anon_mb()
        src = open_tokens(files[:k])
        n = len(src)
        doc = np.arange(0, n, max(n // 16, 1))
        src.gather(doc, np.zeros(doc.shape[0], np.int64), np.full(doc.shape[0], 256), 256 * doc.shape[0])
        growth.append(_anon_mb() - before)
        del src
        gc.collect()
    assert size_mb > 120
    assert max(growth) < 0.03 * size_mb, f"anonymous RSS grew {growth} MiB opening 1/2/4/8 shards ({size_mb:.0f} MiB)"


def test_audit_cli(tmp_path, corpus, tok_file, capsys):
    d, texts = corpus
    assert data_cli.main(["prepare", str(d), "--out", str(tmp_path / "o"), "--tokenizer", str(tok_file),
                          "--shard-mb", "0.004", "--workers", "1", "--no-progress"]) == 0
    assert "200 documents" in capsys.readouterr().out
    assert data_cli.main(["audit", str(tmp_path / "o"), "--context", "64", "--min-len", "4", "--verify"]) == 0
    out = capsys.readouterr().out
    assert str(audit(open_tokens(tmp_path / "o"), context_len=64, min_len=4)) in out
    assert data_cli.main(["audit", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_docs"] == 200
    assert prep.main([str(d / "b.jsonl"), "--out", str(tmp_path / "p"), "--tokenizer", str(tok_file),
                      "--no-progress", "--workers", "1"]) == 0
    assert data_cli.main(["audit", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


# -- bad input: each case names the exception and a fragment of the message ----------------------------
def _parquet(tmp, **cols):
    pq.write_table(pa.table(cols), tmp / "in.parquet")
    return tmp / "in.parquet"


def _jsonl(tmp, rows):
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" if not isinstance(r, str) else r + "\n"
                                          for r in rows))
    return tmp / "in.jsonl"


def _big_vocab_tokenizer(tmp):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp / "big.json"))
    return str(tmp / "big.json")


def _write(tmp, name, data: bytes):
    (tmp / name).write_bytes(data)
    return tmp / name


def _parquet_bad_utf8(tmp):
    data = b"ok" + b"\xff\xfebad"
    offs = np.array([0, 2, len(data)], dtype=np.int32)
    arr = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(offs.tobytes()), pa.py_buffer(data)])
    pq.write_table(pa.table({"text": arr}), tmp / "in.parquet")  # pyarrow writes it without checking
    return tmp / "in.parquet"


PREP_BAD = [
    # files that hold no text: an error naming the file (and where in it)
    ("text file not UTF-8", lambda t, tok: (_write(t, "x.txt", b"abc\xff\xfe"), {}),
     ValueError, r"x.txt' is not UTF-8 text \(byte 3\): invalid start byte"),
    ("binary text file", lambda t, tok: (_write(t, "x.txt", b"\x7fELF\x02\x01\x00\x00"), {}),
     ValueError, r"x.txt' is a binary file, not text \(a NUL byte at offset 6\)"),
    ("binary jsonl", lambda t, tok: (_write(t, "x.jsonl", b'{"text": "a"}\n\x00\x01\x02\n'), {}),
     ValueError, r"x.jsonl' is a binary file, not JSONL text \(a NUL byte at offset 14, line 2\)"),
    ("jsonl not UTF-8", lambda t, tok: (_write(t, "x.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n'), {}),
     ValueError, r"x.jsonl' line 2: not valid UTF-8 text \(byte 10 of the line"),
    ("jsonl lone surrogate", lambda t, tok: (_write(t, "x.jsonl", b'{"text": "a\\ud800b"}\n'), {}),
     ValueError, r"x.jsonl' line 1: column 'text' holds a lone surrogate \('\\ud800' at character 1\)"),
    ("parquet not UTF-8", lambda t, tok: (_parquet_bad_utf8(t), {}),
     ValueError, r"in.parquet' row 1: column 'text' is not valid UTF-8 text"),
    ("not a parquet file", lambda t, tok: (_write(t, "x.parquet", b"PK\x03\x04 a zip file"), {}),
     ValueError, r"x.parquet' is not a readable Parquet file"),
    ("only empty files", lambda t, tok: ([_write(t, "x.parquet", b""), _write(t, "y.jsonl", b"")], {}),
     ValueError, r"every input file is empty \(0 bytes\): \['.*x.parquet', '.*y.jsonl'\]; nothing to tokenize"),
    ("engine tiktoken, WordLevel", lambda t, tok: (_jsonl(t, [{"text": "w1"}]),
                                                   {"tokenizer": _big_vocab_tokenizer(t), "engine": "tiktoken"}),
     ValueError, r"engine=tiktoken: this tokenizer cannot run on tiktoken with HF's ids: model 'WordLevel', not BPE"),
    ("bad engine", lambda t, tok: (_jsonl(t, [{"text": "a"}]), {"engine": "fast"}), ValueError, "engine must be one of"),
    ("bad verify_mb", lambda t, tok: (_jsonl(t, [{"text": "a"}]), {"verify_mb": -1}), ValueError,
     "verify_mb must be a number of MB >= 0"),

    ("parquet without the text column", lambda t, tok: (_parquet(t, body=["a"]), {}),
     ValueError, r"text column 'text' not found in '.*in.parquet'; available: \['body'\]"),
    ("parquet of ints", lambda t, tok: (_parquet(t, text=[1, 2]), {}),
     TypeError, r"in.parquet': column 'text' holds int64 values, not strings"),
    ("parquet null row", lambda t, tok: (_parquet(t, text=["a", "b", None]), {}),
     ValueError, r"in.parquet' row 2: column 'text' is null"),
    ("jsonl without the column", lambda t, tok: (_jsonl(t, [{"text": "a"}, {"body": "b"}]), {}),
     ValueError, r"in.jsonl' line 2: no text column 'text' \(found \['body'\]\)"),
    ("jsonl non-string", lambda t, tok: (_jsonl(t, [{"text": "a"}, {"text": "b"}, {"text": 7}]), {}),
     TypeError, r"in.jsonl' line 3: column 'text' holds a int, not a string"),
    ("jsonl broken line", lambda t, tok: (_jsonl(t, [{"text": "a"}, "{oops"]), {}),
     ValueError, r"in.jsonl' line 2: not valid JSON"),
    ("missing tokenizer", lambda t, tok: (_jsonl(t, [{"text": "a"}]), {"tokenizer": str(t / "nope.json")}),
     FileNotFoundError, r"tokenizer: no such file or directory '.*nope.json'"),
    ("garbage tokenizer", lambda t, tok: (_jsonl(t, [{"text": "a"}]),
                                          {"tokenizer": str((t / "g.json").write_text("{") and t / "g.json")}),
     ValueError, r"tokenizer: cannot read '.*g.json' as a tokenizers JSON file"),
    ("directory without a tokenizer", lambda t, tok: (_jsonl(t, [{"text": "a"}]), {"tokenizer": str(t)}),
     ValueError, r"tokenizer: AutoTokenizer cannot load the directory"),
    ("vocab too large for uint16", lambda t, tok: (_jsonl(t, [{"text": "w1 w69999"}]),
                                                   {"tokenizer": _big_vocab_tokenizer(t), "dtype": "uint16"}),
     ValueError, "vocabulary of 70,000 tokens is too large for dtype uint16"),
    ("no inputs", lambda t, tok: (t / "none-*.jsonl", {}), FileNotFoundError, "no input files match"),
    ("two tokenizers", lambda t, tok: (_jsonl(t, [{"text": "a"}]), {"train_tokenizer": 300}),
     ValueError, "exactly one of tokenizer"),
    ("bad dtype", lambda t, tok: (_jsonl(t, [{"text": "a"}]), {"dtype": "int8"}), ValueError, "dtype must be one of"),
    ("bad shard_mb", lambda t, tok: (_jsonl(t, [{"text": "a"}]), {"shard_mb": 0}), ValueError, "shard_mb must be"),
]


@pytest.mark.parametrize("name,make,exc,match", PREP_BAD, ids=[c[0] for c in PREP_BAD])
def test_prepare_bad_input(tmp_path, tok_file, name, make, exc, match):
    src, kw = make(tmp_path, tok_file)
    kw = {"tokenizer": str(tok_file), "progress": False, "workers": 1, **kw}
    with pytest.raises(exc, match=match):
        prepare(src, tmp_path / "out", **kw)


def test_out_dir_inside_the_input_directory(tmp_path, tok_file):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"text": "alpha beta"}) + "\n")
    m = prepare(d, d / "tokens", tokenizer=str(tok_file), workers=1, progress=False)
    again = prepare(d, d / "tokens", tokenizer=str(tok_file), workers=1, progress=False)  # manifest.json is no input
    assert again == m and m["totals"]["docs"] == 1


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    tok = _big_vocab_tokenizer(tmp_path)
    m = prepare(_jsonl(tmp_path, [{"text": "w1 w69999 w65536"}]), tmp_path / "out", tokenizer=tok, progress=False,
                workers=1)
    src = open_tokens(tmp_path / "out")
    assert m["dtype"] == "uint32" and src.dtype == np.uint32
    np.testing.assert_array_equal(src.tokens(0), [1, 69999, 65536])


def test_prepared_directory_changes_are_refused(tmp_path, corpus, tok_file):
    d, texts = corpus
    out = tmp_path / "out"
    m = prepare(d, out, tokenizer=str(tok_file), shard_mb=0.004, workers=1, progress=False)
    open_tokens(out, tokenizer=str(tok_file))  # the same tokenizer: fine
    other = prep.train_bpe(_texts(50, seed=4), 300)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="the corpus was tokenized with a different tokenizer"):
        open_tokens(out, tokenizer=str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="was written with a different tokenizer .* use a new out_dir, or overwrite"):
        prepare(d, out, tokenizer=str(tmp_path / "other.json"), workers=1, progress=False)
    # a changed shard: same size, other lengths (rewritten by rename, as a tool would)
    s1 = out / m["shards"][1]["file"]
    t = pa.ipc.open_file(pa.memory_map(str(s1))).read_all()
    ids = t.column("input_ids").combine_chunks()
    offs = ids.offsets.to_numpy().copy()
    offs[1:-1] = np.sort(np.random.default_rng(0).integers(0, offs[-1], offs.shape[0] - 2))
    swapped = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offs), ids.values)},
                       schema=t.schema)
    write_arrow(swapped, tmp_path / "x.arrow")
    os.replace(tmp_path / "x.arrow", s1)
    with pytest.raises(ValueError, match=r"shard '.*shard-00001.arrow' changed since the manifest was written"):
        open_tokens(out)
    (out / m["shards"][2]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match="shard 'shard-00002.arrow' has disappeared"):
        open_tokens(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json' is not valid JSON"):
        open_tokens(out)
    # inputs that changed since the manifest: a new document in the JSONL file
    out2 = tmp_path / "out2"
    jl = tmp_path / "in.jsonl"
    jl.write_text(json.dumps({"text": "a b"}) + "\n")
    prepare(jl, out2, tokenizer=str(tok_file), workers=1, progress=False)
    jl.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    with pytest.raises(ValueError, match="prepared from other inputs"):
        prepare(jl, out2, tokenizer=str(tok_file), workers=1, progress=False)
    prepare(jl, out2, tokenizer=str(tok_file), workers=1, progress=False, overwrite=True)
    assert len(open_tokens(out2)) == 2


MANIFEST_BAD = [
    ("not a manifest", lambda m: {"hello": 1}, ValueError, "is not a lengen-tokens manifest"),
    ("version 2", lambda m: {**m, "version": 2}, ValueError, "has format version 2; this lengen_fast reads version 1"),
    ("no shards", lambda m: {k: v for k, v in m.items() if k != "shards"}, ValueError, "field 'shards' is missing"),
    ("vocab str", lambda m: {**m, "vocab_size": "320"}, ValueError, "field 'vocab_size' is missing or not a int"),
    ("unfinished", lambda m: {**m, "complete": False}, ValueError, "the preparation did not finish"),
    ("record without bytes", lambda m: {**m, "shards": [{k: v for k, v in m["shards"][0].items() if k != "bytes"}]},
     ValueError, "a shard record is damaged"),
    ("record escaping the directory", lambda m: {**m, "shards": [{**m["shards"][0], "file": "../x.arrow"}]},
     ValueError, "a shard record is damaged"),
    ("negative docs", lambda m: {**m, "shards": [{**m["shards"][0], "docs": -1}]}, ValueError, "damaged"),
    ("other size", lambda m: {**m, "shards": [{**m["shards"][0], "bytes": 1}]}, ValueError,
     r"shard-00000.arrow' changed since the manifest was written \(\d+ bytes, the manifest says 1\)"),
    ("other counts", lambda m: {**m, "shards": [{**m["shards"][0], "docs": 3, "tokens": 5}]}, ValueError,
     r"changed since the manifest was written \(docs \d+ != 3, tokens \d+ != 5\)"),
]


@pytest.mark.parametrize("name,mutate,exc,match", MANIFEST_BAD, ids=[c[0] for c in MANIFEST_BAD])
def test_damaged_manifest(tmp_path, tok_file, name, mutate, exc, match):
    m = prepare(_jsonl(tmp_path, [{"text": "alpha beta"}, {"text": "gamma"}]), tmp_path / "out",
                tokenizer=str(tok_file), workers=1, progress=False)
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(mutate(m)))
    with pytest.raises(exc, match=match):
        open_tokens(tmp_path / "out")


def test_config_is_a_dataclass():
    c = PrepareConfig(tokenizer="t.json", shard_mb=8)
    assert c.dtype == "auto" and c.workers == 0 and Path(c.tokenizer).name == "t.json"
