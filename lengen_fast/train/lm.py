"""lengen-train lm: does dataset decomposition train a language model faster than concat-and-chunk?

    python -m lengen_fast.train lm                        the CPU default (embedded corpus, L=2048)
    python -m lengen_fast.train lm --corpus DIR           a prepared corpus (lengen-data prepare)
    python -m lengen_fast.train lm --preset lm_gpt2 --device cuda [--compile]
    torchrun --nproc-per-node 8 -m lengen_fast.train lm --preset lm_gpt2

Arms are the fair-experiment knobs (packing concat | bfd | decompose, attention row | document,
positions row | document, curriculum), trained at EQUAL SUPERVISED TOKENS (labelled targets) from the
same seed-chosen training subset, one eval interval at a time in turn (so machine-load swings hit all
arms alike). Scoring is at the final checkpoint on held-out documents: validation loss against
wall-clock time and FLOPs (time to a target loss), and loss by position up to 8x the context, with
evaluation-time RoPE scaling arms and the staged recipe (pretrain at L, brief fine-tune at f x L).

Performance path: bf16 autocast on CUDA with fp32 weights and AdamW state, optional torch.compile,
the chunked loss (no (N, V) logits), pinned + prefetched batches copied non_blocking, gradient
accumulation, DDP under torchrun; the host syncs with the device only at the eval cadence.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import runinfo
from .config import ModelConfig
from .config import apply_overrides as _apply_overrides
from .lm_eval import (EvalDocs, choose_position_docs, loss_by_position, position_edges, t_interval,
                      validation_loss, verdict)
from .model import Transformer

PACKINGS = ("concat", "bfd", "decompose")
SPANS = ("row", "document")
CURRICULA = ("natural", "grow_p2", "grow_linear", "uniform", "shrink")
SCALINGS = ("none", "linear", "ntk", "yarn")
# peak dense bf16 tensor FLOP/s by device name, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


# ---------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Arm:
    """One experiment arm: the orthogonal knobs (names and semantics as in lengen-train's experiments)."""
    name: str
    packing: str = "concat"         # concat (cut every L) | bfd | decompose (power-of-two buckets up to L)
    attention: str = "row"          # row: attention spans the packed row | document: within each document
    positions: str = "row"          # row: positions run along the row | document: restart per document
    curriculum: str = "natural"     # decompose: which bucket each step draws from
    num_cycles: int = 1

    def knobs(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


ARM_PRESETS = {
    "concat": Arm("concat", "concat", "row", "row"),
    "concat_docmask": Arm("concat_docmask", "concat", "document", "document"),
    "dd_natural": Arm("dd_natural", "decompose", "document", "document", "natural"),
    "dd_grow_p2": Arm("dd_grow_p2", "decompose", "document", "document", "grow_p2"),
    "bfd_docmask": Arm("bfd_docmask", "bfd", "document", "document"),
}


def parse_arm(spec: str) -> Arm:
    """A preset name, or ``packing:attention:positions[:curriculum[:cycles]]`` (a new arm, no code change)."""
    if spec in ARM_PRESETS:
        return ARM_PRESETS[spec]
    parts = spec.split(":")
    if len(parts) < 3 or len(parts) > 5:
        raise ValueError(f"arm {spec!r} is neither a preset {sorted(ARM_PRESETS)} nor "
                         "packing:attention:positions[:curriculum[:cycles]]")
    packing, attention, positions = parts[:3]
    curriculum = parts[3] if len(parts) > 3 else "natural"
    try:
        cycles = int(parts[4]) if len(parts) > 4 else 1
    except ValueError:
        raise ValueError(f"arm {spec!r}: cycles {parts[4]!r} is not an int") from None
    arm = Arm(spec.replace(":", "_"), packing, attention, positions, curriculum, cycles)
    check_arm(arm)
    return arm


def check_arm(arm: Arm) -> None:
    if arm.packing not in PACKINGS:
        raise ValueError(f"arm {arm.name}: packing {arm.packing!r} is not one of {PACKINGS}")
    for knob in ("attention", "positions"):
        if getattr(arm, knob) not in SPANS:
            raise ValueError(f"arm {arm.name}: {knob} {getattr(arm, knob)!r} is not one of {SPANS}")
    if arm.curriculum not in CURRICULA:
        raise ValueError(f"arm {arm.name}: curriculum {arm.curriculum!r} is not one of {CURRICULA}")
    if arm.packing != "decompose" and (arm.curriculum != "natural" or arm.num_cycles != 1):
        raise ValueError(f"arm {arm.name}: a curriculum orders decomposition buckets; packing={arm.packing} "
                         "has one row length, so it needs curriculum natural and 1 cycle")
    if arm.num_cycles < 1:
        raise ValueError(f"arm {arm.name}: num_cycles must be >= 1, got {arm.num_cycles}")


@dataclass
class LMData:
    corpus: str = ""                # "" = the embedded stdlib-defs corpus; else a path / dir / glob for open_tokens
    column: str = "input_ids"
    heldout_frac: float = 0.05      # share of documents held out (embedded: whole files; prepared: by doc hash)
    corpus_files: int = 0           # embedded corpus: first N stdlib files only (0 = all; tests use a few)
    vocab_size: int = 0             # prepared corpus: 0 = from the source (or max token + 1)


@dataclass
class LMTrain:
    arms: list[str] = field(default_factory=lambda: ["concat", "concat_docmask", "dd_natural", "dd_grow_p2"])
    context: int = 2048             # L: concat/bfd row length and the largest decomposition bucket
    min_len: int = 64               # decompose: smallest bucket; shorter leftovers are BFD-packed into its rows
    tokens_per_batch: int = 8192    # token slots per micro-batch (all ranks)
    grad_accum: int = 1             # micro-batches per optimizer step
    budget_tokens: int = 262144     # supervised target tokens per arm (the equal budget)
    subset_factor: int = 1          # the seed's training subset holds subset_factor x budget tokens, and
                                    # decomposition curricula run subset_factor x num_cycles cycles, so a
                                    # small budget still samples many documents and whole curriculum cycles
    evals: int = 8                  # validation points per arm (eval every budget / evals supervised tokens)
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup_frac: float = 0.05       # of the budget, then cosine decay (by supervised tokens seen)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0])
    target_loss: float = 0.0        # time-to-target loss; 0 = auto (the highest final validation loss of any run)
    threads: int = 0                # CPU torch threads; 0 = the cores not already busy (at least 1)
    device: str = "auto"            # auto | cpu | cuda
    compile: bool = False
    loss_chunk: int = 4096          # rows of logits per chunk of the loss
    attn_backend: str = ""          # "" = lengen_fast.backends default
    peak_tflops: float = 0.0        # for MFU; 0 = from the GPU name (none on CPU)


@dataclass
class LMEval:
    val_tokens: int = 16384         # held-out validation tokens (documents cut at L) scored at every eval
    multiples: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    pos_docs: int = 2               # held-out test documents per position bucket (each cut at the bucket's end)
    extrap_arm: str = "dd_natural"  # arm whose final models get the evaluation-time scaling arms and the staged recipe
    scalings: list[str] = field(default_factory=lambda: list(SCALINGS))
    extrap_factor: float = 4.0      # evaluation-time RoPE scaling factor (original context L)
    staged: bool = True
    staged_factor: float = 4.0      # fine-tune at staged_factor x L ...
    staged_scaling: str = "yarn"    # ... with this RoPE scaling
    staged_frac: float = 0.05       # ... for this fraction of the pretraining supervised tokens
    staged_lr_frac: float = 0.3     # peak fine-tune lr as a fraction of lr


@dataclass
class LMConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(d_model=256, n_layers=2, n_heads=4,
                                                                   max_positions=2048))
    data: LMData = field(default_factory=LMData)
    train: LMTrain = field(default_factory=LMTrain)
    eval: LMEval = field(default_factory=LMEval)
    out: str = "runs/lm"
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": LMData, "train": LMTrain, "eval": LMEval}
PRESET_DIR = Path(__file__).parent / "presets"


def apply_overrides(cfg: LMConfig, d: dict, source: str = "overrides") -> None:
    """config.apply_overrides with LMConfig's sections (and its top-level out / progress)."""
    _apply_overrides(cfg, d, source, sections=SECTIONS, top_level=("out", "progress"))


def load_preset(name: str) -> dict:
    path = Path(name) if name.endswith(".json") else PRESET_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("lm_*.json"))
        raise ValueError(f"preset {name!r} not found (LM presets: {known}, or a path to a .json file)")
    return json.loads(path.read_text())


def validate(cfg: LMConfig) -> list[Arm]:
    """Every bad input fails here, before any data is read or model built."""
    m, tr, ev = cfg.model, cfg.train, cfg.eval
    arms = [parse_arm(a) for a in tr.arms]
    if not arms:
        raise ValueError("train.arms is empty; presets: " + ", ".join(ARM_PRESETS))
    if len({a.name for a in arms}) != len(arms):
        raise ValueError(f"train.arms has duplicates: {tr.arms}")
    L = tr.context
    if L < 2 or L & (L - 1):
        raise ValueError(f"context={L} must be a power of two >= 2 (the largest decomposition bucket)")
    if tr.min_len < 1 or tr.min_len & (tr.min_len - 1) or tr.min_len > L:
        raise ValueError(f"min_len={tr.min_len} must be a power of two in [1, context={L}]")
    if tr.tokens_per_batch < L:
        raise ValueError(f"tokens_per_batch={tr.tokens_per_batch} must be >= context={L} (one full row)")
    if tr.tokens_per_batch % L:
        raise ValueError(f"tokens_per_batch={tr.tokens_per_batch} must be a multiple of context={L}")
    for name in ("grad_accum", "budget_tokens", "evals", "loss_chunk", "subset_factor"):
        if getattr(tr, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(tr, name)}")
    if tr.budget_tokens < tr.evals:
        raise ValueError(f"budget_tokens={tr.budget_tokens} must be >= evals={tr.evals}")
    if not tr.seeds:
        raise ValueError("train.seeds is empty")
    if len(tr.seeds) < 2:
        warnings.warn(f"{len(tr.seeds)} seed: intervals need at least 2 seeds, so every verdict will say "
                      "inconclusive (use --seeds 0,1,2)", stacklevel=2)
    if tr.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {tr.device!r}")
    if tr.attn_backend not in ("", "cpu", "triton", "cuda", "reference"):
        raise ValueError(f"unknown attn_backend {tr.attn_backend!r}; choose '', cpu, triton, cuda or reference")
    if m.pos_encoding != "rope" and (ev.scalings != ["none"] or ev.staged):
        raise ValueError(f"pos_encoding={m.pos_encoding}: the extrapolation arms scale RoPE; use rope, or "
                         "--scalings none --no-staged")
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ValueError(f"d_model={m.d_model} must split into n_heads={m.n_heads} even-sized heads")
    if not ev.multiples or min(ev.multiples) <= 0:
        raise ValueError(f"eval.multiples must be positive numbers, got {ev.multiples}")
    for s in ev.scalings:
        if s not in SCALINGS:
            raise ValueError(f"unknown scaling {s!r}; choose from {SCALINGS}")
    if ev.staged_scaling not in SCALINGS[1:]:
        raise ValueError(f"staged_scaling must be one of {SCALINGS[1:]}, got {ev.staged_scaling!r}")
    if (ev.scalings or ev.staged) and ev.extrap_arm not in {a.name for a in arms}:
        raise ValueError(f"extrap_arm {ev.extrap_arm!r} is not among the arms {[a.name for a in arms]}")
    if ev.extrap_factor < 1 or ev.staged_factor <= 1:
        raise ValueError(f"extrap_factor must be >= 1 and staged_factor > 1, got {ev.extrap_factor}, "
                         f"{ev.staged_factor}")
    if ev.staged and (L * ev.staged_factor) != int(L * ev.staged_factor):
        raise ValueError(f"staged_factor={ev.staged_factor} x context={L} must be a whole number of tokens")
    if ev.staged and not 0 < ev.staged_frac <= 1:
        raise ValueError(f"staged_frac must be in (0, 1], got {ev.staged_frac}")
    if ev.val_tokens < 1 or ev.pos_docs < 1:
        raise ValueError("val_tokens and pos_docs must be >= 1")
    if not 0 < cfg.data.heldout_frac < 1:
        raise ValueError(f"heldout_frac must be in (0, 1), got {cfg.data.heldout_frac}")
    out = Path(cfg.out)
    if not out.parent.exists():
        raise ValueError(f"output directory parent {str(out.parent)!r} does not exist")
    return arms


# ---------------------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"--device cuda: no CUDA device is available (torch {torch.__version__} is {built}, "
                         "and torch.cuda.is_available() is False); run with --device cpu, or on a GPU machine")
    return torch.device(name)


def peak_flops(device: torch.device, override_tflops: float) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_FLOPS.items():
        if key in name:
            return v
    return None


def auto_threads() -> int:
    cores = os.cpu_count() or 1
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


# ---------------------------------------------------------------------------------- data
@dataclass
class Corpus:
    train: object                  # TokenSource of training documents
    heldout: list[np.ndarray]      # held-out documents (token arrays)
    vocab_size: int
    name: str
    long_heldout: list[np.ndarray] | None = None  # long held-out documents for loss by position (None: heldout)


def load_corpus(dc: LMData) -> Corpus:
    from ..data import open_tokens
    if not dc.corpus:
        from .lm_corpus import stdlib_corpus
        c = stdlib_corpus(dc.heldout_frac, dc.corpus_files or None)
        src = open_tokens(c.train, vocab_size=c.vocab_size)
        held_src, long_src = open_tokens(c.heldout), open_tokens(c.long_heldout)
        return Corpus(src, [held_src.tokens(i) for i in range(len(held_src))], c.vocab_size, c.name,
                      [long_src.tokens(i) for i in range(len(long_src))])
    try:
        src = open_tokens(dc.corpus, column=dc.column)
    except FileNotFoundError as e:
        raise ValueError(f"--corpus {dc.corpus!r}: {e}") from None
    if len(src) < 2:
        raise ValueError(f"--corpus {dc.corpus!r} has {len(src)} documents; need training and held-out ones")
    vocab = dc.vocab_size or src.vocab_size
    if not vocab:
        vocab = 1 + max(int(src.tokens(i).max()) for i in range(len(src)) if src.lengths[i])
    # held out by a hash of the document index: deterministic, independent of the seed
    h = (np.arange(len(src), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
    held = (h.astype(np.float64) / 2.0 ** 53) < dc.heldout_frac
    if held.all() or not held.any():
        raise ValueError(f"--corpus {dc.corpus!r}: heldout_frac={dc.heldout_frac} leaves no "
                         f"{'training' if held.all() else 'held-out'} documents among {len(src)}")
    tr_idx, ho_idx = np.flatnonzero(~held), np.flatnonzero(held)
    return Corpus(src.select(tr_idx), [src.tokens(int(i)) for i in ho_idx], int(vocab), str(dc.corpus))


def training_subset(src, tokens: int, seed: int, min_doc_len: int = 0):
    """A seed-chosen random subset of documents holding about ``tokens`` tokens (>= min_doc_len each),
    so that one epoch is the budget and a curriculum runs its whole course once."""
    rng = np.random.default_rng([seed, 7919])
    cand = np.flatnonzero(src.lengths >= max(1, min_doc_len))
    if cand.size == 0:
        raise ValueError(f"no training document has >= {min_doc_len} tokens")
    order = rng.permutation(cand)
    cum = np.cumsum(src.lengths[order])
    k = int(np.searchsorted(cum, tokens)) + 1
    if k > order.size:
        warnings.warn(f"the training documents hold {int(cum[-1])} tokens, fewer than the {tokens} asked for: "
                      "arms will see them more than once (epochs > 1 in the report)", stacklevel=2)
    return src.select(np.sort(order[:k]))


def make_loader(src, arm: Arm, tr: LMTrain, context: int, tokens_per_batch: int, seed: int, ctx, cuda: bool):
    from ..data import LoaderConfig, PackedLoader
    strategy = {"concat": "concat_chunk", "bfd": "pack", "decompose": "vsl"}[arm.packing]
    dd = arm.packing == "decompose"
    lc = LoaderConfig(strategy=strategy, tokens_per_batch=tokens_per_batch, max_len=context, min_len=min(tr.min_len, context) if dd else 1,
                      remainder=dd, curriculum=arm.curriculum, num_cycles=arm.num_cycles * tr.subset_factor,
                      seed=seed,
                      rank=ctx.rank, world_size=ctx.world_size, pin_memory=cuda, prefetch=2, infinite=True)
    return PackedLoader(src, lc)


def arm_inputs(batch, arm: Arm):
    """Batch -> (tokens, cu_seqlens, max_seqlen, positions, labels, cu for FLOPs) on the host.

    attention row: segments are the packed rows (cross-document attention); document: one per piece.
    positions row: the index inside the row; document: restart per piece. Tail padding gets position 0.
    """
    N = batch.input_ids.shape[0]
    row_cu = batch.row_cu_seqlens.numpy().astype(np.int64)
    if arm.attention == "row":
        cu, max_seqlen = batch.row_cu_seqlens, int(batch.seq_len)
    else:
        cu, max_seqlen = batch.cu_seqlens, max(1, int(batch.max_seqlen))
    if arm.positions == "document":
        positions = batch.position_ids
    else:
        pos = np.zeros(N, dtype=np.int64)
        lens = np.diff(row_cu)
        real = int(row_cu[-1])
        pos[:real] = np.arange(real) - np.repeat(row_cu[:-1], lens)
        positions = torch.from_numpy(pos)
    return batch.input_ids, cu, max_seqlen, positions, batch.labels


def attention_flops(cu: np.ndarray, n_layers: int, d_model: int) -> float:
    """Causal attention FLOPs fwd+bwd (flash-attn's count: fwd 4*sum(s^2)*d/2, bwd 2.5x fwd)."""
    s = np.diff(cu.astype(np.int64)).astype(np.float64)
    return 3.5 * 2.0 * float((s * s).sum()) * d_model * n_layers


# ---------------------------------------------------------------------------------- one arm
class ArmRun:
    """One (arm, seed) training run, advanced in chunks of supervised tokens by :meth:`train_until`."""

    def __init__(self, cfg: LMConfig, arm: Arm, seed: int, src, vocab: int, device: torch.device, ctx, *,
                 budget: int, context: int, tokens_per_batch: int, lr: float, rope_scaling=None,
                 init_state: dict | None = None, label: str | None = None):
        self.cfg, self.arm, self.seed, self.label = cfg, arm, seed, label or arm.name
        self.budget, self.context, self.lr_peak = budget, context, lr
        self.device, self.ctx = device, ctx
        self.cuda = device.type == "cuda"
        torch.manual_seed(seed)
        self.model = Transformer(cfg.model, vocab)
        if init_state is not None:
            self.model.load_state_dict(init_state)
        self.model.attn_backend = cfg.train.attn_backend or None
        self.rope_scaling = rope_scaling          # training-time scaling (the staged fine-tune); None otherwise
        self.train_model = ctx.wrap(self.model)   # device; DDP under torchrun
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model, dynamic=True)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                                     **({"fused": True} if self.cuda else {}))
        self.loader = make_loader(src, arm, cfg.train, context, tokens_per_batch, seed, ctx, self.cuda)
        self.steps_per_epoch = len(self.loader)
        self.batches = iter(self.loader)
        self.params = self.model.num_params()
        self.step = 0
        self.supervised = self.slots = self.real = self.pieces = 0
        self.flops = self.train_time = self.eval_time = self.cpu_time = 0.0
        self.epoch = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on device, read at evals
        self.loss_tokens = 0
        self.history: list[dict] = []

    def lr_at(self) -> float:
        tr = self.cfg.train
        frac = self.supervised / self.budget
        if frac < tr.warmup_frac:
            return self.lr_peak * max(frac / tr.warmup_frac, 0.02)
        p = min(1.0, (frac - tr.warmup_frac) / max(1e-9, 1 - tr.warmup_frac))
        return self.lr_peak * (tr.min_lr_frac + (1 - tr.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    @property
    def dtype(self) -> str:
        """What the training step computes in: bf16 autocast over the parameters' dtype on CUDA, else theirs."""
        weights = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return f"bfloat16 autocast, {weights} weights" if self.cuda else weights

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)

    def train_until(self, target: int) -> None:
        """Optimizer steps until ``target`` supervised tokens (all ranks) have been trained on."""
        tr = self.cfg.train
        t0, c0 = time.perf_counter(), _cpu_clock()
        while self.supervised < target:
            micro = [next(self.batches) for _ in range(tr.grad_accum)]
            inputs = [arm_inputs(b, self.arm) for b in micro]
            counts = [int((x[4] != -100).sum()) for x in inputs]         # host tensors: no device sync
            n_sup = self.ctx_sum(sum(counts))
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at()
            for i, (b, (tok, cu, ms, pos, lab)) in enumerate(zip(micro, inputs)):
                tok, cu_d, pos, lab = (t.to(self.device, non_blocking=True) for t in (tok, cu, pos, lab))
                sync_ctx = (self.train_model.no_sync() if i < len(micro) - 1 and hasattr(self.train_model, "no_sync")
                            else _null())
                with sync_ctx, self._autocast():
                    loss = self.train_model(tok, cu_d, ms, pos, labels=lab, rope_scaling=self.rope_scaling,
                                            loss_chunk=tr.loss_chunk)              # summed CE over labels
                # DDP averages gradients over ranks: scale so the result is the global token mean
                (loss * (self.ctx.world_size / max(1, n_sup))).backward()
                self.loss_sum += loss.detach().double()
                cu_np = cu.numpy()
                self.flops += (6.0 * self.params * tok.shape[0] + attention_flops(cu_np, self.cfg.model.n_layers,
                                                                                   self.cfg.model.d_model)) \
                    * self.ctx.world_size
                self.slots += int(tok.shape[0]) * self.ctx.world_size
                self.real += int(b.num_tokens) * self.ctx.world_size
                self.pieces += (int(b.cu_seqlens.shape[0]) - 1) * self.ctx.world_size
                self.epoch = int(b.epoch)
            if tr.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.supervised += n_sup
            self.loss_tokens += sum(counts)
            self.step += 1
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the eval cadence is the only host sync
        self.train_time += time.perf_counter() - t0
        self.cpu_time += _cpu_clock() - c0  # CPU seconds spent: robust to the neighbours of a shared machine

    def ctx_sum(self, v: int) -> int:
        """Sum a host-side count over ranks on a gloo group: no device sync, even under nccl."""
        if not self.ctx.enabled:
            return v
        import torch.distributed as dist
        t = torch.tensor([v], dtype=torch.int64)
        dist.all_reduce(t, group=_host_group())
        return int(t.item())

    def evaluate(self, val: EvalDocs) -> dict:
        t0 = time.perf_counter()
        train_loss = float(self.loss_sum.item()) / max(1, self.loss_tokens)  # mean since the last eval (this rank)
        self.loss_sum.zero_()
        self.loss_tokens = 0
        vl = self.val_loss(val, self.rope_scaling)  # the fine-tune is scored with the scaling it trained with
        self.eval_time += time.perf_counter() - t0
        row = {"step": self.step, "supervised": self.supervised, "train_time": self.train_time,
               "flops": self.flops, "train_loss": train_loss, "val_loss": vl}
        self.history.append(row)
        return row

    def val_loss(self, val: EvalDocs, rope_scaling=None) -> float:
        return validation_loss(self.model, val, device=self.device, rope_scaling=rope_scaling,
                               autocast=self._autocast if self.cuda else None, loss_chunk=self.cfg.train.loss_chunk)

    def by_position(self, docs: EvalDocs, edges: list[int], rope_scaling=None) -> list[dict]:
        return loss_by_position(self.model, docs, edges, device=self.device, rope_scaling=rope_scaling,
                                autocast=self._autocast if self.cuda else None, loss_chunk=self.cfg.train.loss_chunk)

    def summary(self, peak: float | None) -> dict:
        tps = self.supervised / self.train_time if self.train_time else math.nan
        fps = self.flops / self.train_time if self.train_time else math.nan
        return {"arm": self.label, "knobs": self.arm.knobs(), "seed": self.seed, "steps": self.step,
                "supervised_tokens": self.supervised, "real_tokens": self.real, "slots": self.slots,
                "padding": self.slots - self.real, "pieces": self.pieces,
                "epochs": self.real / max(1, self.loader.source.num_tokens),
                "train_time_s": self.train_time, "eval_time_s": self.eval_time, "flops": self.flops,
                "supervised_tokens_per_s": tps, "cpu_time_s": self.cpu_time,
                "supervised_tokens_per_cpu_s": self.supervised / self.cpu_time if self.cpu_time else math.nan,
                "slot_tokens_per_s": self.slots / self.train_time
                if self.train_time else math.nan, "flops_per_s": fps,
                "mfu": fps / peak if peak else None, "final_val_loss": self.history[-1]["val_loss"]
                if self.history else math.nan, "history": self.history}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


_HOST_GROUP = None


def _cpu_clock() -> float:
    """CPU seconds of the compute: this thread's alone with one torch thread (the loaders' prefetch threads,
    which serve every arm, are left out), else the whole process's."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def _host_group():
    global _HOST_GROUP
    if _HOST_GROUP is None:
        import torch.distributed as dist
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def make_scaling(kind: str, factor: float, orig: int):
    from ..rope import RopeScaling
    if kind == "none":
        return None
    return RopeScaling(kind=kind, factor=float(factor), original_max_position_embeddings=int(orig))


# ---------------------------------------------------------------------------------- experiment
def time_to_target(history: list[dict], target: float) -> dict:
    """Train time, FLOPs and supervised tokens at which validation loss first reaches ``target``: linear
    interpolation between the eval before the crossing and the first eval at or below it (the first
    eval's own values when it is already there); None when no eval reaches the target."""
    prev = None
    for row in history:
        if row["val_loss"] <= target:
            if prev is None or prev["val_loss"] <= row["val_loss"]:
                w = 1.0
            else:
                w = (prev["val_loss"] - target) / (prev["val_loss"] - row["val_loss"])
            at = (lambda k: row[k] if prev is None else prev[k] + w * (row[k] - prev[k]))
            return {"time_s": at("train_time"), "flops": at("flops"), "supervised": at("supervised")}
        prev = row
    return {"time_s": None, "flops": None, "supervised": None}


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_lm(cfg: LMConfig, log=_log) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # main() has shown validate's warnings already
        arms = validate(cfg)
    tr, ev = cfg.train, cfg.eval
    ctx = _context(tr.device)
    device = ctx.device
    if device.type == "cpu":
        torch.set_num_threads(tr.threads or auto_threads())
    L = tr.context
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(exist_ok=True)
        (out / "ckpt").mkdir(exist_ok=True)
    t_start = time.time()
    # how this ran (report.json "run", the header of report.md); dtype: the arm runs' own, set below
    run_info = runinfo.collect(device=device, parallel=ctx.parallel if ctx.enabled else "none",
                               requested_backends={"attention": tr.attn_backend or None})
    corpus = load_corpus(cfg.data)
    held = corpus.heldout
    val_docs = EvalDocs([np.asarray(d[:L]) for d in held[0::2] if len(d) > 1])  # validation: even held-out docs
    keep, n = [], 0
    for d in val_docs.docs:
        if n >= ev.val_tokens:
            break
        keep.append(d)
        n += len(d)
    val = EvalDocs(keep)
    # position test set: the corpus's long held-out documents (embedded: whole held-out files, which share no
    # text with training), else the odd held-out documents (disjoint from validation)
    test_held = [d for d in (corpus.long_heldout or held[1::2]) if len(d) > 1]
    edges = position_edges(L, ev.multiples)
    pos_docs, notes = choose_position_docs(test_held, edges, ev.pos_docs)
    for note in notes:
        log(f"lengen-train lm: note: {note}")
    peak = peak_flops(device, tr.peak_tflops)
    lengths = corpus.train.lengths
    log(f"corpus {corpus.name}: {len(lengths)} training documents, {int(lengths.sum()):,} tokens, median "
        f"{int(np.median(lengths))}; held-out val {len(val.docs)} docs / {val.num_tokens:,} tokens, position test "
        f"{len(pos_docs.docs)} docs; device {device}, threads {torch.get_num_threads()}, world {ctx.world_size}")
    runs_out: list[dict] = []
    extrap: list[dict] = []
    staged: list[dict] = []
    for seed in tr.seeds:
        sub = training_subset(corpus.train, tr.budget_tokens * tr.subset_factor, seed)
        runs = [ArmRun(cfg, a, seed, sub, corpus.vocab_size, device, ctx, budget=tr.budget_tokens, context=L,
                       tokens_per_batch=tr.tokens_per_batch, lr=tr.lr) for a in arms]
        run_info["dtype"] = runs[0].dtype
        for k in range(1, tr.evals + 1):  # arms take turns, one eval interval each
            goal = -(-tr.budget_tokens * k // tr.evals)
            for r in runs:
                r.train_until(goal)
                row = r.evaluate(val)
                if cfg.progress and ctx.is_main:
                    log(f"seed {seed} {r.label:>16} step {r.step:5d} sup {r.supervised:>10,} "
                        f"train {row['train_loss']:.3f} val {row['val_loss']:.3f} "
                        f"{r.supervised / r.train_time:,.0f} sup tok/s  t {r.train_time:.0f}s")
        for r in runs:
            s = r.summary(peak)
            s["loss_by_position"] = r.by_position(pos_docs, edges)
            runs_out.append(s)
            if ctx.is_main:
                torch.save({"model": r.model.state_dict(), "model_config": dataclasses.asdict(cfg.model),
                            "arm": r.arm.knobs(), "seed": seed}, out / "ckpt" / f"{r.label}_s{seed}.pt")
        _save_partial(out, cfg, runs_out, extrap, staged, notes, ctx)
        base = next((r for r in runs if r.label == ev.extrap_arm), None)
        if base is not None:
            own = next(s["loss_by_position"] for s in runs_out if s["arm"] == base.label and s["seed"] == seed)
            for kind in ev.scalings:  # "none" is the arm's own evaluation above
                sc = make_scaling(kind, ev.extrap_factor, L)
                extrap.append({"arm": base.label, "seed": seed, "scaling": kind,
                               "factor": ev.extrap_factor if kind != "none" else 1.0,
                               "loss_by_position": own if sc is None else base.by_position(pos_docs, edges,
                                                                                          rope_scaling=sc)})
            if ev.staged:
                try:
                    staged.append(run_staged(cfg, base, corpus, seed, device, ctx, pos_docs, edges, val, log))
                except ValueError as e:  # keep every other result: say why the staged arm is missing
                    notes.append(f"seed {seed}: the staged fine-tune could not run: {e}")
                    log(f"lengen-train lm: note: {notes[-1]}")
        _save_partial(out, cfg, runs_out, extrap, staged, notes, ctx)
        del runs
    report = {"run": run_info, "config": cfg.to_dict(), "machine": machine(device), "corpus": corpus_stats(corpus, val, pos_docs),
              "edges": edges, "notes": notes, "runs": runs_out, "extrapolation": extrap, "staged": staged,
              "wall_time_s": time.time() - t_start}
    finish_report(report, tr.target_loss)
    return report


def _save_partial(out: Path, cfg, runs_out, extrap, staged, notes, ctx) -> None:
    """partial_report.json: every result so far, so a failure later in a long run loses nothing measured."""
    if ctx.is_main:
        (out / "partial_report.json").write_text(json.dumps(
            {"config": cfg.to_dict(), "notes": notes, "runs": runs_out, "extrapolation": extrap, "staged": staged},
            indent=1, default=float))


def run_staged(cfg, base: ArmRun, corpus, seed, device, ctx, pos_docs, edges, val, log) -> dict:
    """Pretrain at L (``base``), then fine-tune at staged_factor x L with a RoPE scaling on long documents."""
    tr, ev = cfg.train, cfg.eval
    L2 = int(tr.context * ev.staged_factor)
    budget = max(1, int(ev.staged_frac * base.supervised))
    sc = make_scaling(ev.staged_scaling, ev.staged_factor, tr.context)
    # long documents (> L) carry what a longer context can learn: the Llama-3 recipe upweights them
    # enough documents for the loader to fill whole batches in every bucket it uses, even for a tiny budget
    tpb = max(tr.tokens_per_batch, L2)
    sub = training_subset(corpus.train, max(budget * tr.subset_factor, 16 * tpb), seed + 100_003,
                          min_doc_len=tr.context + 1)
    arm = dataclasses.replace(base.arm, curriculum="natural", num_cycles=1)
    ft = ArmRun(cfg, arm, seed, sub, corpus.vocab_size, device, ctx, budget=budget, context=L2,
                tokens_per_batch=tpb, lr=tr.lr * ev.staged_lr_frac, rope_scaling=sc,
                init_state={k: v.detach().cpu() for k, v in base.model.state_dict().items()},
                label=f"{base.label}+ft{ev.staged_factor:g}x_{ev.staged_scaling}")
    ft.train_until(budget)
    ft.evaluate(val)
    log(f"seed {seed} staged {ft.label}: {ft.supervised:,} supervised tokens at {L2}, "
        f"{ft.flops / base.flops:.3f} of pretraining FLOPs, {ft.train_time:.0f}s")
    return {"arm": ft.label, "base": base.label, "seed": seed, "context": L2, "scaling": ev.staged_scaling,
            "factor": ev.staged_factor, "supervised_tokens": ft.supervised, "flops": ft.flops,
            "train_time_s": ft.train_time, "compute_frac": ft.flops / base.flops if base.flops else math.nan,
            "time_frac": ft.train_time / base.train_time if base.train_time else math.nan,
            "val_loss_at_L": ft.history[-1]["val_loss"],
            "loss_by_position": ft.by_position(pos_docs, edges, rope_scaling=sc)}


def _context(device_name: str):
    from . import distributed
    dev = resolve_device(device_name)
    return distributed.init_distributed("auto", "ddp", dev.type)


def corpus_stats(corpus: Corpus, val: EvalDocs, pos_docs: EvalDocs) -> dict:
    lens = corpus.train.lengths
    hl = np.array([len(d) for d in corpus.heldout])
    q = (lambda a: {p: int(np.percentile(a, p)) for p in (25, 50, 75, 90, 99)} if len(a) else {})
    return {"name": corpus.name, "vocab_size": corpus.vocab_size, "train_docs": int(len(lens)),
            "train_tokens": int(lens.sum()), "train_length_percentiles": q(lens),
            "heldout_docs": int(len(hl)), "heldout_tokens": int(hl.sum()), "heldout_max_len": int(hl.max()),
            "val_docs": len(val.docs), "val_tokens": val.num_tokens,
            "position_source": "whole held-out files" if corpus.long_heldout else "odd held-out documents",
            "position_docs": len(pos_docs.docs), "position_doc_lens": [len(d) for d in pos_docs.docs]}


def machine(device: torch.device) -> dict:
    """experiment.machine() (CPU, load, versions) plus the device this run trained on."""
    from .experiment import machine as host
    return host() | {"device": str(device),
                     "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def finish_report(report: dict, target_loss: float) -> None:
    """Time to target, per-arm means with 95% intervals, and paired verdicts against concat."""
    runs = report["runs"]
    finals = [r["final_val_loss"] for r in runs]
    target = target_loss if target_loss > 0 else max(finals)
    report["target"] = {"loss": target, "rule": ("given" if target_loss > 0 else
                        "auto: the highest final validation loss of any (arm, seed), so every run reaches it")
                        + "; time and FLOPs interpolated linearly between the evals around the crossing"}
    for r in runs:
        r["to_target"] = time_to_target(r["history"], target)
    names = list(dict.fromkeys(r["arm"] for r in runs))
    summ = {}
    for a in names:
        rs = [r for r in runs if r["arm"] == a]
        row = {"knobs": rs[0]["knobs"], "seeds": [r["seed"] for r in rs], "reached_target": sum(
            r["to_target"]["time_s"] is not None for r in rs)}
        for key in ("supervised_tokens_per_s", "supervised_tokens_per_cpu_s", "final_val_loss", "train_time_s",
                    "flops", "epochs", "mfu"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = t_interval(vals) if vals else None
        for key in ("time_s", "flops"):
            row[f"to_target_{key}"] = t_interval([r["to_target"][key] for r in rs if r["to_target"][key] is not None])
        nb = len(report["edges"]) - 1
        row["loss_by_position"] = [t_interval([r["loss_by_position"][i]["loss"] for r in rs
                                               if r["loss_by_position"][i]["loss"] is not None]) for i in range(nb)]
        summ[a] = row
    report["summary"] = summ
    base = "concat" if "concat" in names else names[0]
    comps = []
    by = {(r["arm"], r["seed"]): r for r in runs}
    for a in names:
        if a == base:
            continue
        seeds = [s for (n, s) in by if n == a and (base, s) in by]
        pair = [(by[(a, s)], by[(base, s)]) for s in seeds]
        tps = [math.log(x["supervised_tokens_per_s"] / y["supervised_tokens_per_s"]) for x, y in pair]
        ttt = [math.log(x["to_target"]["time_s"] / y["to_target"]["time_s"]) for x, y in pair
               if x["to_target"]["time_s"] and y["to_target"]["time_s"]]
        fl = [x["final_val_loss"] - y["final_val_loss"] for x, y in pair]
        c = {"arm": a, "baseline": base, "seeds": seeds,
             "tokens_per_s_ratio": [x["supervised_tokens_per_s"] / y["supervised_tokens_per_s"] for x, y in pair],
             "time_to_target_ratio": [x["to_target"]["time_s"] / y["to_target"]["time_s"] for x, y in pair
                                      if x["to_target"]["time_s"] and y["to_target"]["time_s"]],
             "log_tokens_per_s": verdict(tps, "higher"), "log_time_to_target": verdict(ttt, "lower"),
             "final_val_loss": verdict(fl, "lower")}
        comps.append(c)
    report["comparisons"] = comps


# ---------------------------------------------------------------------------------- CLI
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _list_parser(elem):
    def parse(s: str):
        return [elem(x) for x in s.split(",") if x != ""]
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lengen-train lm", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lm_cpu", help="an LM preset (lm_cpu, lm_gpt2, lm_tiny) or a .json path")
    p.add_argument("--out", help="output directory (its parent must exist)")
    p.add_argument("--no-progress", action="store_true")
    seen = set()
    for sec, cls in SECTIONS.items():
        g = p.add_argument_group(sec)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            t = hints[f.name]
            dest = f"{sec}.{f.name}"
            if t is bool:
                g.add_argument(_flag(f.name), dest=dest, action="store_true", default=None)
                g.add_argument(_flag("no_" + f.name), dest=dest, action="store_false", default=None)
            elif typing.get_origin(t) is list:
                (elem,) = typing.get_args(t)
                g.add_argument(_flag(f.name), dest=dest, type=_list_parser(elem), default=None, metavar="A,B")
            else:
                g.add_argument(_flag(f.name), dest=dest, type=t, default=None)
    return p


def config_from_args(argv: list[str]) -> LMConfig:
    args = build_parser().parse_args(argv)
    cfg = LMConfig()
    apply_overrides(cfg, load_preset(args.preset), source=f"preset {args.preset!r}")
    over: dict = {}
    for k, v in vars(args).items():
        if "." in k and v is not None:
            sec, name = k.split(".", 1)
            over.setdefault(sec, {})[name] = v
    apply_overrides(cfg, over, source="command line")
    if args.out:
        cfg.out = args.out
    if args.no_progress:
        cfg.progress = False
    return cfg


def main(argv: list[str] | None = None) -> int:
    from .lm_report import write_reports
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config_from_args(argv)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                validate(cfg)
                resolve_device(cfg.train.device)
            finally:
                for w in caught:
                    print(f"lengen-train lm: warning: {w.message}", file=sys.stderr)
    except (ValueError, TypeError) as e:
        print(f"lengen-train lm: error: {e}", file=sys.stderr)
        return 2
    from . import distributed
    try:
        report = run_lm(cfg)
        if distributed.context().is_main:
            paths = write_reports(report, Path(cfg.out))
            print(f"report: {paths['md']}")
    except ValueError as e:
        print(f"lengen-train lm: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0
