"""What does the model train and get tested on? Synthetic length-generalization tasks as token documents,
plus natural text.

A document is ``[BOS, TASK, prompt..., SEP, answer..., EOS]`` with a loss mask that is 1 on the
answer and EOS tokens (the tokens the model must predict). ``n`` is the problem size (items, bits,
digits, filler tokens), and the document length is an exact function of ``(task, n)``: every
evaluation document at one length has the same shape, so a batch of them needs no padding.

Train/val/test separation by a hash of the prompt: 1/EVAL_MOD of the hash space is evaluation-only
(training generation rejects those prompts), and that share is split in two halves, validation
(checkpoint selection, early stopping) and test (reported). So the three splits are disjoint at every
length. Evaluation sets hold distinct prompts; where a split's share of the prompt space at some n is
smaller than ``eval_examples`` (e.g. majority at n=8: 186 prompts, about 12 per split), the set holds
all of them that a bounded search finds, and ``EvalSet.distinct`` says how many.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # config imports this module's TASKS; a runtime import back would be a cycle
    from .config import TaskConfig

TASKS = ("copy_unique", "copy_repeat", "reverse", "parity", "majority", "addition", "passkey", "text")
PAD, BOS, SEP, EOS, PLUS, KEY, QUERY = range(7)
TASK_IDS = {name: 8 + i for i, name in enumerate(TASKS)}
FILL0, N_FILL = 16, 8          # filler tokens for passkey
DIGIT0 = 24                    # digits 0..9 (bits are digits 0/1)
SYM0 = 34                      # alphabet symbols; index-hint tokens follow them
EVAL_MOD = 8
SYNTHESIS = ("parity", "majority", "addition")
RETRIEVAL = ("passkey",)
EMBEDDED_FILES = 400           # stdlib files of the embedded corpus used for text (a few MB of bytes)
REPEAT_ALPHABET = 4            # copy_repeat draws from this many symbols, so repeats are frequent


def text_base(cfg: TaskConfig) -> int:
    """First token id of natural text (text ids are offset by this)."""
    return SYM0 + 2 * cfg.alphabet


def hint(i: int, cfg: TaskConfig) -> int:
    if i >= cfg.alphabet:
        raise ValueError(f"index_hints need alphabet > {i} (alphabet={cfg.alphabet})")
    return SYM0 + cfg.alphabet + i


def doc_tokens(task: str, n: int, cfg: TaskConfig) -> int:
    """Exact token length of a document of ``task`` at problem size ``n``."""
    if task in ("copy_unique", "copy_repeat", "reverse"):
        body = 2 * n
    elif task == "parity":
        body = n + (n if cfg.scratchpad else 1)
    elif task == "majority":
        body = n + 1
    elif task == "addition":
        w = 2 if cfg.index_hints else 1
        body = w * (2 * n) + 1 + w * (n + 1) + (n + 1 if cfg.scratchpad else 0)
    elif task == "passkey":
        body = n + cfg.passkey_digits + 2 + 1 + cfg.passkey_digits
    elif task == "text":
        return n
    else:
        raise ValueError(f"unknown task {task!r}")
    return body + 4  # BOS, TASK, SEP, EOS


def _prompt_answer(task: str, n: int, rng: np.random.Generator, cfg: TaskConfig) -> tuple[list, list]:
    a = cfg.alphabet
    if task == "copy_unique":
        if n > a:
            raise ValueError(f"copy_unique with n={n} needs alphabet >= n (alphabet={a})")
        s = (SYM0 + rng.permutation(a)[:n]).tolist()
        return s, s
    if task == "copy_repeat":
        s = (SYM0 + rng.integers(0, min(a, REPEAT_ALPHABET), n)).tolist()
        return s, s
    if task == "reverse":
        s = (SYM0 + rng.integers(0, a, n)).tolist()
        return s, s[::-1]
    if task == "parity":
        bits = rng.integers(0, 2, n)
        run = np.cumsum(bits) % 2
        ans = run if cfg.scratchpad else run[-1:]
        return (DIGIT0 + bits).tolist(), (DIGIT0 + ans).tolist()
    if task == "majority":
        while True:  # resample ties so the answer is defined
            bits = rng.integers(0, 2, n)
            if 2 * bits.sum() != n:
                break
        return (DIGIT0 + bits).tolist(), [DIGIT0 + int(2 * bits.sum() > n)]
    if task == "addition":
        x, y = rng.integers(0, 10, n), rng.integers(0, 10, n)   # little-endian digits
        out, carries, c = [], [], 0
        for i in range(n):
            s = int(x[i]) + int(y[i]) + c
            out.append(s % 10)
            c = s // 10
            carries.append(c)
        out.append(c)
        carries.append(0)

        def digits(ds):
            return [tok for i, d in enumerate(ds)
                    for tok in ((hint(i, cfg), DIGIT0 + int(d)) if cfg.index_hints else (DIGIT0 + int(d),))]
        ans = []
        for i, d in enumerate(out):
            ans += ([hint(i, cfg)] if cfg.index_hints else []) + [DIGIT0 + d]
            if cfg.scratchpad:
                ans.append(DIGIT0 + carries[i])
        return digits(x) + [PLUS] + digits(y), ans
    if task == "passkey":
        key = (DIGIT0 + rng.integers(0, 10, cfg.passkey_digits)).tolist()
        fill = (FILL0 + rng.integers(0, N_FILL, n)).tolist()
        p = int(rng.integers(0, n + 1))
        return fill[:p] + [KEY] + key + [KEY] + fill[p:] + [QUERY], key
    raise ValueError(f"unknown task {task!r}")


def chance(task: str, cfg: TaskConfig) -> float:
    """Exact-match accuracy of guessing the answer (before EOS) uniformly."""
    if task == "majority" or (task == "parity" and not cfg.scratchpad):
        return 0.5
    if task == "passkey":
        return 0.1 ** cfg.passkey_digits
    return 0.0


def prompt_split(task: str, prompt: list) -> str:
    """"train", "val" or "test": the split a prompt belongs to, by hash (disjoint at every length)."""
    h = zlib.crc32(np.asarray(prompt, dtype=np.int32).tobytes(), TASK_IDS[task])
    if h % EVAL_MOD:
        return "train"
    return "val" if (h // EVAL_MOD) % 2 == 0 else "test"


def is_eval_prompt(task: str, prompt: list) -> bool:
    return prompt_split(task, prompt) != "train"


def _document(task: str, prompt: list, answer: list) -> tuple[np.ndarray, np.ndarray]:
    toks = [BOS, TASK_IDS[task]] + prompt + [SEP] + answer + [EOS]
    mask = np.zeros(len(toks), dtype=np.uint8)
    mask[len(prompt) + 3:] = 1
    return np.asarray(toks, dtype=np.int32), mask


def make_example(task: str, n: int, rng: np.random.Generator, cfg: TaskConfig, split: str,
                 max_tries: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """One document of ``task`` at size ``n`` from ``split`` ("train", "val", "test", or "eval" = val or test).

    Returns tokens (L,) int32 and loss_mask (L,) int8, 1 where the token is a target (answer + EOS).
    """
    for _ in range(max_tries):
        prompt, answer = _prompt_answer(task, n, rng, cfg)
        got = prompt_split(task, prompt)
        if got == split or (split == "eval" and got != "train"):
            return _document(task, prompt, answer)
    raise ValueError(f"could not draw a {split} example of {task} at n={n} in {max_tries} tries "
                     "(the prompt space is too small to split train/val/test)")


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@dataclass
class EvalSet:
    """Same-length evaluation documents of one task at one size: tokens and loss mask (B, L), B distinct prompts."""
    task: str
    n: int
    tokens: np.ndarray
    loss_mask: np.ndarray
    requested: int = 0

    @property
    def distinct(self) -> int:
        return int(self.tokens.shape[0])


DRAWS_PER_EXAMPLE = 64   # search budget: draws per requested example before a split counts as exhausted


_EVAL_CACHE: dict = {}   # the plan's checks and the experiment build the same sets; arrays are read-only


def eval_set(task: str, n: int, cfg: TaskConfig, seed: int, split: str) -> EvalSet:
    """Up to ``cfg.eval_examples`` distinct prompts of ``split`` ("val": selection; "test": reported).

    Raises ValueError when the split holds no prompt at n (the prompt space is empty there).
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    key = (repr(cfg), task, n, seed, split)
    if key not in _EVAL_CACHE:
        if len(_EVAL_CACHE) > 256:
            _EVAL_CACHE.clear()
        _EVAL_CACHE[key] = _eval_set(task, n, cfg, seed, split)
    return _EVAL_CACHE[key]


def _eval_set(task: str, n: int, cfg: TaskConfig, seed: int, split: str) -> EvalSet:
    rng = np.random.default_rng(_seed("eval", split, task, n, seed))
    seen, docs = set(), []
    for _ in range(DRAWS_PER_EXAMPLE * cfg.eval_examples):
        prompt, answer = _prompt_answer(task, n, rng, cfg)
        key = tuple(prompt)
        if key in seen or prompt_split(task, prompt) != split:
            continue
        seen.add(key)
        docs.append(_document(task, prompt, answer))
        if len(docs) == cfg.eval_examples:
            break
    if not docs:
        raise ValueError(f"task {task!r} has no {split} prompts at n={n}: the prompt space there is too small "
                         f"to hold disjoint train/val/test prompts (found none in "
                         f"{DRAWS_PER_EXAMPLE * cfg.eval_examples} draws); use larger eval_multiples or "
                         "train_max_len")
    tokens, mask = np.stack([d[0] for d in docs]), np.stack([d[1] for d in docs])
    tokens.flags.writeable = mask.flags.writeable = False
    return EvalSet(task, n, tokens, mask, cfg.eval_examples)


def train_documents(cfg: TaskConfig, seed: int, text_docs: list[np.ndarray] | None = None
                    ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The training documents (tokens, loss masks, task names), tasks interleaved at random.

    Sizes are uniform in [train_min_len, train_max_len]; text documents (already token arrays,
    offset into our vocabulary) get a full loss mask.
    """
    rng = np.random.default_rng(_seed("train", seed))
    toks, masks, names = [], [], []
    for task in cfg.tasks:
        if task == "text":
            for d in text_docs or []:
                toks.append(d.astype(np.int32))
                masks.append(np.ones(len(d), dtype=np.uint8))
                names.append(task)
            continue
        for _ in range(cfg.train_examples):
            t, m = make_example(task, int(rng.integers(cfg.train_min_len, cfg.train_max_len + 1)), rng, cfg, "train")
            toks.append(t)
            masks.append(m)
            names.append(task)
    order = rng.permutation(len(toks))
    return [toks[i] for i in order], [masks[i] for i in order], [names[i] for i in order]


def train_table(cfg: TaskConfig, seed: int, text_docs: list[np.ndarray] | None = None, pad_pow2: bool = False,
                docs=None):
    """The training documents as an Arrow table (input_ids, loss_mask, task) for the data pipeline.

    ``pad_pow2`` (knob fit=pad) appends PAD tokens (loss mask 0) after EOS up to the next power of
    two, so that dataset decomposition keeps every example whole instead of cutting answers from
    prompts; the trainer counts those tokens as padding. ``docs``: :func:`train_documents`' output.
    """
    import pyarrow as pa

    toks, masks, names = docs if docs is not None else train_documents(cfg, seed, text_docs)
    if pad_pow2:
        grow = [(1 << (len(t) - 1).bit_length()) - len(t) for t in toks]
        toks = [np.concatenate([t, np.full(g, PAD, np.int32)]) for t, g in zip(toks, grow)]
        masks = [np.concatenate([m, np.zeros(g, np.uint8)]) for m, g in zip(masks, grow)]
    return pa.table({
        "input_ids": pa.array(toks, type=pa.list_(pa.int32())),
        "loss_mask": pa.array(masks, type=pa.list_(pa.uint8())),
        "task": pa.array(names, type=pa.string()),
    })


def auto_train_examples(cfg: TaskConfig, steps: int, tokens_per_batch: int) -> int:
    """Examples per task so that ``steps`` full batches of unpadded documents are about 0.8 of an epoch
    (arms compared at equal supervised tokens then see about the same documents, padded or not)."""
    tasks = [t for t in cfg.tasks if t != "text"]
    if not tasks:
        return 0
    sizes = range(cfg.train_min_len, cfg.train_max_len + 1)
    mean = np.mean([doc_tokens(t, n, cfg) for t in tasks for n in sizes])
    return int(np.ceil(1.25 * steps * tokens_per_batch / (len(tasks) * mean))) + 64


def max_train_doc_tokens(cfg: TaskConfig) -> int:
    return max(doc_tokens(t, cfg.train_max_len, cfg) if t != "text" else text_train_len(cfg) for t in cfg.tasks)


def text_train_len(cfg: TaskConfig) -> int:
    """Text documents are cut to the token length of a copy document at train_max_len (same scale)."""
    return doc_tokens("copy_unique", cfg.train_max_len, cfg)


@dataclass
class TextData:
    """Natural text split by document into train and held-out (eval) documents, ids offset by base."""
    train: list[np.ndarray]
    heldout: list[np.ndarray]
    vocab: int


def load_text(cfg: TaskConfig) -> TextData:
    """Documents from ``cfg.text_source`` (any source the data pipeline opens) or the embedded corpus (its first
    EMBEDDED_FILES stdlib files, cut into definitions), held out by the one corpus rule (corpus.heldout_mask)."""
    from .corpus import load_corpus
    c = load_corpus(cfg.text_source, heldout_frac=1 / EVAL_MOD, files=0 if cfg.text_source else EMBEDDED_FILES)
    base = text_base(cfg)
    train = [np.asarray(c.train.tokens(i), dtype=np.int64) + base for i in range(len(c.train))]
    train = [d for d in train if len(d) > 1]
    held = [np.asarray(d, dtype=np.int64) + base for d in c.heldout if len(d) > 1]
    if not train or not held:
        raise ValueError(f"text source {cfg.text_source or 'embedded corpus'!r} has no "
                         f"{'training' if not train else 'held-out'} documents")
    return TextData(train, held, int(c.vocab_size))


def text_pieces(docs: list[np.ndarray], lengths: tuple[int, int], count: int, seed: int) -> list[np.ndarray]:
    """``count`` consecutive pieces with lengths uniform in [lo, hi], cut from ``docs`` in order."""
    rng = np.random.default_rng(_seed("text", seed))
    stream = np.concatenate(docs)
    out, at = [], 0
    lo, hi = lengths
    while len(out) < count:
        n = int(rng.integers(lo, hi + 1))
        if at + n > len(stream):
            if at == 0:
                raise ValueError(f"text corpus ({len(stream)} tokens) is shorter than one piece of {n} tokens")
            at = 0
        out.append(stream[at:at + n].astype(np.int32))
        at += n
    return out


def text_eval(text: TextData, length: int, count: int, split: str) -> np.ndarray:
    """(count, length) windows of held-out text; val and test take alternate windows."""
    stream = np.concatenate(text.heldout)
    per = len(stream) // length
    if per < 2:
        raise ValueError(f"held-out text ({len(stream)} tokens) is too short for {length}-token eval windows")
    idx = np.arange(0 if split == "val" else 1, per, 2)[:count]
    return np.stack([stream[i * length:(i + 1) * length] for i in idx])
