"""How are passkey prompts built offline, and how is the answer scored?

A prompt of exactly n = round(m * L) tokens (m in ``--multiples``), in the model's own tokens:

    [BOS] INTRO  haystack[:a]  NEEDLE  haystack[a:b]  QUESTION  ANSWER
    INTRO    "Find the pass key hidden in the text below and remember it.\\n"
    NEEDLE   "\\nThe pass key is 48213. Remember it. 48213 is the pass key.\\n"
    QUESTION "\\nWhat is the pass key? The pass key is"      ANSWER " 48213"

The haystack is corpus text (``documents.Documents.haystack``) from a seeded offset, so trials differ; ``a`` puts
the needle at the requested depth (0 = right after the intro, 1 = right before the question). Pieces are
tokenized separately and joined as token ids; the answer's ids are those the tokenizer gives after the question.
Keys are 5 random digits drawn from (seed, length, depth, trial), the same for every arm (paired comparisons).

Scoring: exact match of greedy decoding, computed with one teacher-forced forward: greedy decoding reproduces the
key iff at every answer position the argmax given the correct prefix is the correct token (if all are right the
decoded prefix stays the correct one; at the first wrong one the decoded output differs). The key's summed
negative log-likelihood is reported beside it (it still ranks arms when every one scores 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .documents import encode

INTRO = "Find the pass key hidden in the text below and remember it.\n"
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class Prompt:
    tokens: np.ndarray        # (n,) int64
    answer_start: int         # index of the first answer token
    answer_len: int
    multiple: float
    depth: float
    trial: int
    key: str


def answer_ids(tokenizer, key: str) -> list[int]:
    """The ids of " key" as the tokenizer writes them after QUESTION (split from the joint encoding when the
    question's ids are a prefix of it, else encoded alone)."""
    q = encode(tokenizer, QUESTION)
    qa = encode(tokenizer, QUESTION + " " + key)
    return qa[len(q):] if qa[:len(q)] == q and len(qa) > len(q) else encode(tokenizer, " " + key)


def prompt_overhead(tokenizer, bos: int | None) -> int:
    """Tokens of a prompt that are not haystack (for a 5-digit key)."""
    key = "12345"
    return (bos is not None) + len(encode(tokenizer, INTRO)) + len(encode(tokenizer, NEEDLE.format(key=key))) \
        + len(encode(tokenizer, QUESTION)) + len(answer_ids(tokenizer, key))


def build_prompts(tokenizer, haystack: np.ndarray, bos: int | None, context: int, multiples, depths, trials: int,
                  seed: int) -> tuple[list[Prompt], list[str]]:
    """Prompts for every (multiple, depth, trial) that fits; notes for lengths too short for the template."""
    intro = encode(tokenizer, INTRO)
    question = encode(tokenizer, QUESTION)
    lead = [bos] if bos is not None else []
    prompts, notes = [], []
    for mi, m in enumerate(multiples):
        n = int(round(m * context))
        for di, d in enumerate(depths):
            for t in range(trials):
                rng = np.random.default_rng([seed, mi, di, t])
                key = str(int(rng.integers(10_000, 100_000)))
                needle = encode(tokenizer, NEEDLE.format(key=key))
                answer = answer_ids(tokenizer, key)
                hay_len = n - len(lead) - len(intro) - len(needle) - len(question) - len(answer)
                if hay_len < 0:
                    note = (f"passkey at {m:g} x L = {n} tokens skipped: the template alone needs "
                            f"{n - hay_len} tokens")
                    if note not in notes:
                        notes.append(note)
                    continue
                if haystack.size < hay_len:
                    raise ValueError(f"passkey: the haystack holds {haystack.size} tokens, {hay_len} are needed")
                start = int(rng.integers(0, haystack.size - hay_len + 1))
                hay = haystack[start:start + hay_len]
                a = int(round(d * hay_len))
                toks = np.concatenate([np.asarray(lead + intro, dtype=np.int64), hay[:a], np.asarray(needle),
                                       hay[a:], np.asarray(question + answer)]).astype(np.int64)
                assert toks.size == n, (toks.size, n)
                prompts.append(Prompt(toks, n - len(answer), len(answer), m, d, t, key))
    return prompts, notes
