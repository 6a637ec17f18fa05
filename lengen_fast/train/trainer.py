"""How does one arm train for one seed? The loop, readable top to bottom, plus the batch -> model-input
mapping that the arm's knobs control and the per-arm budget accounting.

Data flows: task documents -> Arrow table -> lengen_fast.data.PackedLoader (packing knob) -> flat
batch -> ``model_inputs`` (attention and positions knobs) -> Transformer -> AdamW. The run stops when
the arm has spent its budget (supervised target tokens, or FLOPs), or at its step cap (then the arm
is flagged). Every ``eval_every`` steps the model is scored on validation sets; three checkpoints are
kept: ``last.pt`` (final), ``best_id.pt`` (best in-distribution validation score: the headline
selection) and ``best_ood.pt`` (what the "stop when OOD drops" recipe would keep: an analysis).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..reference import doc_ids_from_cu_seqlens, positions_from_cu_seqlens
from . import distributed
from .config import ArmConfig
from .evaluate import EarlyStopper, score
from .model import Transformer
from .tasks import PAD

IGNORE = -100


def make_loader(table, arm: ArmConfig, seq_len: int, tokens_per_batch: int, seed: int,
                shard: tuple[int, int] | None = None):
    """The data pipeline's loader over the task table for ``arm``'s packing knob (labels are -100 where
    the loss mask is 0). ``shard``: (rank, world size); default this process's."""
    from ..data import LoaderConfig, PackedLoader, open_tokens

    source = open_tokens(table, column="input_ids", loss_mask_column="loss_mask")
    ctx = distributed.context()
    decompose = arm.packing == "decompose"
    # decompose buckets are powers of two from the shortest document's (floor) up; pieces below min_len (low bits
    # of longer documents) are packed into min_len rows (remainder=True), so no token is dropped
    min_len = min(1 << (int(source.lengths.min()).bit_length() - 1), seq_len) if decompose else 1
    strategy = {"concat": "concat_chunk", "bfd": "pack", "decompose": "vsl"}[arm.packing]
    lc = LoaderConfig(strategy=strategy, tokens_per_batch=tokens_per_batch, max_len=seq_len, min_len=min_len,
                      remainder=decompose, curriculum=arm.curriculum, num_cycles=arm.cycles, seed=seed,
                      infinite=True, prefetch=0, rank=shard[0] if shard else ctx.rank,
                      world_size=shard[1] if shard else ctx.world_size)
    return PackedLoader(source, lc)


def model_inputs(batch, arm: ArmConfig, gen: torch.Generator | None = None, pos_offset_max: int = 0):
    """Batch -> (tokens, cu_seqlens, max_seqlen, positions, labels), all flat (N,).

    attention=row attends across the documents of a packed row (the loader's ``row_cu_seqlens``),
    attention=document within each document piece (``cu_seqlens``). positions=row counts along the
    row, positions=document restarts at every document piece. Tokens and labels do not depend on
    either knob. With ``gen``, every position segment gets a random offset in [0, pos_offset_max].
    """
    tokens = torch.as_tensor(batch.input_ids, dtype=torch.int64)
    labels = torch.as_tensor(batch.labels, dtype=torch.int64)
    N = tokens.shape[0]
    row_cu = torch.as_tensor(batch.row_cu_seqlens, dtype=torch.int32)
    doc_cu = torch.as_tensor(batch.cu_seqlens, dtype=torch.int32)
    cu = row_cu if arm.attention == "row" else doc_cu
    pos_cu = row_cu if arm.positions == "row" else doc_cu
    positions = positions_from_cu_seqlens(pos_cu, N)
    seg = doc_ids_from_cu_seqlens(pos_cu, N)
    nseg = pos_cu.numel() - 1
    positions = torch.where(seg < nseg, positions, torch.zeros_like(positions))      # tail padding -> 0
    if gen is not None and pos_offset_max > 0:
        off = distributed.context().segment_offsets(pos_offset_max + 1, nseg, gen)  # dist: rank-invariant
        positions = positions + torch.where(seg < nseg, off[seg.clamp(max=nseg)], torch.zeros_like(positions))
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 1
    return tokens, cu, max_seqlen, positions, labels


def attention_flops(cu: torch.Tensor, n_layers: int, d_model: int) -> float:
    """Causal attention FLOPs fwd+bwd (flash-attn's count: fwd 4*sum(s^2)*d/2, bwd 2.5x fwd)."""
    s = (cu[1:] - cu[:-1]).double()
    return 3.5 * 2.0 * float((s * s).sum()) * d_model * n_layers


def dense_flops(num_params: int, slots: int) -> float:
    """6 * parameters * token slots: every slot of the batch (padding included) runs through the model."""
    return 6.0 * num_params * slots


class Trainer:
    """One (arm, seed) run. ``budget``: ("supervised" | "flops", amount) to stop at, or None to run
    exactly ``max_steps`` (the extension fine-tune). ``schedule_steps`` sizes the warmup + cosine schedule."""

    def __init__(self, plan, arm: ArmConfig, seed: int, table, evals, run_dir: Path, *, max_steps: int,
                 schedule_steps: int, budget: tuple[str, float] | None, task_cfg=None, seq_len: int | None = None,
                 init_model: Transformer | None = None, rope_scaling=None, model_cfg=None):
        cfg = plan.cfg
        self.plan, self.cfg, self.arm, self.seed = plan, cfg, arm, seed
        self.task_cfg = task_cfg or cfg.task
        self.evals, self.run_dir = evals, Path(run_dir)
        self.max_steps, self.schedule_steps, self.budget = max_steps, schedule_steps, budget
        self.rope_scaling = rope_scaling
        torch.manual_seed(seed)
        self.dist = distributed.context()
        mcfg = model_cfg or cfg.model
        self.model = (self.dist.plain_copy(init_model, lambda: Transformer(init_model.cfg, init_model.vocab_size))
                      if init_model is not None else Transformer(mcfg, plan.vocab))
        self.model.attn_backend = cfg.train.attn_backend or None
        self.train_model = self.dist.wrap(self.model)  # dist: device, DDP / FSDP2 (before the optimizer)
        tr = cfg.train
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=tr.lr, betas=(0.9, 0.95))
        self.loader = make_loader(table, arm, seq_len or plan.seq_len, tr.tokens_per_batch, seed)
        self.doc_len = np.asarray(self.loader.source.lengths, dtype=np.int64)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.dist.seed_rank_streams(seed)
        self.stopper = EarlyStopper(drop=tr.early_stop_drop, z=tr.early_stop_z, min_steps=tr.early_stop_min_steps,
                                    patience=tr.early_stop_patience)
        self.step, self.train_time, self.flops = 0, 0.0, 0.0
        # budget accounting (global over ranks): token slots, real tokens, supervised (labelled) tokens, padding
        # (tail slots + PAD tokens of fit=pad), document pieces seen and pieces that are not whole documents
        self.acct = {"slots": 0, "tokens": 0, "supervised": 0, "padding": 0, "pieces": 0, "pieces_cut": 0}
        self.seen = np.zeros(len(self.doc_len), dtype=bool)       # this rank's documents (union at the end)
        self.cut = np.zeros(len(self.doc_len), dtype=bool)
        self.best_id, self.best_id_step = -math.inf, -1
        self.losses: list[float] = []
        self.history: list[dict] = []

    # ------------------------------------------------------------------ schedule, budget, eval, ckpt
    def lr_at(self, step: int) -> float:
        tr = self.cfg.train
        warm = min(tr.warmup, max(1, self.schedule_steps // 10))
        if step < warm:
            return tr.lr * (step + 1) / warm
        frac = (step - warm) / max(1, self.schedule_steps - warm)
        return tr.lr * (tr.min_lr_frac + (1 - tr.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def spent(self) -> float:
        kind, _ = self.budget
        return float(self.acct["supervised"]) if kind == "supervised" else self.flops

    def done(self) -> bool:
        if self.step >= self.max_steps:
            return True
        if self.budget is not None and self.spent() >= self.budget[1]:
            return True
        return self.cfg.train.early_stop and self.budget is not None and self.stopper.stopped_at is not None

    def evaluate(self) -> dict:
        tr = self.cfg.train
        res = score(self.scored_model(), self.evals.val, self.evals.text_val, self.task_cfg.train_max_len,
                    self.plan.text_edges, self.task_cfg, tr.critical_threshold)
        res.update(step=self.step, flops=self.flops, supervised=self.acct["supervised"],
                   loss=float(np.mean(self.losses[-tr.eval_every:])) if self.losses else math.nan)
        self.history.append(res)
        improved, _ = self.stopper.update(self.step, res["ood_score"], res["learned"], res["noise_sd"])
        if improved:
            self.save(self.run_dir / "best_ood.pt")
        if res["id"] >= self.best_id:  # ties: the later checkpoint (more training, same ID score)
            self.best_id, self.best_id_step = res["id"], self.step
            self.save(self.run_dir / "best_id.pt")
        self.save(self.run_dir / "last.pt")
        return res

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the run computes in: the parameters' (this loop uses no autocast)."""
        return next(self.model.parameters()).dtype

    def scored_model(self):
        from .evaluate import with_scaling
        return with_scaling(self.model, self.rope_scaling)

    def state_dict(self) -> dict:
        return {"model_config": self.model.cfg.__dict__.copy(), "arm": self.arm.knobs() | {"name": self.arm.name},
                "seed": self.seed, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "torch_rng": torch.get_rng_state(), "offset_rng": self.gen.get_state(),
                "loader": self.loader.state_dict(), "step": self.step, "acct": dict(self.acct),
                "seen": self.seen.copy(), "cut": self.cut.copy(), "train_time": self.train_time, "flops": self.flops,
                "losses": list(self.losses), "history": self.history, "stopper": self.stopper.state_dict(),
                "best_id": (self.best_id, self.best_id_step)}

    def save(self, path: Path) -> None:
        state = self.dist.checkpoint_state(self.state_dict(), self.model, self.opt, self.gen)  # collective
        if self.dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(path)
        self.dist.written(path)  # the other ranks may read it next (restore, resume)

    def load(self, path: Path) -> None:
        ck = read_checkpoint(path)
        check_compatible(ck, self.model.cfg, path)
        self.dist.check_resume(ck, path)
        self.dist.load_state(ck, self.model, self.opt, self.gen)  # model, optimizer, this rank's RNG
        self.loader.load_state_dict(ck["loader"])
        self.step, self.acct, self.train_time, self.flops = ck["step"], dict(ck["acct"]), ck["train_time"], ck["flops"]
        self.seen, self.cut = ck["seen"].copy(), ck["cut"].copy()
        self.losses, self.history = ck["losses"], ck["history"]
        self.stopper.load_state_dict(ck["stopper"])
        self.best_id, self.best_id_step = ck["best_id"]

    def restore(self, which: str) -> bool:
        """Load the weights of checkpoint ``which`` ("best_id" | "best_ood" | "last"); False when absent."""
        path = self.run_dir / f"{which}.pt"
        if not path.exists():
            return False
        self.dist.load_model(self.model, read_checkpoint(path)["model"])
        return True

    # ------------------------------------------------------------------ the loop
    def account(self, batch, labels: torch.Tensor, cu: torch.Tensor) -> list[float]:
        """This rank's step totals: slots, real tokens, supervised, padding, pieces, cut pieces, attention FLOPs."""
        L = len(self.loader)
        _, _, doc, start, length, _ = self.loader.pieces(batch.epoch, batch.step - batch.epoch * L)
        whole = (start == 0) & (length == self.doc_len[doc])
        self.seen[doc] = True
        self.cut[doc[~whole]] = True
        real = int(batch.num_tokens)
        slots = int(labels.shape[0])
        pads = int((torch.as_tensor(batch.input_ids[:real]) == PAD).sum())
        m = self.model.cfg
        return [slots, real, int((labels != IGNORE).sum()), slots - real + pads, len(doc), int((~whole).sum()),
                attention_flops(cu, m.n_layers, m.d_model)]

    def fit(self, progress: bool = True, desc: str = "", until: int | None = None) -> "Trainer":
        """Train until the budget is spent (or the step cap, or step ``until``). Progress (rank 0 only): a tqdm
        bar on a terminal, otherwise a plain line every few seconds plus one per evaluation (lengen_fast.progress)."""
        from ..progress import progress as progress_bar

        tr, model = self.cfg.train, self.model
        model.train()
        bar = progress_bar(total=self.schedule_steps, initial=self.step, desc=desc or f"{self.arm.name} s{self.seed}",
                           enabled=progress and self.dist.is_main)
        batches = iter(self.loader)
        while not self.done() and (until is None or self.step < until):
            t0 = time.perf_counter()
            batch = next(batches)
            tokens, cu, max_seqlen, positions, labels = model_inputs(batch, self.arm, self.gen, tr.pos_offset_max)
            local = self.account(batch, labels, cu)
            tokens, cu, positions, labels = self.dist.to_device(tokens, cu, positions, labels)
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            logits = self.train_model(tokens, cu, max_seqlen, positions, rope_scaling=self.rope_scaling)  # (N, V)
            loss, loss_value = self.dist.token_mean_loss(logits, labels)  # dist: mean over all ranks' tokens
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if tr.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
            self.opt.step()
            self.step += 1
            tot = self.dist.all_sum(*local)                 # dist: one reduction for all step totals
            for k, v in zip(self.acct, tot):
                self.acct[k] += int(v)
            self.flops += dense_flops(model.num_params(), int(tot[0])) + tot[-1]
            self.losses.append(loss_value.item())
            self.train_time += time.perf_counter() - t0
            bar.set_postfix(loss=f"{self.losses[-1]:.3f}", tok_s=f"{self.acct['tokens'] / self.train_time:,.0f}")
            bar.update(1)
            if self.step % tr.eval_every == 0 or self.done():
                res = self.evaluate()
                bar.event("eval", loss=f"{self.losses[-1]:.3f}", id=f"{res['id']:.2f}", ood=f"{res['ood']:.2f}")
        bar.close()
        return self

    def accounting(self) -> dict:
        """The arm's budget accounting (call after ``fit``): every count is global over ranks."""
        seen, cut = self.dist.union(self.seen), self.dist.union(self.cut)
        a = dict(self.acct)
        a.update(steps=self.step, flops=self.flops, epochs=self.step / max(1, len(self.loader)),
                 documents=int(len(self.doc_len)), documents_seen=int(seen.sum()), documents_cut=int(cut.sum()),
                 padding_frac=a["padding"] / max(1, a["slots"]), steps_per_epoch=len(self.loader))
        if self.budget is not None:
            a.update(budget_kind=self.budget[0], budget=self.budget[1], spent=self.spent(),
                     budget_met=self.spent() >= self.budget[1])
        return a


class CheckpointError(ValueError):
    pass


def read_checkpoint(path) -> dict:
    """torch.load with a clear error naming the file (and offering best_id.pt where it exists)."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ck, dict) or "model" not in ck:
            raise ValueError("it holds no lengen-train checkpoint (no 'model' entry)")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same named error
        best = path.parent / "best_id.pt"
        offer = (f"; {best} exists: copy it to {path.name} to resume from the best in-distribution checkpoint"
                 if best.exists() and best != path else "")
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}{offer}") from None
    return ck


def check_compatible(ck: dict, model_cfg, path) -> None:
    mine = model_cfg.__dict__
    if ck.get("model_config") != mine:
        theirs = ck.get("model_config") or {}
        diff = {k: (theirs.get(k), mine.get(k)) for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k)}
        raise ValueError(f"cannot resume from {path}: its model config differs from this run's "
                         f"(field: (checkpoint, now)) {diff}")
