"""Can a HF byte-level BPE run on tiktoken with the same ids, and how do the two formats map onto each other?

tiktoken encodes 3-5x faster than HF ``tokenizers`` on one core, but it knows one kind of tokenizer: a regex
split; then byte-level BPE in which a pair merges when its concatenation is a token, lowest rank (= id) first,
and a piece that is itself a token is taken whole; special tokens are matched in the text before the split.
A HF ``tokenizer.json`` maps onto that when all of these hold (:func:`to_tiktoken` checks each and raises
:class:`NotExact` naming the first that fails):
  - model BPE over byte-level tokens (GPT-2's byte -> unicode table), all 256 bytes present, no dropout,
    subword prefix/suffix or byte fallback;
  - the merges are in the id order of the tokens they make, and every multi-byte token is made by a merge;
  - no normalizer; pre-tokenizer ByteLevel(use_regex=True) (the GPT-2 regex) or Split(Regex, isolated)
    followed by ByteLevel(use_regex=False), without a prefix space;
  - added tokens are plain strings (no lstrip, rstrip or single_word), none inside another;
  - ``ignore_merges``, or else every token's own bytes encode to that token through the merges;
  - the post-processor only puts fixed ids before and after a document.
These are necessary, not sufficient (tiktoken may merge a pair whose concatenation is a token where HF's merge
list lacks that pair, and the two regex engines may disagree on rare characters), so ``prepare`` also compares
the ids on :func:`probe_texts` and on a sample of the corpus before it uses tiktoken (``tokenizer.py``).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

# HF tokenizers' ByteLevel(use_regex=True) split, verbatim (tokenizers/src/pre_tokenizers/byte_level.rs)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class NotExact(ValueError):
    """This tokenizer cannot be run on tiktoken with provably the same ids; the message says why."""


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table: every byte as a printable character (how byte-level BPE vocabularies are spelled)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def spell(token: bytes) -> str:
    """A token's bytes as the HF vocabulary writes them."""
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


@dataclass(frozen=True)
class TiktokenBPE:
    """What tiktoken needs: the split regex, ranks (token bytes -> id), special tokens (str -> id), and the ids
    the tokenizer's template puts before/after each document when special tokens are added."""
    pat_str: str
    ranks: dict = field(repr=False)
    special: dict = field(default_factory=dict)
    prefix: tuple = ()
    suffix: tuple = ()
    template_ok: bool = True  # False: the template is not fixed ids around the document (add_special_tokens=False only)

    def encoding(self):
        import tiktoken
        return tiktoken.Encoding(name="lengen", pat_str=self.pat_str, mergeable_ranks=self.ranks,
                                 special_tokens=self.special)

    @property
    def vocab_size(self) -> int:
        return max([*self.ranks.values(), *self.special.values()]) + 1


def _pre_tokenizer_pattern(pre) -> str:
    """The single regex of a supported byte-level pre-tokenizer; NotExact otherwise."""
    if pre is None:
        raise NotExact("no pre-tokenizer (tiktoken needs a byte-level split)")
    t = pre.get("type")
    if t == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise NotExact("the ByteLevel pre-tokenizer adds a prefix space")
        if not pre.get("use_regex", True):
            raise NotExact("a ByteLevel pre-tokenizer without a split regex")
        return GPT2_PATTERN
    if t == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, bl = pre["pretokenizers"]
        if split.get("type") != "Split" or bl.get("type") != "ByteLevel":
            raise NotExact(f"pre-tokenizer Sequence[{split.get('type')}, {bl.get('type')}] (need [Split, ByteLevel])")
        pat = split.get("pattern") or {}
        if "Regex" not in pat:
            raise NotExact(f"a Split pre-tokenizer on a literal string {pat!r}, not a regex")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise NotExact(f"a Split pre-tokenizer with behavior {split.get('behavior')!r}, invert "
                           f"{split.get('invert')!r} (need Isolated, not inverted)")
        if bl.get("add_prefix_space") or bl.get("use_regex", True):
            raise NotExact("the ByteLevel step after Split adds a prefix space or splits again (use_regex)")
        return pat["Regex"]
    raise NotExact(f"pre-tokenizer {t!r} is not byte-level BPE's (ByteLevel, or Split + ByteLevel)")


def _merges(model: dict) -> list[tuple[str, str]]:
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            a, sep, b = m.partition(" ")
            if not sep:
                raise NotExact(f"merge {m!r} is not 'a b'")
            out.append((a, b))
        else:
            out.append((m[0], m[1]))
    return out


def to_tiktoken(tok) -> TiktokenBPE:
    """The tiktoken form of a ``tokenizers.Tokenizer``; :class:`NotExact` when a structural condition fails."""
    j = json.loads(tok.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise NotExact(f"model {model.get('type')!r}, not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise NotExact(f"the BPE model sets {key}={model[key]!r}")
    if model.get("byte_fallback"):
        raise NotExact("the BPE model uses byte_fallback (not byte-level tokens)")
    if j.get("normalizer") is not None:
        raise NotExact(f"a normalizer ({j['normalizer'].get('type')})")
    pat = _pre_tokenizer_pattern(j.get("pre_tokenizer"))
    u2b = unicode_to_byte()
    added = j.get("added_tokens") or []
    added_ids = {a["id"] for a in added}
    ranks: dict[bytes, int] = {}
    for s, i in model["vocab"].items():
        if i in added_ids:
            continue  # GPT-2 lists <|endoftext|> in both; it is matched as a special token
        try:
            ranks[bytes(u2b[c] for c in s)] = i
        except KeyError:
            raise NotExact(f"vocabulary token {s!r} (id {i}) is not spelled in byte-level characters") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise NotExact(f"{len(missing)} of the 256 bytes have no token (first: byte {missing[0]})")
    if len(set(ranks.values())) != len(ranks):
        raise NotExact("two vocabulary tokens share an id")
    # merge order must be the id order of the merged tokens (tiktoken ranks a pair by the id it makes)
    made: set[bytes] = set()
    last = -1
    for k, (a, b) in enumerate(_merges(model)):
        try:
            ab = bytes(u2b[c] for c in a + b)
        except KeyError:
            raise NotExact(f"merge {k} ({a!r}, {b!r}) is not byte-level") from None
        i = ranks.get(ab)
        if i is None:
            raise NotExact(f"merge {k} ({a!r}, {b!r}) makes a token that is not in the vocabulary")
        if i < last:
            raise NotExact(f"merge {k} ({a!r}, {b!r}) makes id {i} after a merge made id {last}: merge order is not "
                           "id order")
        last = i
        made.add(ab)
    orphan = next((t for t in ranks if len(t) > 1 and t not in made), None)
    if orphan is not None:
        raise NotExact(f"vocabulary token {spell(orphan)!r} (id {ranks[orphan]}) is made by no merge")
    special = {}
    for a in added:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise NotExact(f"added token {a['content']!r} strips spaces or matches single words only")
        if not a["content"]:
            raise NotExact("an empty added token")
        special[a["content"]] = a["id"]
    for s in special:
        inner = next((o for o in special if o != s and o in s), None)
        if inner is not None:
            raise NotExact(f"added token {inner!r} is inside added token {s!r} (the two matchers may differ)")
    if set(special.values()) & set(ranks.values()):
        raise NotExact("an added token shares its id with a vocabulary token")
    if not model.get("ignore_merges"):
        # tiktoken takes a piece that is a token whole; HF merges it: they agree when merging reaches the token
        bpe = tok.model
        for t, i in ranks.items():
            if len(t) > 1:
                got = [x.id for x in bpe.tokenize(spell(t))]
                if got != [i]:
                    raise NotExact(f"token {spell(t)!r} (id {i}) does not encode to itself through the merges "
                                   f"({got})")
    prefix, suffix, ok = _template(tok)
    return TiktokenBPE(pat, ranks, special, prefix, suffix, ok)


def _template(tok) -> tuple[tuple, tuple, bool]:
    """(ids before, ids after, True) when the post-processor wraps every document in fixed ids."""
    found = set()
    for text in ("", "a", "hello world", " x\n"):
        plain = tok.encode(text, add_special_tokens=False).ids
        wrapped = tok.encode(text, add_special_tokens=True).ids
        n = len(plain)
        cuts = [k for k in range(len(wrapped) - n + 1) if wrapped[k:k + n] == plain]
        if not cuts:
            return (), (), False
        found.add(tuple((tuple(wrapped[:k]), tuple(wrapped[k + n:])) for k in cuts))
    common = set.intersection(*(set(f) for f in found))
    if len(common) != 1:
        return (), (), False
    prefix, suffix = common.pop()
    return prefix, suffix, True


def from_tiktoken(pat_str: str, ranks: dict, special: dict):
    """A ``tokenizers.Tokenizer`` (GPT-2/Llama-3 style tokenizer.json) that encodes as tiktoken does.

    Merges: every split (l, r) of a token into two tokens, ordered by the id of the token made, then by the ids
    of l and r (the Llama-3 conversion); ``ignore_merges`` takes a piece that is a token whole, as tiktoken does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {spell(t): i for t, i in ranks.items()}
    merges = []
    for t, i in sorted(ranks.items(), key=lambda kv: kv[1]):
        local = [(ranks[t[:k]], ranks[t[k:]], t[:k], t[k:]) for k in range(1, len(t))
                 if t[:k] in ranks and t[k:] in ranks]
        merges += [(spell(a), spell(b)) for _, _, a, b in sorted(local)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    for s, i in sorted(special.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)])
        if tok.token_to_id(s) != i:
            raise ValueError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i} (special ids must follow "
                             "the vocabulary without gaps)")
    return tok


def probe_texts(special=()) -> list[str]:
    """Strings where regex engines and BPE variants tend to differ: whitespace runs, odd spaces, contractions,
    digits, scripts, emoji, and the special tokens inside text."""
    out = ["", " ", "  ", "\n", "\n\n  \n", "a  b", "a \n b", "x   ", "\t\tdef f():\n\t\treturn 1\n",
           "I'm you'll they've we're it's DON'T He'S", "1234567 3.14159 12,345", "héllo wörld ñ ç",
           "数据处理 テスト 한국어", "Привет мир", "emoji 🤗👍🏽 ok", "\u00a0nbsp\u2009thin\u3000ideo\u200bzw",
           "tabs\x0bvt\x0cff\x85nel\u2028ls", "a\r\nb\rc", "!!!??? ... ---", "'s's't", "   leading", "trailing   "]
    for s in special:
        out += [f"x{s}y", f"{s}", f" {s} ", f"a{s}{s}b"]
    return out
