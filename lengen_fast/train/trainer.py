"""How does one arm train for one seed? One :class:`Run` for every workload: the step, training until a point of
the budget, evaluation, checkpoints and exact resume; plus the batch -> model-input mapping that the arm's knobs
control and the budget accounting.

Data flows: documents (a TokenSource) -> lengen_fast.data.PackedLoader (packing knob) -> flat batch ->
``model_inputs`` (attention and positions knobs) -> the model (model.py; ours or a Hugging Face architecture) ->
the chunked loss -> AdamW. A step reads this file, model.py, distributed.py (the reductions) and the loader.

A run stops when it has spent its :class:`Budget` (supervised target tokens, FLOPs or steps), or at the budget's
step cap (then the arm is flagged). The learning rate follows the budget: linear warmup over ``warmup_frac`` of it,
then cosine decay to ``min_lr_frac``, so arms that spend the budget in different numbers of steps follow the same
schedule per token. Three checkpoints: ``last.pt`` (everything a resume needs), ``best_id.pt`` (weights at the best
in-distribution validation score: the headline selection) and ``best_ood.pt`` (what the "stop when OOD drops"
recipe would keep: an analysis).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..fsio import atomic_torch_save
from . import distributed
from .arms import ArmConfig
from .evaluate import EarlyStopper
from .tasks import PAD

IGNORE = -100


@dataclass(frozen=True)
class Budget:
    """What a run spends and when it stops: ``amount`` of ``kind`` (supervised | flops | steps), at most
    ``max_steps`` optimizer steps (a run that hits the cap first did not get its budget and is flagged)."""
    kind: str
    amount: float
    max_steps: int

    def spent(self, run: "Run") -> float:
        return {"supervised": float(run.acct["supervised"]), "flops": run.flops, "steps": float(run.step)}[self.kind]

    def frac(self, run: "Run") -> float:
        return min(1.0, self.spent(run) / self.amount) if self.amount > 0 else 1.0


def make_loader(source, arm: ArmConfig, seq_len: int, tokens_per_batch: int, seed: int, *, min_len: int = 0,
                cycles: int = 1, prefetch: int = 0, pin_memory: bool = False, shard: tuple[int, int] | None = None):
    """The data pipeline's loader over ``source`` (a TokenSource) for ``arm``'s packing knob. decompose buckets are
    powers of two from ``min_len`` (0: the shortest document's, floored) up to seq_len; pieces below min_len are
    packed into min_len rows (remainder=True), so no token is dropped. ``cycles`` multiplies the arm's curriculum
    cycles (a corpus subset of k budgets runs k cycles). ``shard``: (rank, world size); default this process's."""
    from ..data import LoaderConfig, PackedLoader

    ctx = distributed.context()
    decompose = arm.packing == "decompose"
    if decompose and not min_len:
        min_len = 1 << (int(source.lengths.min()).bit_length() - 1) if int(source.lengths.min()) > 0 else 1
    strategy = {"concat": "concat_chunk", "bfd": "pack", "decompose": "vsl"}[arm.packing]
    lc = LoaderConfig(strategy=strategy, tokens_per_batch=tokens_per_batch, max_len=seq_len,
                      min_len=min(min_len, seq_len) if decompose else 1, remainder=decompose,
                      curriculum=arm.curriculum, num_cycles=arm.cycles * cycles, seed=seed, infinite=True,
                      prefetch=prefetch, pin_memory=pin_memory, rank=shard[0] if shard else ctx.rank,
                      world_size=shard[1] if shard else ctx.world_size)
    return PackedLoader(source, lc)


def model_inputs(batch, arm: ArmConfig, gen: torch.Generator | None = None, pos_offset_max: int = 0):
    """Batch -> (tokens, cu_seqlens, max_seqlen, positions, labels), all flat (N,) host tensors.

    attention=row attends across the documents of a packed row (the loader's ``row_cu_seqlens``), attention=document
    within each document piece (``cu_seqlens``). positions=row counts along the row, positions=document restarts at
    every document piece; tail padding gets position 0. Tokens and labels do not depend on either knob. With
    ``gen``, every position segment gets a random offset in [0, pos_offset_max] (rank-invariant under DDP).
    """
    tokens = torch.as_tensor(batch.input_ids, dtype=torch.int64)
    labels = torch.as_tensor(batch.labels, dtype=torch.int64)
    N = tokens.shape[0]
    row_cu = torch.as_tensor(batch.row_cu_seqlens, dtype=torch.int32)
    doc_cu = torch.as_tensor(batch.cu_seqlens, dtype=torch.int32)
    cu = row_cu if arm.attention == "row" else doc_cu
    pos_cu = (row_cu if arm.positions == "row" else doc_cu).long()
    nseg, real = pos_cu.numel() - 1, int(pos_cu[-1])
    lens = pos_cu[1:] - pos_cu[:-1]
    seg = torch.full((N,), nseg, dtype=torch.int64)                                  # tail padding: segment nseg
    seg[:real] = torch.repeat_interleave(torch.arange(nseg), lens)
    positions = torch.zeros(N, dtype=torch.int64)                                    # tail padding -> 0
    positions[:real] = torch.arange(real) - pos_cu[:-1].repeat_interleave(lens)
    if gen is not None and pos_offset_max > 0:
        off = distributed.context().segment_offsets(pos_offset_max + 1, nseg, gen)  # dist: rank-invariant
        positions = positions + torch.where(seg < nseg, off[seg.clamp(max=nseg)], torch.zeros_like(positions))
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 1          # host tensor: no device sync
    return tokens, cu, max_seqlen, positions, labels


def attention_flops(cu: torch.Tensor, n_layers: int, d_model: int) -> float:
    """Causal attention FLOPs fwd+bwd (flash-attn's count: fwd 4*sum(s^2)*d/2, bwd 2.5x fwd)."""
    s = (cu[1:] - cu[:-1]).double()
    return 3.5 * 2.0 * float((s * s).sum()) * d_model * n_layers


def dense_flops(num_params: int, slots: int) -> float:
    """6 * parameters * token slots: every slot of the batch (padding included) runs through the model."""
    return 6.0 * num_params * slots


def _cpu_clock() -> float:
    """CPU seconds of the compute: this thread's with one torch thread (a loader's prefetch thread is left out),
    else the whole process's; robust to the neighbours of a shared machine, unlike wall time."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


ACCT = ("slots", "tokens", "supervised", "padding", "pieces", "pieces_cut")


class Run:
    """One (arm, seed) run on ``source`` (a TokenSource). ``validate(run) -> dict``: the workload's validation
    scores (workload.py; "id" higher-is-better, and "ood_score", "learned", "noise_sd" for the OOD rule). ``lr``:
    its peak learning rate; ``init_state``: weights to start from (a fine-tune); ``rope_scaling``: a RopeScaling
    the run trains and validates with (a fine-tune), else None; ``cycles``: curriculum cycles multiplier;
    ``tokens_per_batch``: 0 = train.tokens_per_batch."""

    def __init__(self, plan, arm: ArmConfig, seed: int, source, run_dir: Path, *, budget: Budget,
                 seq_len: int, lr: float, validate, label: str | None = None, init_state: dict | None = None,
                 rope_scaling=None, cycles: int = 1, tokens_per_batch: int = 0):
        from .model import build_model
        cfg = plan.cfg
        tr = cfg.train
        self.plan, self.cfg, self.arm, self.seed, self.label = plan, cfg, arm, seed, label or arm.name
        self.validate_fn, self.run_dir, self.budget, self.lr_peak = validate, Path(run_dir), budget, lr
        self.seq_len, self.rope_scaling = seq_len, rope_scaling
        self.ctx = distributed.context()
        self.cuda = self.ctx.device.type == "cuda"
        torch.manual_seed(seed)
        self.model = build_model(plan)
        if init_state is not None:
            self.model.load_state_dict(init_state)
        self.model.attn_backend = tr.attn_backend or None
        self.train_model = self.ctx.wrap(self.model)  # dist: device, DDP / FSDP2 (before the optimizer)
        if tr.compile:
            self.train_model = torch.compile(self.train_model, dynamic=True)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                                     **({"fused": True} if self.cuda else {}))
        self.loader = make_loader(source, arm, seq_len, tokens_per_batch or tr.tokens_per_batch, seed,
                                  min_len=tr.min_len, cycles=cycles,
                                  prefetch=2 if self.cuda else 0, pin_memory=self.cuda)
        self.batches = None                                     # the loader's iterator, made at the first step
        self.doc_len = np.asarray(source.lengths, dtype=np.int64)
        self.num_params = self.model.num_params()
        self.gen = torch.Generator().manual_seed(seed + 1)      # position offsets
        self.ctx.seed_rank_streams(seed)
        self.stopper = EarlyStopper(drop=tr.early_stop_drop, z=tr.early_stop_z, min_steps=tr.early_stop_min_steps,
                                    patience=tr.early_stop_patience)
        self.step, self.evals_done, self.flops = 0, 0, 0.0
        self.train_time = self.cpu_time = self.eval_time = 0.0
        self.acct = dict.fromkeys(ACCT, 0)                      # global over ranks
        self.seen = np.zeros(len(self.doc_len), dtype=bool)     # this rank's documents (union at the end)
        self.cut = np.zeros(len(self.doc_len), dtype=bool)
        self.best_id, self.best_id_step = -math.inf, -1
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)  # read at evaluations only
        self.loss_tokens = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ schedule and budget
    def lr_at(self) -> float:
        tr = self.cfg.train
        frac = self.budget.frac(self)
        if frac < tr.warmup_frac:
            return self.lr_peak * max(frac / tr.warmup_frac, 1.0 / max(1, self.budget.max_steps))
        p = min(1.0, (frac - tr.warmup_frac) / max(1e-9, 1 - tr.warmup_frac))
        return self.lr_peak * (tr.min_lr_frac + (1 - tr.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    @property
    def halted(self) -> bool:
        """The budget is spent, the step cap is hit, or (train.early_stop) the OOD rule fired."""
        return (self.budget.spent(self) >= self.budget.amount or self.step >= self.budget.max_steps
                or (self.cfg.train.early_stop and self.stopper.stopped_at is not None))

    @property
    def dtype(self) -> str:
        """What the step computes in: bf16 autocast over the parameters' dtype on CUDA, else theirs."""
        weights = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return f"bfloat16 autocast, {weights} weights" if self.cuda else weights

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    # ------------------------------------------------------------------ the step
    def account(self, batch, labels: torch.Tensor, cu: torch.Tensor) -> list[float]:
        """This rank's totals for one micro-batch, in ACCT order, plus its attention FLOPs."""
        L = len(self.loader)
        _, _, doc, start, length, _ = self.loader.pieces(batch.epoch, batch.step - batch.epoch * L)
        whole = (start == 0) & (length == self.doc_len[doc])
        self.seen[doc] = True
        self.cut[doc[~whole]] = True
        real, slots = int(batch.num_tokens), int(labels.shape[0])
        pads = int((torch.as_tensor(batch.input_ids[:real]) == PAD).sum()) if self.arm.fit == "pad" else 0
        m = self.model.cfg
        return [slots, real, int((labels != IGNORE).sum()), slots - real + pads, len(doc), int((~whole).sum()),
                attention_flops(cu, m.n_layers, m.d_model)]

    def train_step(self) -> None:
        """One optimizer step over ``grad_accum`` micro-batches; the loss is the token mean over every rank's and
        micro-batch's labels, so W ranks reproduce one process with the whole batch."""
        tr = self.cfg.train
        if self.batches is None:
            self.batches = iter(self.loader)
        micro = [next(self.batches) for _ in range(tr.grad_accum)]
        inputs = [model_inputs(b, self.arm, self.gen, tr.pos_offset_max) for b in micro]
        local = np.sum([self.account(b, x[4], x[1]) for b, x in zip(micro, inputs)], axis=0)
        tot = self.ctx.host_sum(*local)                 # dist: one host reduction for all step totals
        scale = self.ctx.world_size / max(1.0, tot[2])  # DDP averages gradients: this gives the global mean
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at()
        for i, (tok, cu, ms, pos, lab) in enumerate(inputs):
            tok, cu, pos, lab = self.ctx.to_device(tok, cu, pos, lab)
            last = i == len(inputs) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.train_model, "no_sync") else \
                self.train_model.no_sync()
            with sync, self.autocast():
                loss = self.train_model(tok, cu, ms, pos, self.rope_scaling, labels=lab,
                                        loss_chunk=tr.loss_chunk)           # summed CE over this rank's labels
            (loss * scale).backward()
            self.loss_sum += loss.detach().double()
        if tr.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for k, v in zip(ACCT, tot):
            self.acct[k] += int(v)
        self.loss_tokens += int(local[2])
        self.flops += dense_flops(self.num_params, int(tot[0])) + tot[-1]
        self.step += 1

    def train_until(self, goal: float, bar=None) -> None:
        """Steps until ``goal`` of the budget (in its unit) is spent, or the run halts."""
        t0, c0 = time.perf_counter(), _cpu_clock()
        while self.budget.spent(self) < goal and not self.halted:
            before = self.budget.spent(self)
            self.train_step()
            if bar is not None:
                bar.update(self.budget.spent(self) - before)
        if self.cuda:
            torch.cuda.synchronize(self.ctx.device)   # the evaluation cadence is the only host sync
        self.train_time += time.perf_counter() - t0
        self.cpu_time += _cpu_clock() - c0

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self) -> dict:
        """Validate (the workload's scores), update the OOD rule and the best-ID selection, save checkpoints."""
        t0 = time.perf_counter()
        row = self.validate_fn(self)
        loss, n = self.ctx.host_sum(float(self.loss_sum.item()), self.loss_tokens)   # every rank's, since the last
        row.update(step=self.step, supervised=self.acct["supervised"], flops=self.flops, train_time=self.train_time,
                   train_loss=loss / max(1.0, n))
        self.loss_sum.zero_()
        self.loss_tokens = 0
        self.history.append(row)
        if "ood_score" in row:
            improved, _ = self.stopper.update(self.step, row["ood_score"], row["learned"], row["noise_sd"])
            if improved:
                self.save_weights("best_ood")
        if row["id"] >= self.best_id:  # ties: the later checkpoint (more training, same ID score)
            self.best_id, self.best_id_step = row["id"], self.step
            self.save_weights("best_id")
        self.evals_done += 1
        self.eval_time += time.perf_counter() - t0
        self.save(self.run_dir / "last.pt")
        return row

    def _meta(self) -> dict:
        return {"model_config": dict(self.model.cfg.__dict__), "arch": self.cfg.model.arch,
                "vocab_size": self.model.vocab_size, "arm": self.arm.knobs() | {"name": self.arm.name},
                "label": self.label, "seed": self.seed, "step": self.step, "context": self.seq_len}

    def save_weights(self, which: str) -> None:
        """Weights only (plus what lengen-eval needs to rebuild the model): best_id.pt, best_ood.pt."""
        state = self.ctx.model_state(self.model)                # collective under FSDP
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(self._meta() | {"model": state}, self.run_dir / f"{which}.pt")
        self.ctx.written(self.run_dir / f"{which}.pt")

    def state_dict(self) -> dict:
        return self._meta() | {
            "model": self.model.state_dict(), "opt": self.opt.state_dict(), "torch_rng": torch.get_rng_state(),
            "offset_rng": self.gen.get_state(), "loader": self.loader.state_dict(), "acct": dict(self.acct),
            "seen": torch.from_numpy(self.seen.copy()), "cut": torch.from_numpy(self.cut.copy()), "flops": self.flops,
            "evals_done": self.evals_done,
            "times": (self.train_time, self.cpu_time, self.eval_time), "history": self.history,
            "stopper": self.stopper.state_dict(), "best_id": (self.best_id, self.best_id_step),
            "loss": (float(self.loss_sum.item()), self.loss_tokens), "budget": self.budget.__dict__}

    def save(self, path: Path) -> None:
        state = self.ctx.checkpoint_state(self.state_dict(), self.model, self.opt, self.gen)  # collective
        if self.ctx.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(state, path)
        self.ctx.written(path)  # the other ranks may read it next (restore, resume)

    def load(self, path: Path) -> None:
        ck = read_checkpoint(path)
        check_compatible(ck, self.model.cfg, path)
        self.ctx.check_resume(ck, path)
        self.ctx.load_state(ck, self.model, self.opt, self.gen)  # model, optimizer, this rank's RNG
        self.loader.load_state_dict(ck["loader"])
        self.batches = None
        self.step, self.acct, self.flops, self.evals_done = ck["step"], dict(ck["acct"]), ck["flops"], ck["evals_done"]
        self.train_time, self.cpu_time, self.eval_time = ck["times"]
        self.seen, self.cut = np.asarray(ck["seen"]).copy(), np.asarray(ck["cut"]).copy()   # (torch bool tensors)
        self.history = ck["history"]
        self.stopper.load_state_dict(ck["stopper"])
        self.best_id, self.best_id_step = ck["best_id"]
        self.loss_sum.fill_(ck["loss"][0])
        self.loss_tokens = ck["loss"][1]

    def restore(self, which: str) -> bool:
        """Load the weights of checkpoint ``which`` ("best_id" | "best_ood" | "last"); False when absent."""
        path = self.run_dir / f"{which}.pt"
        if not path.exists():
            return False
        self.ctx.load_model(self.model, read_checkpoint(path)["model"])
        return True

    def accounting(self) -> dict:
        """The run's budget accounting: every count is global over ranks."""
        seen, cut = self.ctx.union(self.seen), self.ctx.union(self.cut)
        a = dict(self.acct)
        spent = self.budget.spent(self)
        a.update(steps=self.step, flops=self.flops, epochs=a["tokens"] / max(1, int(self.doc_len.sum())),
                 documents=int(len(self.doc_len)), documents_seen=int(seen.sum()), documents_cut=int(cut.sum()),
                 padding_frac=a["padding"] / max(1, a["slots"]), steps_per_epoch=len(self.loader),
                 budget_kind=self.budget.kind, budget=self.budget.amount, spent=spent,
                 budget_met=spent >= self.budget.amount, step_cap=self.budget.max_steps)
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
    mine = dict(model_cfg.__dict__)
    if ck.get("model_config") != mine:
        theirs = ck.get("model_config") or {}
        diff = {k: (theirs.get(k), mine.get(k)) for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k)}
        raise ValueError(f"cannot resume from {path}: its model config differs from this run's "
                         f"(field: (checkpoint, now)) {diff}")
