"""Which documents does lengen-eval score, and which text hides the passkeys? Both in the model's own tokens.

Two sources:
  - a ``lengen-data prepare`` directory (``--data``): its manifest must record the model's tokenizer (same
    fingerprint), else the run is refused naming both tokenizers; its token ids are then used as they are;
  - the embedded corpus (default): whole files of the Python standard library, tokenized here with the model's
    tokenizer (a BOS is prepended when the tokenizer adds one). Files are taken in a fixed order: first those
    ``lengen-train lm`` holds out from training (so our own checkpoints are scored on unseen text), then the rest,
    each group ordered by a hash of the path.
Loss documents are the first ``docs`` that reach the last bucket (more than its start + 1 tokens); when fewer do,
the longest of those that reach past L fill in (the report gives the count per bucket). Each is cut to
``max_len + 1`` tokens. The haystack is every scanned document concatenated, at least twice the longest prompt.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import EvalError

HELDOUT_FRAC = 0.05  # lengen-train lm's default hold-out fraction of files (corpus.heldout_frac)


@dataclass
class Documents:
    docs: list[np.ndarray]            # int64 token ids, each <= max_len + 1 tokens
    names: list[str]                  # file path (embedded) or "doc <index>" (prepared)
    haystack: np.ndarray              # int64 token stream for passkey haystacks
    source: str
    bos: int | None                   # prepended to passkey prompts as to documents
    notes: list[str] = field(default_factory=list)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the fast backend when there is one: no length warnings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one by default (Llama-style), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # noqa: BLE001 - tokenizers without __call__ defaults: no BOS
        return None
    return bos if ids[:1] == [bos] else None


def _heldout_rule():
    """lengen-train's one hold-out rule for the embedded corpus (train.corpus.heldout_mask over stdlib paths), so our
    checkpoints are scored on files they never trained on."""
    from ..train.corpus import heldout_mask
    return lambda rel: bool(heldout_mask([rel], HELDOUT_FRAC)[0])


def _stdlib_order() -> tuple[list[Path], list[str], bool]:
    from ..data.corpus import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    rule = _heldout_rule()
    files = stdlib_files()
    rels = [str(f.relative_to(root)) for f in files]
    key = [(0 if rule and rule(r) else 1, hashlib.sha256(r.encode()).hexdigest()) for r in rels]
    order = sorted(range(len(files)), key=key.__getitem__)
    held = sum(1 for k in key if k[0] == 0)
    return [files[i] for i in order], [rels[i] for i in order], held > 0


def _pick(lengths: list[int], n_docs: int, need_last: int, need_ood: int) -> list[int]:
    """Indices (in scan order) of the loss documents: those reaching the last bucket, then the longest others."""
    full = [i for i, n in enumerate(lengths) if n >= need_last][:n_docs]
    if len(full) < n_docs:
        rest = sorted((i for i, n in enumerate(lengths) if need_ood <= n < need_last), key=lambda i: -lengths[i])
        full += rest[:n_docs - len(full)]
    return sorted(full)


def load_documents(tokenizer, *, data: str, n_docs: int, context: int, max_len: int, last_start: int,
                   haystack_len: int, seed: int) -> Documents:
    """Loss documents and a passkey haystack (see module doc). last_start: the last bucket's first position."""
    bos = bos_id(tokenizer)
    lead = [bos] if bos is not None else []
    need_last, need_ood = last_start + 2, context + 2   # a doc scores position p when it holds p + 2 tokens
    if data:
        return _from_prepared(Path(data), tokenizer, lead, n_docs, max_len, need_last, need_ood, haystack_len, seed)
    files, rels, has_held = _stdlib_order()
    toks, names, hay, hay_n = [], [], [], 0
    n_full = 0
    for f, rel in zip(files, rels):
        if n_full >= n_docs and hay_n >= haystack_len:
            break
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if len(text.encode("utf-8")) + len(lead) < need_ood and hay_n >= haystack_len:
            continue  # cannot be a loss document (tokens <= bytes for byte-level tokenizers) and no haystack needed
        ids = np.asarray(lead + encode(tokenizer, text), dtype=np.int64)
        if hay_n < haystack_len:
            hay.append(ids[len(lead):])
            hay_n += ids.size - len(lead)
        if ids.size >= need_ood:
            toks.append(ids[:max_len + 1])
            names.append(rel)
            n_full += ids.size >= need_last
    keep = _pick([t.size for t in toks], n_docs, need_last, need_ood)
    if not keep:
        raise EvalError(f"no file of the embedded corpus reaches {need_ood} tokens (L + 2, L = {context}) with this "
                        "tokenizer; pass --data with longer documents or a smaller --context")
    notes = [] if has_held else ["lengen-train's hold-out rule was not importable: files are in hash order only"]
    root = Path(sysconfig.get_paths()["stdlib"]).name
    hay = np.concatenate(hay) if hay else np.zeros(0, dtype=np.int64)
    return Documents([toks[i] for i in keep], [names[i] for i in keep], hay,
                     f"embedded corpus: Python standard library files ({root}), tokenized with the model's tokenizer",
                     bos, notes)


def _from_prepared(path: Path, tokenizer, lead, n_docs, max_len, need_last, need_ood, haystack_len, seed) -> Documents:
    from ..data.prepare import check_manifest, load_tokenizer, read_manifest, tokenizer_fingerprint
    from ..data.source import MANIFEST_NAME, open_tokens

    try:
        m = read_manifest(path)
        theirs = m["tokenizer"]
        mine = tokenizer_fingerprint(load_tokenizer(tokenizer), bool(theirs.get("add_special_tokens")))
        if mine != theirs.get("fingerprint"):
            raise EvalError(f"--data {str(path)!r}: {MANIFEST_NAME} says the corpus was tokenized with "
                            f"{theirs.get('source')!r} (fingerprint {theirs.get('fingerprint')}), but the model's "
                            f"tokenizer is {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} "
                            f"(fingerprint {mine}); the token ids would mean other text. Prepare the corpus with "
                            "`lengen-data prepare --tokenizer MODEL_DIR`")
        check_manifest(path)
        src = open_tokens(path)
    except (ValueError, OSError, TypeError) as e:
        if isinstance(e, EvalError):
            raise
        raise EvalError(f"--data {str(path)!r}: {e}") from e
    lengths = np.asarray(src.lengths, dtype=np.int64) + len(lead)
    order = np.random.default_rng(seed).permutation(len(src))
    cand = order[lengths[order] >= need_ood]
    keep_pos = _pick(lengths[cand].tolist(), n_docs, need_last, need_ood)
    if not keep_pos:
        raise EvalError(f"--data {str(path)!r}: no document reaches {need_ood} tokens (L + 2); use longer documents "
                        "or a smaller --context")
    keep = [int(cand[i]) for i in keep_pos]
    docs = [np.asarray(lead + src.tokens(i)[:max_len + 1 - len(lead)].tolist(), dtype=np.int64) for i in keep]
    hay, n = [], 0
    for i in order:
        if n >= haystack_len:
            break
        t = np.asarray(src.tokens(int(i)), dtype=np.int64)
        hay.append(t)
        n += t.size
    return Documents(docs, [f"doc {i}" for i in keep], np.concatenate(hay) if hay else np.zeros(0, np.int64),
                     f"prepared directory {str(path)!r} (tokenizer checked against the manifest)",
                     lead[0] if lead else None)
