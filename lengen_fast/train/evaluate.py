"""How is a model scored, and when is a difference real? Exact match, the validation score that selects
checkpoints, loss by position and by distance from a document boundary, generalization gap, critical
length, the early-stopping rule, and the seed statistics (95% t-intervals, paired verdicts).

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

from . import distributed
from .config import ArmConfig
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


@torch.no_grad()
def loss_by_position(model, docs: np.ndarray, edges: list[int]) -> list[float]:
    """Mean next-token loss of documents (B, L) in position buckets [edges[i], edges[i+1])."""
    was = model.training
    model.eval()
    logits = token_logits(model, docs)
    model.train(was)
    t = torch.tensor(docs[:, 1:], dtype=torch.int64)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="none")
    loss = loss.view(t.shape).mean(0).numpy()                                       # (L-1,) by target pos - 1
    return [float(loss[a:b].mean()) if b > a else math.nan for a, b in zip(edges[:-1], edges[1:])]


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


def score(model, sets: list[EvalSet], text: np.ndarray | None, train_max_len: int, text_edges, task_cfg=None,
          learned: float = 0.9) -> dict:
    """Scores of ``model`` on evaluation sets: {"acc": {task: {n: exact}}, "tok_acc", "text_loss" (per position
    bucket), "id", "ood", "ood_score", "learned", "noise_sd", "distinct": {task: {n: prompts}}}.

    id / ood: mean exact match at lengths <= / > train_max_len (text adds 1/perplexity). ood_score (what the
    early-stopping rule watches) is the mean over tasks of the OOD accuracy corrected for guessing,
    (acc - chance) / (1 - chance) clipped at 0, where a task not yet learned in distribution (ID accuracy below
    ``learned``) counts 0. ``learned``: some task is learned in distribution. ``noise_sd``: the standard error of
    a difference of two ood_score measurements from sampling the validation prompts alone (binomial at p = 0.5,
    the worst case), so a drop smaller than a few of these is noise.
    """
    model = distributed.context().eval_model(model)  # dist: sharded over ranks, on the device
    acc, tok, distinct = {}, {}, {}
    for es in sets:
        a, t = exact_match(model, es)
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
        tl = loss_by_position(model, text, list(text_edges))
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


# ------------------------------------------------------------------------------------ statistics
# two-sided 95% quantiles of Student's t, df = 1..30 (beyond: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
MIN_SEEDS = 2          # a t-interval needs a sample standard deviation


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def mean_ci(xs) -> dict:
    """Mean and 95% t-interval over seeds (sample std, n - 1 degrees of freedom); NaN bounds with < 2 values."""
    x = np.asarray([v for v in xs if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=float)
    n = int(x.size)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "sd": math.nan}
    m = float(x.mean())
    if n < MIN_SEEDS:
        return {"mean": m, "lo": math.nan, "hi": math.nan, "n": n, "sd": math.nan}
    sd = float(x.std(ddof=1))
    h = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "lo": m - h, "hi": m + h, "n": n, "sd": sd}


def paired(a, b) -> dict:
    """Mean and 95% interval of the per-seed difference a - b (seeds paired: same data, init, eval sets)."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b) if x is not None and y is not None])


def verdict(ci: dict) -> str:
    """"holds" when the 95% interval of the difference lies above zero, "opposite" below it, else
    "inconclusive" (an interval that contains zero, or too few seeds for an interval)."""
    if ci["n"] < MIN_SEEDS or math.isnan(ci["lo"]):
        return "inconclusive"
    if ci["lo"] > 0:
        return "holds"
    if ci["hi"] < 0:
        return "opposite"
    return "inconclusive"


def fmt_ci(ci: dict, digits: int = 2, signed: bool = False) -> str:
    if ci["n"] == 0:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if math.isnan(ci["lo"]):
        return f.format(ci["mean"]) + f" (n={ci['n']}, no interval)"
    return f.format(ci["mean"]) + f" [{f.format(ci['lo'])}, {f.format(ci['hi'])}]"


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
