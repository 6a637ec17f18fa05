"""The reference trainer: one (strategy, seed) run at a time, readable top to bottom.

Data flows: task documents -> Arrow table -> lengen_fast.data.PackedLoader (the real pipeline) ->
flat batches -> Transformer (varlen_attention + apply_rope) -> AdamW. Every ``eval_every`` steps the
model is scored on the validation sets; the OOD score drives early stopping and the best
checkpoint; the kept (best) model is finally scored on fresh test sets.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..reference import doc_ids_from_cu_seqlens, positions_from_cu_seqlens
from . import distributed
from .config import RunConfig
from .evaluate import EarlyStopper, exact_match, loss_by_position
from .model import Transformer
from .tasks import EvalSet, chance

LOADER_STRATEGY = {"concat_chunk": "concat_chunk", "pack_naive": "pack", "pack_masked": "pack", "vsl": "vsl"}
CROSS_DOC = ("concat_chunk", "pack_naive")  # attention spans the row; positions run along the row


def make_loader(table, strategy: str, cfg: RunConfig, seed: int, max_len: int):
    """The data pipeline's loader over the task table (labels are -100 where loss_mask is 0)."""
    from ..data import LoaderConfig, PackedLoader, open_tokens

    tr = cfg.train
    source = open_tokens(table, column="input_ids", loss_mask_column="loss_mask")
    # vsl buckets are powers of two from the shortest document's (floor) up; pieces below min_len (low bits of
    # longer documents) are packed into min_len rows (remainder=True), so no token is dropped
    vsl = strategy == "vsl"
    min_len = 1 << (int(source.lengths.min()).bit_length() - 1) if vsl else 1
    lc = LoaderConfig(strategy=LOADER_STRATEGY[strategy], tokens_per_batch=tr.tokens_per_batch, max_len=max_len,
                      min_len=min(min_len, max_len), remainder=vsl, curriculum=tr.curriculum if vsl else "natural",
                      num_cycles=tr.num_cycles, seed=seed, infinite=True, prefetch=0,
                      rank=distributed.context().rank, world_size=distributed.context().world_size)
    return PackedLoader(source, lc)


def model_inputs(batch, strategy: str, gen: torch.Generator | None, pos_offset_max: int):
    """Batch -> (tokens, cu_seqlens, max_seqlen, positions, labels), all flat (N,).

    concat_chunk / pack_naive attend across documents within a row with row positions;
    pack_masked / vsl attend within documents with positions reset per document. With
    ``gen``, each attention segment gets a random position offset in [0, pos_offset_max].
    """
    tokens = torch.as_tensor(batch.input_ids, dtype=torch.int64)
    labels = torch.as_tensor(batch.labels, dtype=torch.int64)
    N = tokens.shape[0]
    if strategy in CROSS_DOC:
        cu = torch.as_tensor(batch.row_cu_seqlens, dtype=torch.int32)
        positions = positions_from_cu_seqlens(cu, N)
    else:
        cu = torch.as_tensor(batch.cu_seqlens, dtype=torch.int32)
        positions = torch.as_tensor(batch.position_ids, dtype=torch.int64).clone()
    seg = doc_ids_from_cu_seqlens(cu, N)
    nseg = cu.numel() - 1
    positions = torch.where(seg < nseg, positions, torch.zeros_like(positions))      # tail padding -> 0
    if gen is not None and pos_offset_max > 0:
        off = distributed.context().segment_offsets(pos_offset_max + 1, nseg, gen)  # dist: rank-invariant
        positions = positions + torch.where(seg < nseg, off[seg.clamp(max=nseg)], torch.zeros_like(positions))
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if nseg else 1
    return tokens, cu, max_seqlen, positions, labels


def attention_flops(cu: torch.Tensor, n_layers: int, d_model: int) -> float:
    """Causal attention FLOPs fwd+bwd (flash-attn's count: fwd 4*sum(s^2)*d/2, bwd 2.5x fwd)."""
    s = (cu[1:] - cu[:-1]).double()
    return 3.5 * 2.0 * float((s * s).sum()) * d_model * n_layers


@dataclass
class EvalSets:
    val: list[EvalSet]
    test: list[EvalSet]
    text_val: np.ndarray | None       # (B, L_eval) held-out text documents
    text_test: np.ndarray | None


def score(model, sets: list[EvalSet], text: np.ndarray | None, train_max_len: int, text_edges: list[int],
          task_cfg=None, learned: float = 0.9):
    """{"acc": {task: {n: exact}}, "tok_acc", "text_loss": [per bucket], "id", "ood", "ood_score"}.

    id / ood: mean exact match at lengths <= / > train_max_len. ood_score (what early stopping
    watches) is the mean over tasks of the OOD accuracy corrected for guessing, (acc - chance) /
    (1 - chance) clipped at 0, where a task not yet learned in distribution (ID accuracy below
    ``learned``) counts 0: a binary task flipping between constant answers (0.4 <-> 0.6) is noise,
    not a drop, and a task that becomes learned only adds to the score.
    """
    model = distributed.context().eval_model(model)  # dist: sharded over ranks, on the device
    acc, tok = {}, {}
    for es in sets:
        a, t = exact_match(model, es)
        acc.setdefault(es.task, {})[es.n] = a
        tok.setdefault(es.task, {})[es.n] = t
    ood_score = []
    for task, d in acc.items():
        c = chance(task, task_cfg) if task_cfg is not None else 0.0
        idv = [a for n, a in d.items() if n <= train_max_len]
        oodv = [max(0.0, (a - c) / (1 - c)) for n, a in d.items() if n > train_max_len]
        if oodv:
            ood_score.append(float(np.mean(oodv)) if idv and min(idv) >= learned else 0.0)
    out = {"acc": acc, "tok_acc": tok}
    ids = [v for d in acc.values() for n, v in d.items() if n <= train_max_len]
    oods = [v for d in acc.values() for n, v in d.items() if n > train_max_len]
    if text is not None:
        tl = loss_by_position(model, text, text_edges)
        out["text_loss"] = tl
        # text: 1/perplexity keeps the metric in (0, 1] with "higher is better"
        ids.append(math.exp(-tl[0]))
        oods += [math.exp(-x) for x in tl[1:]]
        ood_score += [math.exp(-x) for x in tl[1:]]
    out["id"] = float(np.mean(ids)) if ids else math.nan
    out["ood"] = float(np.mean(oods)) if oods else math.nan
    out["ood_score"] = float(np.mean(ood_score)) if ood_score else math.nan
    return out


class Trainer:
    def __init__(self, cfg: RunConfig, strategy: str, seed: int, table, evals: EvalSets, vocab_size: int,
                 run_dir: Path, *, max_len: int, train_max_len: int, text_edges: list[int],
                 steps: int | None = None, init_model: Transformer | None = None, rope_scaling=None):
        self.cfg, self.strategy, self.seed = cfg, strategy, seed
        self.evals, self.run_dir = evals, Path(run_dir)
        self.train_max_len, self.text_edges = train_max_len, text_edges
        self.steps = steps if steps is not None else cfg.train.steps
        torch.manual_seed(seed)
        self.dist = distributed.context()
        self.model = (self.dist.plain_copy(init_model, lambda: Transformer(init_model.cfg, init_model.vocab_size))
                      if init_model is not None else Transformer(cfg.model, vocab_size))
        self.model.rope_scaling = rope_scaling
        self.model.attn_backend = cfg.train.attn_backend or None
        self.train_model = self.dist.wrap(self.model)  # dist: device, DDP / FSDP2 (before the optimizer)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr,
                                     betas=(0.9, 0.95))
        self.loader = make_loader(table, strategy, cfg, seed, max_len)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.dist.seed_rank_streams(seed)
        tr = cfg.train
        self.stopper = EarlyStopper(tr.early_stop_drop, tr.early_stop_min_best, tr.early_stop, tr.early_stop_patience)
        self.step, self.tokens, self.train_time, self.flops = 0, 0, 0.0, 0.0
        self.losses: list[float] = []
        self.history: list[dict] = []

    # ------------------------------------------------------------------ schedule, eval, ckpt
    def lr_at(self, step: int) -> float:
        tr = self.cfg.train
        warm = min(tr.warmup, max(1, self.steps // 10))
        if step < warm:
            return tr.lr * (step + 1) / warm
        frac = (step - warm) / max(1, self.steps - warm)
        return tr.lr * (tr.min_lr_frac + (1 - tr.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def evaluate(self) -> dict:
        res = score(self.model, self.evals.val, self.evals.text_val, self.train_max_len, self.text_edges,
                    self.cfg.task, self.cfg.train.critical_threshold)
        res.update(step=self.step, flops=self.flops, tokens=self.tokens,
                   loss=float(np.mean(self.losses[-self.cfg.train.eval_every:])) if self.losses else math.nan)
        self.history.append(res)
        improved, stop = self.stopper.update(self.step, res["ood_score"], res["id"])
        if improved:
            self.save(self.run_dir / "best.pt")
        self.save(self.run_dir / "last.pt")
        return res | {"stop": stop}

    def state_dict(self) -> dict:
        return {"model_config": self.cfg.model.__dict__.copy(), "strategy": self.strategy, "seed": self.seed,
                "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "torch_rng": torch.get_rng_state(), "offset_rng": self.gen.get_state(),
                "loader": self.loader.state_dict(), "step": self.step, "tokens": self.tokens,
                "train_time": self.train_time, "flops": self.flops, "losses": list(self.losses),
                "history": self.history, "stopper": self.stopper.state_dict()}

    def save(self, path: Path) -> None:
        state = self.dist.checkpoint_state(self.state_dict(), self.model, self.opt, self.gen)  # collective
        if self.dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(path)
        self.dist.written(path)  # the other ranks may read it next (restore_best, resume)

    def load(self, path: Path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        check_compatible(ck, self.cfg, path)
        self.dist.check_resume(ck, path)
        self.dist.load_state(ck, self.model, self.opt, self.gen)  # model, optimizer, this rank's RNG
        self.loader.load_state_dict(ck["loader"])
        self.step, self.tokens, self.train_time, self.flops = ck["step"], ck["tokens"], ck["train_time"], ck["flops"]
        self.losses, self.history = ck["losses"], ck["history"]
        self.stopper.load_state_dict(ck["stopper"])

    # ------------------------------------------------------------------ the loop
    def fit(self, progress: bool = True, desc: str = "", until: int | None = None) -> "Trainer":
        """Train to ``self.steps`` (or to step ``until``), unless early stopping fires first."""
        from tqdm.auto import tqdm

        tr, model = self.cfg.train, self.model
        model.train()
        bar = tqdm(total=self.steps, initial=self.step, desc=desc or f"{self.strategy} s{self.seed}",
                   disable=not progress, dynamic_ncols=True, leave=False)
        batches = iter(self.loader)
        last = self.steps if until is None else min(until, self.steps)
        while self.step < last and self.stopper.stopped_at is None:
            t0 = time.perf_counter()
            batch = next(batches)
            tokens, cu, max_seqlen, positions, labels = model_inputs(batch, self.strategy, self.gen,
                                                                     tr.pos_offset_max)
            tokens, cu, positions, labels = self.dist.to_device(tokens, cu, positions, labels)
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            logits = self.train_model(tokens, cu, max_seqlen, positions)            # (N, V)
            loss, loss_value = self.dist.token_mean_loss(logits, labels)  # dist: mean over all ranks' tokens
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if tr.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
            self.opt.step()
            self.step += 1
            real, attn = self.dist.all_sum(int(cu[-1]), attention_flops(cu, self.cfg.model.n_layers,
                                                                        self.cfg.model.d_model))
            self.tokens += int(real)
            self.flops += 6.0 * model.num_params() * real + attn
            self.losses.append(loss_value.item())
            self.train_time += time.perf_counter() - t0
            bar.set_postfix(loss=f"{self.losses[-1]:.3f}", tok_s=f"{self.tokens / self.train_time:,.0f}")
            bar.update(1)
            if self.step % tr.eval_every == 0 or self.step == self.steps:
                res = self.evaluate()
                bar.set_postfix(loss=f"{self.losses[-1]:.3f}", tok_s=f"{self.tokens / self.train_time:,.0f}",
                                id=f"{res['id']:.2f}", ood=f"{res['ood']:.2f}")
        bar.close()
        return self

    def restore_best(self) -> None:
        """Load the kept best-OOD weights (selected on validation sets) for final scoring."""
        best = self.run_dir / "best.pt"
        if best.exists():
            self.dist.load_model(self.model, torch.load(best, map_location="cpu", weights_only=False)["model"])


def check_compatible(ck: dict, cfg: RunConfig, path) -> None:
    mine = cfg.model.__dict__
    if ck["model_config"] != mine:
        diff = {k: (ck["model_config"].get(k), mine.get(k)) for k in set(mine) | set(ck["model_config"])
                if ck["model_config"].get(k) != mine.get(k)}
        raise ValueError(f"cannot resume from {path}: its model config differs from this run's "
                         f"(field: (checkpoint, now)) {diff}")
