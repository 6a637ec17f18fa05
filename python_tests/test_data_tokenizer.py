"""prepare's tokenizer engines: tiktoken gives HF's ids (GPT-2 and Llama-3 style, trained), or HF runs, and says why.

Identity is tested on a corpus, never assumed: Python sources, several scripts, odd whitespace, and the special
tokens written inside the text.
"""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lengen_fast.data import open_tokens
from lengen_fast.data import tiktoken_bpe as tb
from lengen_fast.data.prepare import load_tokenizer, prepare
from lengen_fast.data.tokenizer import choose_encoder, train_bpe

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("tiktoken")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa
from tokenizers.processors import ByteLevel as ByteLevelProcessor  # noqa: E402
from tokenizers.processors import TemplateProcessing  # noqa: E402

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
EOT, BOT = "<|endoftext|>", "<|begin_of_text|>"


def _corpus() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("[a-c]*.py"))[:25]]
    texts += tb.probe_texts([EOT, BOT, "<|reserved_0|>"])
    texts += ["Grüße aus Köln — naïve café", "東京都 新宿区 ３丁目", "مرحبا بالعالم", "שלום", "🙂🙃 x\u200dy",
              f"text{EOT}more{BOT}end", f"{BOT}{BOT}", "tab\tsep\tvalues\n1\t2\t3\n", "   \n\n\t  \n", ""]
    return texts


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


def _hf_trained(corpus, pre, ignore_merges=False, specials=(), vocab=1200):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=vocab, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])  # last ids, as GPT-2
    return tok


@pytest.fixture(scope="module")
def gpt2(corpus):
    tok = _hf_trained(corpus, pre_tokenizers.ByteLevel(add_prefix_space=False), specials=[EOT])
    tok.post_processor = ByteLevelProcessor(trim_offsets=False)
    return tok


@pytest.fixture(scope="module")
def llama3(corpus):
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _hf_trained(corpus, pre, ignore_merges=True, specials=[BOT, "<|end_of_text|>", "<|reserved_0|>"])
    tok.post_processor = TemplateProcessing(single=f"{BOT} $A", special_tokens=[(BOT, tok.token_to_id(BOT))])
    return tok


def _ids_equal(enc, tok, texts, special):
    for k, t in enumerate(texts):
        a = enc.encode([t], np.uint32)[1].tolist()
        assert a == tok.encode(t, add_special_tokens=special).ids, f"text {k}: {t[:60]!r}"


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
@pytest.mark.parametrize("special", [False, True])
def test_hf_byte_level_bpe_runs_on_tiktoken_with_the_same_ids(request, corpus, name, special):
    tok = request.getfixturevalue(name)
    spec = choose_encoder(tok, special, corpus[:5])
    assert spec.engine == "tiktoken", spec.note
    _ids_equal(spec.make(), tok, corpus, special)
    if name == "llama3":
        assert spec.bpe.pat_str == LLAMA3 and spec.bpe.prefix == (tok.token_to_id(BOT),)
    else:
        assert spec.bpe.pat_str == tb.GPT2_PATTERN and tok.token_to_id(EOT) in spec.bpe.special.values()
    inside = tok.encode(f"a{EOT}b" if name == "gpt2" else f"a{BOT}b", add_special_tokens=False).ids
    assert inside[1] in spec.bpe.special.values()  # HF matches the special token inside the text: so does tiktoken


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_prepare_with_an_hf_tokenizer_uses_tiktoken_and_writes_hf_ids(tmp_path, request, corpus, name):
    tok = request.getfixturevalue(name)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    m = prepare(tmp_path / "in.jsonl", tmp_path / "out", tokenizer=str(tmp_path / "tokenizer.json"), workers=2,
                shard_mb=0.05, progress=False, add_special_tokens=True)
    assert m["tokenizer"]["engine"] == "tiktoken" and "exact" in m["tokenizer"]["engine_note"]
    src = open_tokens(tmp_path / "out")
    for i, t in enumerate(corpus):
        assert src.tokens(i).tolist() == tok.encode(t, add_special_tokens=True).ids, f"document {i}"


def test_trained_tokenizer_json_loads_in_hf_and_transformers_with_tiktokens_ids(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    m = prepare(tmp_path / "in.jsonl", tmp_path / "out", train_tokenizer=1500, workers=1, progress=False)
    assert m["tokenizer"]["engine"] == "tiktoken" and m["vocab_size"] == 1500
    path = str(tmp_path / "out" / "tokenizer.json")
    hf = Tokenizer.from_file(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    bpe = tb.to_tiktoken(hf)
    assert bpe.special == {EOT: 1499} and len(bpe.ranks) == 1499
    enc = bpe.encoding()
    src = open_tokens(tmp_path / "out")
    for i, t in enumerate(corpus):
        want = enc.encode(t, allowed_special="all")
        assert src.tokens(i).tolist() == want, f"document {i}"
        assert hf.encode(t).ids == want and fast(t, add_special_tokens=False)["input_ids"] == want, f"document {i}"
    assert fast.decode(enc.encode(corpus[0])) == corpus[0]
    assert hf.encode(f"x{EOT}y").ids[1] == 1499  # the special token inside text, as tiktoken with allowed_special


def test_training_is_deterministic_and_round_trips(corpus):
    a, b = train_bpe(iter(corpus), 700), train_bpe(iter(corpus), 700)
    assert a.to_str() == b.to_str()
    bpe = tb.to_tiktoken(a)
    again = tb.from_tiktoken(bpe.pat_str, bpe.ranks, bpe.special)
    assert again.to_str() == a.to_str()


def _json_edit(tok, edit):
    j = json.loads(tok.to_str())
    edit(j)
    return Tokenizer.from_str(json.dumps(j))


def _swap_merges(j):
    j["model"]["merges"][5], j["model"]["merges"][40] = j["model"]["merges"][40], j["model"]["merges"][5]


def _with(tok, **attrs):
    t = Tokenizer.from_str(tok.to_str())
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


def _added(tok, *tokens):
    t = Tokenizer.from_str(tok.to_str())
    t.add_special_tokens(list(tokens))
    return t


def _split(pattern):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# (name, tokenizer from the GPT-2-style one, fragment of the reason HF runs instead)
NOT_EXACT = [
    ("normalizer", lambda g: _with(g, normalizer=normalizers.NFC()), "a normalizer (NFC)"),
    ("prefix space", lambda g: _with(g, pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True)),
     "adds a prefix space"),
    ("whitespace split", lambda g: _with(g, pre_tokenizer=pre_tokenizers.Whitespace()), "pre-tokenizer 'Whitespace'"),
    ("lstrip added token", lambda g: _added(g, AddedToken("<mask>", lstrip=True, special=True)), "strips spaces"),
    ("nested added tokens", lambda g: _added(g, "<|end", "<|endoftext|>x"), "is inside added token"),
    ("merge order", lambda g: _json_edit(g, _swap_merges), "merge order is not id order"),
    ("non-byte-level token", lambda g: _json_edit(g, lambda j: j["model"]["vocab"].update({"€uro": 5000})),
     "is not spelled in byte-level characters"),
    ("regex dialects differ", lambda g: _with(g, pre_tokenizer=_split(r"\w+$|\w|\s+|[^\w\s]+")),
     "the ids differ from HF's"),
    ("regex drops text", lambda g: _with(g, pre_tokenizer=_split(r"\w+| ")), "the ids differ from HF's"),
]


@pytest.mark.parametrize("name,make,reason", NOT_EXACT, ids=[c[0] for c in NOT_EXACT])
def test_hf_runs_when_tiktoken_is_not_exact(tmp_path, gpt2, corpus, name, make, reason):
    tok = make(gpt2)
    spec = choose_encoder(tok, False, corpus[:3])
    assert spec.engine == "hf" and reason in spec.note, spec.note
    with pytest.raises(ValueError, match=f"engine=tiktoken: this tokenizer cannot run on tiktoken.*{reason[:12]}"):
        choose_encoder(tok, False, corpus[:3], engine="tiktoken")
    tok.save(str(tmp_path / "t.json"))
    texts = corpus[:4] + corpus[-12:]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    m = prepare(tmp_path / "in.jsonl", tmp_path / "out", tokenizer=str(tmp_path / "t.json"), workers=1, progress=False)
    assert m["tokenizer"]["engine"] == "hf" and reason in m["tokenizer"]["engine_note"]
    src, hf = open_tokens(tmp_path / "out"), load_tokenizer(tmp_path / "t.json")
    for i, t in enumerate(texts):
        assert src.tokens(i).tolist() == hf.encode(t, add_special_tokens=False).ids


def test_not_bpe_and_forced_hf(tmp_path, gpt2, corpus):
    wl = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    assert "model 'WordLevel', not BPE" in choose_encoder(wl, False, []).note
    spec = choose_encoder(gpt2, False, [], engine="hf")
    assert spec.engine == "hf" and "engine=hf requested" in spec.note


def test_truncation_in_the_tokenizer_json_never_cuts_documents(tmp_path, gpt2, corpus):
    tok = Tokenizer.from_str(gpt2.to_str())
    tok.enable_truncation(max_length=8)
    tok.save(str(tmp_path / "t.json"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": corpus[0]}) + "\n")
    for engine in ("hf", "auto"):
        prepare(tmp_path / "in.jsonl", tmp_path / engine, tokenizer=str(tmp_path / "t.json"), workers=1,
                progress=False, engine=engine)
        assert open_tokens(tmp_path / engine).tokens(0).tolist() == gpt2.encode(corpus[0]).ids
