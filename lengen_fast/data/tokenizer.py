"""Which tokenizer does ``prepare`` use, and which engine runs it: tiktoken when that gives HF's ids, else HF?

    tok = load_tokenizer("tokenizer.json")            # or a local directory, or a tokenizers/transformers object
    tok = train_bpe(texts, 8192)                      # rustbpe; a HF tokenizer.json that encodes as tiktoken does
    spec = choose_encoder(tok, add_special_tokens=False, sample=texts)
    spec.engine, spec.note                            # "tiktoken" | "hf", and why
    lengths, values = spec.make().encode(texts, np.uint16)   # in each worker: (n,) int64, (sum,) uint16

The tokenizer.json is the tokenizer of record (its fingerprint identifies the shards; HF and transformers load
it). tiktoken is only an engine: it runs when :func:`tiktoken_bpe.to_tiktoken` maps the tokenizer onto it and the
ids are equal to HF's on probe strings and on a sample of the corpus; otherwise HF ``tokenizers`` runs, and the
manifest and the log say which ran and why.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tiktoken_bpe import NotExact, TiktokenBPE, from_tiktoken, probe_texts, to_tiktoken

TOKENIZER_NAME = "tokenizer.json"
ENGINES = ("auto", "tiktoken", "hf")
_DTYPE_MAX = {"uint16": 1 << 16, "uint32": 1 << 32}
END_OF_TEXT = "<|endoftext|>"


def load_tokenizer(spec):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json path, a local directory, or an object.

    Directories go through ``AutoTokenizer.from_pretrained(..., local_files_only=True)`` and must
    hold a fast tokenizer; its backend (the same ids as the transformers tokenizer) is returned.
    """
    from tokenizers import Tokenizer
    if isinstance(spec, Tokenizer):
        return spec
    backend = getattr(spec, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a path to tokenizer.json, a local directory, or a tokenizers/"
                        f"transformers tokenizer; got {type(spec).__name__}")
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer: no such file or directory {str(path)!r} (only local tokenizers are "
                                "used; nothing is downloaded)")
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer: cannot read {str(path)!r} as a tokenizers JSON file: {e}") from e
    if (path / TOKENIZER_NAME).is_file() and not (path / "tokenizer_config.json").exists():
        return load_tokenizer(path / TOKENIZER_NAME)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; say which path failed
        raise ValueError(f"tokenizer: AutoTokenizer cannot load the directory {str(path)!r}: {e}") from e
    backend = getattr(tok, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(f"tokenizer: {str(path)!r} holds a slow (Python) tokenizer; prepare needs a fast one "
                         "(a tokenizer.json)")
    return backend


def tokenizer_fingerprint(tok, add_special_tokens: bool = False) -> str:
    """sha256 of the tokenizer's canonical JSON (vocabulary, merges, normalizer, template)."""
    h = hashlib.sha256(tok.to_str().encode())
    h.update(b"special" if add_special_tokens else b"plain")
    return h.hexdigest()[:32]


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens trained on an iterable of str, as a ``tokenizers.Tokenizer``.

    rustbpe learns ``vocab_size - 1`` tokens (256 bytes + merges) with its GPT-4-style split regex; ``<|endoftext|>``
    is the last id. Fewer when the corpus runs out of pairs to merge. Deterministic for the same texts.
    """
    try:
        import rustbpe
    except ImportError as e:
        raise ImportError("train_tokenizer needs the rustbpe package (pip install rustbpe)") from e
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - 1)
    ranks = dict(trainer.get_mergeable_ranks())
    return from_tiktoken(trainer.get_pattern(), ranks, {END_OF_TEXT: len(ranks)})


def token_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """The smallest of uint16/uint32 that holds ``vocab_size`` ids, or ``dtype`` after checking it fits."""
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= _DTYPE_MAX["uint16"] else "uint32"
    if vocab_size > _DTYPE_MAX[dtype]:
        raise ValueError(f"the tokenizer's vocabulary of {vocab_size:,} tokens is too large for dtype {dtype} "
                         f"(at most {_DTYPE_MAX[dtype]:,} ids)")
    return dtype


def without_limits(tok):
    """A copy that never truncates or pads: a tokenizer.json may carry a max_length that would cut documents."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tok.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


# -- the engine -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    """Picklable: which engine encodes, with what. ``make()`` builds the encoder in a worker."""
    engine: str                    # "tiktoken" | "hf"
    note: str                      # why this engine
    add_special_tokens: bool
    hf_json: str = ""              # engine hf: the tokenizer (truncation and padding off)
    bpe: TiktokenBPE | None = None  # engine tiktoken

    def make(self):
        return _Tiktoken(self) if self.engine == "tiktoken" else _HF(self)


class _Tiktoken:
    def __init__(self, spec: EncoderSpec):
        bpe = spec.bpe
        self.enc = bpe.encoding()
        self.allowed = self.enc.special_tokens_set  # HF matches added tokens inside the text; so does this
        self.wrap = spec.add_special_tokens and bool(bpe.prefix or bpe.suffix)
        self.prefix = np.asarray(bpe.prefix, np.uint32)
        self.suffix = np.asarray(bpe.suffix, np.uint32)
        # (V,) bytes each id spells: tiktoken silently drops text its split regex does not match, so every batch's
        # ids must spell exactly as many bytes as its text
        self.spelled = np.zeros(bpe.vocab_size, np.int64)
        for t, i in bpe.ranks.items():
            self.spelled[i] = len(t)
        for s, i in bpe.special.items():
            self.spelled[i] = len(s.encode("utf-8"))
        self.wrap_bytes = int(self.spelled[self.prefix].sum() + self.spelled[self.suffix].sum()) if self.wrap else 0

    def encode(self, texts: list[str], dtype, nbytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(lengths (n,) int64, ids (sum,) ``dtype``); encode_to_numpy skips the list of Python ints.
        ``nbytes``: the texts' UTF-8 bytes, checked against the bytes the ids spell."""
        arrs = [self.enc.encode_to_numpy(t, allowed_special=self.allowed, disallowed_special=()) for t in texts]
        if self.wrap:
            arrs = [np.concatenate([self.prefix, a, self.suffix]) for a in arrs]
        lengths = np.fromiter(map(len, arrs), dtype=np.int64, count=len(arrs))
        ids = np.concatenate(arrs) if arrs else np.zeros(0, np.uint32)
        if nbytes is not None:
            got = int(self.spelled[ids].sum()) - self.wrap_bytes * len(arrs)
            if got != nbytes:
                raise ValueError(f"tiktoken's ids spell {got} bytes for {nbytes} bytes of text: its split regex "
                                 "does not match every character; use engine='hf' (--engine hf)")
        return lengths, ids.astype(dtype, copy=False)


class _HF:
    def __init__(self, spec: EncoderSpec):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_str(spec.hf_json)
        self.add_special = spec.add_special_tokens

    def encode(self, texts: list[str], dtype, nbytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        import itertools
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        lengths, ids = [], []
        for a in range(0, len(texts), 1024):
            encs = [e.ids for e in encode(texts[a:a + 1024], add_special_tokens=self.add_special)]  # .ids: a new list
            n = [len(e) for e in encs]
            lengths += n
            ids.append(np.fromiter(itertools.chain.from_iterable(encs), dtype=dtype, count=sum(n)))
        return (np.asarray(lengths, dtype=np.int64),
                np.concatenate(ids) if ids else np.zeros(0, dtype))


def choose_encoder(tok, add_special_tokens: bool, sample: list[str], engine: str = "auto") -> EncoderSpec:
    """tiktoken when it gives HF's ids (structure checked, then ids compared on probe strings and ``sample``),
    else HF. ``engine="tiktoken"`` makes a failed check an error; ``"hf"`` skips tiktoken."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    tok = without_limits(tok)
    hf_json = tok.to_str()
    if engine == "hf":
        return EncoderSpec("hf", "HF tokenizers (engine=hf requested)", add_special_tokens, hf_json)
    try:
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            raise NotExact("tiktoken is not installed") from None
        bpe = to_tiktoken(tok)
        if add_special_tokens and not bpe.template_ok:
            raise NotExact("the post-processor does not put fixed ids around every document")
        spec = EncoderSpec("tiktoken", "", add_special_tokens, bpe=bpe)
        try:
            fast = spec.make()
        except ValueError as e:  # e.g. a regex that tiktoken's engine does not compile
            raise NotExact(f"tiktoken refuses the tokenizer: {e}") from None
        probes = probe_texts(bpe.special)
        for name, texts in (("probe string", probes), ("sampled document", sample)):
            for k, t in enumerate(texts):
                a = fast.encode([t], np.uint32)[1].tolist()
                b = tok.encode(t, add_special_tokens=add_special_tokens).ids  # one text: no HF thread pool
                if a != b:
                    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    raise NotExact(f"the ids differ from HF's on {name} {k} ({t[:40]!r}) at token {at}")
        mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in sample) / 1e6
        note = (f"tiktoken: exact (structure checked; ids equal to HF's on {len(probes)} probe strings and "
                f"{len(sample)} sampled documents, {mb:.2f} MB)")
        return EncoderSpec("tiktoken", note, add_special_tokens, bpe=bpe)
    except NotExact as e:
        if engine == "tiktoken":
            raise ValueError(f"engine=tiktoken: this tokenizer cannot run on tiktoken with HF's ids: {e}") from None
        return EncoderSpec("hf", f"HF tokenizers: not exact on tiktoken ({e})", add_special_tokens, hf_json)
