"""How is a model scored? Exact match, the validation score that selects checkpoints, per-document losses (validation
loss, loss by position), loss by distance from a document boundary, generalization gap, critical length, and the
early-stopping rule. (Whether a difference is real: stats.py.)

Exact match under greedy decoding is computed with ONE teacher-forced forward: greedy decoding
reproduces the answer iff, at every answer position, the argmax given the correct prefix is the
correct token (if all are right the decoded prefix stays the correct one; at the first wrong one
the decoded output differs). ``greedy_decode`` is the literal loop; a test checks they agree.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .arms import ArmConfig
from .tasks import EvalSet, chance

EVAL_TOKENS = 16384  # tokens per evaluation forward


def _uniform_layout(B: int, L: int):
    cu = torch.arange(B + 1, dtype=torch.int32) * L                                 # (B+1,)
    pos = torch.arange(L).repeat(B)                                                 # (B*L,)
    return cu, pos


@torch.no_grad()
def token_logits(model, tokens: np.ndarray) -> torch.Tensor:
    """Logits (B, L, V) for same-length documents (B, L), each its own sequence from position 0."""
    B, L = tokens.shape
    per = max(1, EVAL_TOKENS // L)
    out = []
    for i in range(0, B, per):
        t = torch.tensor(tokens[i:i + per], dtype=torch.int64)   # a copy: cached eval arrays are read-only
        cu, pos = _uniform_layout(t.shape[0], L)
        out.append(model(t.reshape(-1), cu, L, pos).view(t.shape[0], L, -1))
    return torch.cat(out)


@torch.no_grad()
def exact_match(model, es: EvalSet) -> tuple[float, float]:
    """(exact-match accuracy, per-token accuracy) on the answer tokens of ``es``."""
    was = model.training
    model.eval()
    logits = token_logits(model, es.tokens)
    model.train(was)
    pred = logits[:, :-1].argmax(-1).numpy()                                        # predicts token t+1
    tgt, m = es.tokens[:, 1:], es.loss_mask[:, 1:].astype(bool)
    ok = (pred == tgt) | ~m
    return float(ok.all(1).mean()), float(((pred == tgt) & m).sum() / m.sum())


@torch.no_grad()
def greedy_decode(model, prompts: np.ndarray, answer_len: int) -> np.ndarray:
    """Autoregressive greedy decoding of ``answer_len`` tokens after same-length prompts (B, P)."""
    was = model.training
    model.eval()
    seq = torch.tensor(prompts, dtype=torch.int64)               # a copy: prompts may be read-only
    for _ in range(answer_len):
        B, L = seq.shape
        cu, pos = _uniform_layout(B, L)
        nxt = model(seq.reshape(-1), cu, L, pos).view(B, L, -1)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    model.train(was)
    return seq[:, prompts.shape[1]:].numpy()


# ------------------------------------------------------------------------------------ documents
# Every document is scored alone (its own attention segment, positions from 0), many documents packed per forward
# through varlen attention, with the chunked loss so no (N, V) logits are held. RoPE scaling is passed per call:
# the model is never mutated.
def _doc_batches(docs: list[np.ndarray], max_tokens: int):
    """Lists of document indices whose total length is <= max_tokens (or one longer document)."""
    cur, n = [], 0
    for i, d in enumerate(docs):
        if cur and n + len(d) > max_tokens:
            yield cur
            cur, n = [], 0
        cur.append(i)
        n += len(d)
    if cur:
        yield cur


@torch.no_grad()
def token_losses(model, docs: list[np.ndarray], *, device=None, rope_scaling=None, autocast=None,
                 max_tokens: int = EVAL_TOKENS, loss_chunk: int = 4096) -> list[np.ndarray]:
    """Per-document next-token losses: a list of (len(doc) - 1,) float32 arrays, one per document."""
    device = device or distributed.context().device
    was = model.training
    model.eval()
    out: list[np.ndarray] = []
    for idx in _doc_batches(docs, max_tokens):
        parts = [np.asarray(docs[i], dtype=np.int64) for i in idx]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        cu = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        tokens = torch.from_numpy(np.concatenate(parts))                                 # (N,)
        labels = torch.full_like(tokens, -100)
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lens]))       # (N,)
        for a, b in zip(cu[:-1], cu[1:]):
            labels[a:b - 1] = tokens[a + 1:b]
        args = [t.to(device, non_blocking=True) for t in (tokens, torch.from_numpy(cu.astype(np.int32)),
                                                            positions, labels)]
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            loss = model(args[0], args[1], int(lens.max()), args[2], rope_scaling, labels=args[3],
                         loss_chunk=loss_chunk, reduction="none")                       # (N,)
        loss = loss.float().cpu().numpy()
        out += [loss[a:b - 1] for a, b in zip(cu[:-1], cu[1:])]
    model.train(was)
    return out


def validation_loss(model, docs: list[np.ndarray], **kw) -> float:
    """Mean next-token loss over all tokens of the (already cut) validation documents."""
    losses = token_losses(model, docs, **kw)
    return sum(float(x.sum()) for x in losses) / max(1, sum(x.shape[0] for x in losses))


def position_edges(context: int, multiples) -> list[int]:
    """Bucket edges 0, L, then m * L for every multiple m > 1 (sorted): buckets [0, L), [L, 2L), ..."""
    return [0, context] + [int(round(m * context)) for m in sorted(set(multiples)) if m > 1]


def choose_position_docs(heldout: list[np.ndarray], edges: list[int], per_bucket: int,
                         seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Held-out documents for loss by position: for every bucket [a, b), up to ``per_bucket`` documents
    that cover it whole (length >= b), else the longest ones that enter it (length > a), each cut at b;
    a document is used once, at the highest bucket that picked it (it also covers every bucket below).
    Returns (docs, notes about buckets that no held-out document reaches, or reaches only in part)."""
    rng = np.random.default_rng(seed)
    lens = np.array([len(d) for d in heldout], dtype=np.int64)
    used: set[int] = set()
    chosen: list[np.ndarray] = []
    notes = []
    longest = int(lens.max()) if lens.size else 0
    for a, b in reversed(list(zip(edges[:-1], edges[1:]))):
        free = np.array([i for i in range(len(heldout)) if i not in used], dtype=np.int64)
        full = free[lens[free] >= b] if free.size else free
        if full.size:
            pick = rng.permutation(full)[:per_bucket]
        else:
            part = free[lens[free] > a + 1] if free.size else free  # at least one target position >= a
            pick = part[np.argsort(-lens[part], kind="stable")][:per_bucket]
            if longest <= a + 1:
                notes.append(f"no held-out document is longer than {a} tokens: bucket [{a}, {b}) is skipped "
                             f"(longest held-out document: {longest} tokens)")
            elif longest < b:
                notes.append(f"no held-out document reaches {b} tokens: bucket [{a}, {b}) is scored only up to "
                             f"position {longest - 1}")
        for i in pick:
            used.add(int(i))
            chosen.append(np.asarray(heldout[int(i)])[:b])
    return chosen, list(reversed(notes))


def loss_by_position(model, docs: list[np.ndarray], edges: list[int], **kw) -> list[dict]:
    """One row per bucket [a, b): mean loss of targets at positions a..b-1 (position p's loss predicts token p
    from tokens < p), with the token and document counts behind it; loss None where no document reaches it."""
    losses = token_losses(model, docs, **kw)
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        tot, n, nd = 0.0, 0, 0
        for x in losses:  # x[j] is the loss of target position j + 1
            seg = x[max(0, a - 1):max(0, b - 1)]
            if seg.size:
                tot += float(seg.sum())
                n += int(seg.size)
                nd += 1
        rows.append({"lo": a, "hi": b, "loss": tot / n if n else None, "tokens": n, "docs": nd})
    return rows



def distance_buckets(max_d: int) -> list[int]:
    """Bucket edges 0,1,2,4,8,... covering distances up to max_d."""
    edges = [0, 1, 2]
    while edges[-1] <= max_d:
        edges.append(edges[-1] * 2)
    return edges


class WithScaling(torch.nn.Module):
    """Evaluation view of a model with RoPE scaling passed to every forward (the model is not changed)."""

    def __init__(self, model, scaling):
        super().__init__()
        self.model, self.scaling = model, scaling
        self.train(model.training)

    def forward(self, tokens, cu_seqlens, max_seqlen, positions):
        return self.model(tokens, cu_seqlens, max_seqlen, positions, rope_scaling=self.scaling)


def with_scaling(model, scaling):
    return model if scaling is None else WithScaling(model, scaling)


def score(model, sets: list[EvalSet], text: list[np.ndarray] | None, train_max_len: int, text_edges, task_cfg=None,
          learned: float = 0.9, scaling=None) -> dict:
    """Scores of ``model`` on evaluation sets: {"acc": {task: {n: exact}}, "tok_acc", "text_loss" (per position
    bucket), "id", "ood", "ood_score", "learned", "noise_sd", "distinct": {task: {n: prompts}}}.

    id / ood: mean exact match at lengths <= / > train_max_len (text adds 1/perplexity). ood_score (what the
    early-stopping rule watches) is the mean over tasks of the OOD accuracy corrected for guessing,
    (acc - chance) / (1 - chance) clipped at 0, where a task not yet learned in distribution (ID accuracy below
    ``learned``) counts 0. ``learned``: some task is learned in distribution. ``noise_sd``: the standard error of
    a difference of two ood_score measurements from sampling the validation prompts alone (binomial at p = 0.5,
    the worst case), so a drop smaller than a few of these is noise.
    """
    em_model = distributed.context().eval_model(with_scaling(model, scaling))  # dist: sharded, on the device
    acc, tok, distinct = {}, {}, {}
    for es in sets:
        a, t = exact_match(em_model, es)
        acc.setdefault(es.task, {})[es.n] = a
        tok.setdefault(es.task, {})[es.n] = t
        distinct.setdefault(es.task, {})[es.n] = es.distinct
    ood_score, var, any_learned = [], 0.0, False
    for task, d in acc.items():
        c = chance(task, task_cfg) if task_cfg is not None else 0.0
        idv = [a for n, a in d.items() if n <= train_max_len]
        ood_n = [n for n in d if n > train_max_len]
        if not ood_n:
            continue
        is_learned = bool(idv) and min(idv) >= learned
        any_learned |= is_learned
        ood_score.append(float(np.mean([max(0.0, (d[n] - c) / (1 - c)) for n in ood_n])) if is_learned else 0.0)
        if is_learned:  # variance of this task's mean over its OOD cells, twice (a difference of two evaluations)
            var += 2 * sum(0.25 / distinct[task][n] for n in ood_n) / (len(ood_n) ** 2 * (1 - c) ** 2)
    out = {"acc": acc, "tok_acc": tok, "distinct": distinct}
    ids = [v for d in acc.values() for n, v in d.items() if n <= train_max_len]
    oods = [v for d in acc.values() for n, v in d.items() if n > train_max_len]
    if text is not None:
        tl = [r["loss"] for r in loss_by_position(model, text, list(text_edges), rope_scaling=scaling)]
        out["text_loss"] = tl
        ids.append(math.exp(-tl[0]))  # text: 1/perplexity keeps the metric in (0, 1] with "higher is better"
        oods += [math.exp(-x) for x in tl[1:]]
        ood_score += [math.exp(-x) for x in tl[1:]]
    out["id"] = float(np.mean(ids)) if ids else math.nan
    out["ood"] = float(np.mean(oods)) if oods else math.nan
    out["ood_score"] = float(np.mean(ood_score)) if ood_score else math.nan
    out["learned"] = any_learned
    out["noise_sd"] = math.sqrt(var) / len(ood_score) if ood_score else math.inf
    return out


# ------------------------------------------------------------------------------ boundary diagnostic
def boundary_rows(pieces: list[np.ndarray], row_len: int) -> list[list[np.ndarray]]:
    """Pieces laid out in order into rows of at most ``row_len`` tokens (the packed layout being probed)."""
    rows, cur, used = [], [], 0
    for p in pieces:
        if cur and used + len(p) > row_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(p)
        used += len(p)
    if cur:
        rows.append(cur)
    return rows


@torch.no_grad()
def loss_by_boundary_distance(model, pieces: list[np.ndarray], row_len: int, arm: ArmConfig,
                              edges: list[int]) -> dict:
    """Next-token loss of natural-text pieces packed in order into rows, laid out as ``arm`` trains
    (attention and positions knobs), by the target token's distance from its document's first token.

    Returns {"buckets": mean loss per [edges[i], edges[i+1]), "all": mean over every target token}. A
    document's first token is never a target (it has no in-document context).
    """
    was = model.training
    model.eval()
    sums, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    total, n_total = 0.0, 0
    for row in boundary_rows(pieces, row_len):
        toks = np.concatenate(row)
        lens = [len(p) for p in row]
        dist = np.concatenate([np.arange(n) for n in lens])                             # distance from doc start
        doc_cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32)
        row_cu = torch.tensor([0, len(toks)], dtype=torch.int32)
        cu = row_cu if arm.attention == "row" else doc_cu
        pos = torch.arange(len(toks)) if arm.positions == "row" else torch.as_tensor(dist)
        t = torch.as_tensor(toks, dtype=torch.int64)
        logits = model(t, cu, int((cu[1:] - cu[:-1]).max()), pos)
        loss = F.cross_entropy(logits[:-1].float(), t[1:], reduction="none").numpy()  # loss[j]: target j+1
        d = dist[1:]
        keep = d > 0                                     # the target is not a document's first token
        b = np.searchsorted(edges, d, side="right") - 1
        ok = keep & (b < len(edges) - 1)
        np.add.at(sums, b[ok], loss[ok])
        np.add.at(counts, b[ok], 1)
        total += float(loss[keep].sum())
        n_total += int(keep.sum())
    model.train(was)
    return {"buckets": [float(s / c) if c else math.nan for s, c in zip(sums, counts)],
            "all": total / n_total if n_total else math.nan}


# ---------------------------------------------------------------------------- derived per-run metrics
def generalization_gap(acc: dict[int, float], train_max_len: int) -> float:
    """ID accuracy (at the largest length <= train_max_len) minus mean accuracy beyond it."""
    ids = [n for n in acc if n <= train_max_len]
    ood = [acc[n] for n in acc if n > train_max_len]
    if not ids or not ood:
        return math.nan
    return acc[max(ids)] - float(np.mean(ood))


def critical_length(acc: dict[int, float], threshold: float) -> int:
    """Longest evaluated length whose accuracy is >= threshold (0 when none is)."""
    ok = [n for n, a in acc.items() if a >= threshold]
    return max(ok) if ok else 0


# --------------------------------------------------------------------------------- early stopping
@dataclass
class EarlyStopper:
    """The "stop when OOD drops" rule, made safe against the two ways it misfired.

    It fires at a validation where the OOD score is below ``best - max(drop * best, z * noise_sd)`` for
    ``patience`` validations in a row, and only when (a) the step is at least ``min_steps`` and (b) some
    task is learned in distribution: a run that has not learned anything cannot "drop", and a dip within
    z standard errors of the validation sampling noise is not a drop. Once fired it is frozen: the kept
    checkpoint is the best one before the stop (what the recipe would deliver).
    """
    drop: float = 0.05
    z: float = 2.0
    min_steps: int = 100
    patience: int = 2
    below: int = 0
    best: float = -math.inf
    best_step: int = -1
    stopped_at: int | None = None
    reason: str = ""
    history: list = field(default_factory=list)

    def margin(self, noise_sd: float) -> float:
        return max(self.drop * max(self.best, 0.0), self.z * noise_sd)

    def update(self, step: int, value: float, learned: bool = True, noise_sd: float = 0.0) -> tuple[bool, bool]:
        """Record ``value`` at ``step``; return (new best kept, fired now)."""
        self.history.append((step, value))
        if self.stopped_at is not None or math.isnan(value):
            return False, False
        if value > self.best:
            self.best, self.best_step, self.below = value, step, 0
            return True, False
        lim = self.best - self.margin(noise_sd)
        self.below = self.below + 1 if (learned and step >= self.min_steps and value < lim) else 0
        if self.below >= self.patience:
            self.stopped_at = step
            self.reason = (f"OOD score {value:.3f} at step {step} is below {lim:.3f} (best {self.best:.3f} at step "
                           f"{self.best_step} minus max({100 * self.drop:.0f}%, {self.z:g} x noise sd "
                           f"{noise_sd:.3f})) for {self.patience} validation(s) in a row")
            return False, True
        return False, False

    def max_drop_after_best(self) -> float:
        """Largest relative OOD drop after the best step (the overfitting risk), 0 when none."""
        after = [v for s, v in self.history if s > self.best_step]
        if not after or self.best <= 0:
            return 0.0
        return max(0.0, (self.best - min(after)) / self.best)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("best", "best_step", "stopped_at", "reason", "history", "below")}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
