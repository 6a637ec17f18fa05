"""Evaluation: exact match, loss by position bucket and by distance from a document boundary,
generalization gap, critical length, and the early-stopping rule.

Exact match under greedy decoding is computed with ONE teacher-forced forward: greedy decoding
reproduces the answer iff, at every answer position, the argmax given the correct prefix is the
correct token (if all are right the decoded prefix stays the correct one; at the first wrong one
the decoded output differs). ``greedy_decode`` is the literal loop; a test checks they agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .tasks import EvalSet

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
        t = torch.as_tensor(tokens[i:i + per], dtype=torch.int64)
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
    seq = torch.as_tensor(prompts, dtype=torch.int64)
    for _ in range(answer_len):
        B, L = seq.shape
        cu, pos = _uniform_layout(B, L)
        nxt = model(seq.reshape(-1), cu, L, pos).view(B, L, -1)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    model.train(was)
    return seq[:, prompts.shape[1]:].numpy()


@torch.no_grad()
def loss_by_position(model, docs: np.ndarray, edges: list[int]) -> list[float]:
    """Mean next-token loss of documents (B, L) in position buckets [edges[i], edges[i+1])."""
    was = model.training
    model.eval()
    logits = token_logits(model, docs)
    model.train(was)
    t = torch.as_tensor(docs[:, 1:], dtype=torch.int64)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="none")
    loss = loss.view(t.shape).mean(0).numpy()                                       # (L-1,) by target pos - 1
    return [float(loss[a:b].mean()) if b > a else math.nan for a, b in zip(edges[:-1], edges[1:])]


def distance_buckets(max_d: int) -> list[int]:
    """Bucket edges 0,1,2,4,8,... covering distances up to max_d."""
    edges = [0, 1, 2]
    while edges[-1] <= max_d:
        edges.append(edges[-1] * 2)
    return edges


@torch.no_grad()
def loss_by_boundary_distance(model, docs: list[np.ndarray], masks: list[np.ndarray], row_len: int,
                              masked: bool, edges: list[int]) -> list[float]:
    """Mean loss on target tokens bucketed by distance from their document's first token.

    Documents are packed in order into rows of ``row_len`` tokens. ``masked``: attention and
    positions restart per document (pack_masked); otherwise they run across the row (pack_naive).
    """
    was = model.training
    model.eval()
    rows, cur = [], []
    for d, m in zip(docs, masks):
        if cur and sum(len(x[0]) for x in cur) + len(d) > row_len:
            rows.append(cur)
            cur = []
        cur.append((d, m))
    rows.append(cur)
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1)
    for row in rows:
        toks = np.concatenate([d for d, _ in row])
        lens = [len(d) for d, _ in row]
        starts = np.cumsum([0] + lens[:-1])
        dist = np.concatenate([np.arange(n) for n in lens])
        if masked:
            cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32)
            pos = torch.as_tensor(dist)
        else:
            cu = torch.tensor([0, len(toks)], dtype=torch.int32)
            pos = torch.arange(len(toks))
        t = torch.as_tensor(toks, dtype=torch.int64)
        logits = model(t, cu, int(max(lens) if masked else len(toks)), pos)
        loss = F.cross_entropy(logits[:-1], t[1:], reduction="none").numpy()      # target index j+1
        tgt_mask = np.concatenate([m for _, m in row]).astype(bool)
        tgt_mask[starts] = False  # a document's first token has no in-document context to predict it
        j = np.nonzero(tgt_mask[1:])[0]
        b = np.searchsorted(edges, dist[j + 1], side="right") - 1
        keep = b < len(edges) - 1
        np.add.at(sums, b[keep], loss[j[keep]])
        np.add.at(counts, b[keep], 1)
    model.train(was)
    return [float(s / c) if c else math.nan for s, c in zip(sums, counts)]


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


@dataclass
class EarlyStopper:
    """Stop when the OOD metric falls more than ``drop`` (a fraction) below its best.

    The rule arms only once the best is at least ``min_best``, so that noise around zero
    accuracy (0.02 -> 0.0 is a 100% drop) does not stop a run that has not learned anything yet,
    and fires after ``patience`` consecutive validations below the limit (1 = the first one).
    The best checkpoint is the highest OOD metric, ties broken by ``tiebreak`` (the ID accuracy): a task
    learned in distribution but not beyond keeps OOD at 0, and must not be scored with an untrained model.
    """
    drop: float = 0.05
    min_best: float = 0.05
    enabled: bool = True
    patience: int = 1
    below: int = 0
    best: float = -math.inf
    best_step: int = -1
    best_tiebreak: float = -math.inf
    stopped_at: int | None = None
    reason: str = ""
    history: list = field(default_factory=list)

    def update(self, step: int, value: float, tiebreak: float = -math.inf) -> tuple[bool, bool]:
        """Record ``value`` at ``step``; return (improved, stop)."""
        self.history.append((step, value))
        if value > self.best or (value == self.best and tiebreak > self.best_tiebreak):
            self.best, self.best_step, self.best_tiebreak, self.below = value, step, tiebreak, 0
            return True, False
        self.below = self.below + 1 if value < self.best * (1 - self.drop) else 0
        if self.enabled and self.best >= self.min_best and self.below >= self.patience and self.stopped_at is None:
            self.stopped_at = step
            self.reason = (f"OOD metric {value:.3f} at step {step} is {100 * (1 - value / self.best):.1f}% "
                           f"below its best {self.best:.3f} (step {self.best_step}); limit {100 * self.drop:.0f}%"
                           + (f" for {self.patience} validations in a row" if self.patience > 1 else ""))
            return False, True
        return False, False

    def max_drop_after_best(self) -> float:
        """Largest relative OOD drop after the best step (the overfitting risk), 0 when none."""
        after = [v for s, v in self.history if s > self.best_step]
        if not after or self.best <= 0:
            return 0.0
        return max(0.0, (self.best - min(after)) / self.best)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("best", "best_step", "best_tiebreak", "stopped_at", "reason", "history",
                                              "below")}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
