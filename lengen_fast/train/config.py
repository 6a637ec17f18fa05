"""Typed configs for lengen-train; the CLI maps one flag onto each field (``--d-model`` -> d_model).

Presets are small JSON files in ``presets/`` holding ``{"section": {"field": value}}`` overrides.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("copy_unique", "copy_repeat", "reverse", "parity", "majority", "addition", "passkey", "text")
STRATEGIES = ("concat_chunk", "pack_naive", "pack_masked", "vsl")
CURRICULA = ("natural", "grow_p2", "grow_linear", "uniform", "shrink")
POS_ENCODINGS = ("rope", "nope", "learned")
SCALINGS = ("linear", "ntk", "yarn")
PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0                 # 0 = n_heads (no GQA)
    mlp: str = "gelu"                   # gelu | swiglu
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    dropout: float = 0.0
    pos_encoding: str = "rope"          # rope | nope | learned
    rope_base: float = 10000.0
    max_positions: int = 256            # learned table size; must cover eval lengths + offsets


@dataclass
class TaskConfig:
    tasks: list[str] = field(default_factory=lambda: ["passkey", "majority", "parity"])
    train_min_len: int = 2              # problem size n (items / digits / filler tokens), not tokens
    train_max_len: int = 8
    eval_multiples: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    train_examples: int = 0             # per task (the Arrow table the data pipeline reads); 0 = enough
                                        # that one epoch covers all training steps (no example repeats)
    eval_examples: int = 96             # per task and eval length, for each of val and test
    alphabet: int = 64                  # symbols for copy/reverse; copy_unique needs n <= alphabet
    passkey_digits: int = 1             # 1: one content lookup; more digits need induction heads, which a
                                        # 2-layer d=64 model did not form within 400 steps on CPU
    scratchpad: bool = False            # parity/majority: running state; addition: carries
    index_hints: bool = False           # addition: position markers before each digit
    text_source: str = ""               # "" = the data pipeline's embedded corpus
    text_docs: int = 200


@dataclass
class TrainConfig:
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    curriculum: str = "grow_p2"         # vsl only
    num_cycles: int = 1
    tokens_per_batch: int = 1024
    seq_len: int = 0                    # row length (concat_chunk, pack) and largest vsl bucket; 0 = next
                                        # power of two >= the longest training document
    vsl_pad_pow2: bool = True           # vsl: pad documents to a power of two so decomposition keeps them whole
    steps: int = 500
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    pos_offset_max: int = 0             # random per-segment position offset in [0, max] while training;
                                        # for learned positions (RoPE is invariant to a shared offset)
    eval_every: int = 50
    early_stop_drop: float = 0.05       # stop when the OOD score (chance-corrected validation accuracy
                                        # beyond train_max_len of the tasks learned in distribution, i.e. ID
                                        # accuracy >= critical_threshold) falls more than this below its best
    early_stop_min_best: float = 0.05   # ... once the best OOD value is at least this (noise floor)
    early_stop_patience: int = 2        # ... for this many validations in a row (exact match on a few
                                        # dozen examples moves by several % from noise alone)
    early_stop: bool = True
    target_acc: float = 0.9             # "FLOPs to reach target": first eval with ID accuracy >= this
    critical_threshold: float = 0.9     # critical length: longest eval length with accuracy >= this
                                        # (well above chance: parity/majority score 0.5 by guessing)
    seeds: list[int] = field(default_factory=lambda: [0])
    threads: int = 0                    # torch threads; 0 = the cores not already busy (at least 1):
                                        # oversubscribed OpenMP threads make small ops ~50x slower
    attn_backend: str = ""              # "" = lengen_fast.backends default order


@dataclass
class ExtensionConfig:
    extend: bool = True
    ext_strategy: str = "pack_masked"   # strategy of the rope model that is pretrained short, then extended
                                        # (the comparison's own model when pos_encoding=rope)
    scalings: list[str] = field(default_factory=lambda: ["linear"])
    factor: float = 2.0                 # fine-tune at factor x train_max_len with this rope scaling
    ext_steps_frac: float = 0.1         # fine-tune steps as a fraction of pretraining steps


@dataclass
class DistConfig:
    """Data parallelism (lengen_fast.train.distributed); torchrun sets the world size itself."""
    nproc: int = 1                      # lengen-train --nproc N: spawn N local workers (loopback rendezvous)
    dist_backend: str = "auto"          # auto (nccl with CUDA, else gloo) | gloo | nccl
    parallel: str = "ddp"               # ddp | fsdp (FSDP2 fully_shard, torch >= 2.6)
    device: str = "auto"                # auto (cuda when torch sees a GPU) | cpu | cuda


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extension: ExtensionConfig = field(default_factory=ExtensionConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    out: str = "runs"                   # parent must exist; "runs/" is git-ignored
    resume: str = ""
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        cfg = cls()
        apply_overrides(cfg, d)
        return cfg


SECTIONS = {"model": ModelConfig, "task": TaskConfig, "train": TrainConfig, "extension": ExtensionConfig,
            "dist": DistConfig}


def apply_overrides(cfg: RunConfig, d: dict) -> None:
    """Set fields from ``{"section": {"field": v}}`` or top-level ``{"out": ...}``; unknown keys raise."""
    for key, val in d.items():
        if key in SECTIONS:
            sec = getattr(cfg, key)
            names = {f.name for f in dataclasses.fields(sec)}
            for k, v in val.items():
                if k not in names:
                    raise ValueError(f"unknown config field {key}.{k} (known: {sorted(names)})")
                setattr(sec, k, v)
        elif key in ("out", "resume", "progress"):
            setattr(cfg, key, val)
        else:
            raise ValueError(f"unknown config section {key!r} (known: {sorted(SECTIONS)} and out/resume/progress)")


def load_preset(name: str) -> dict:
    path = Path(name) if name.endswith(".json") else PRESET_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise ValueError(f"preset {name!r} not found (known presets: {known}, or a path to a .json file)")
    return json.loads(path.read_text())


def eval_lengths(task: TaskConfig) -> list[int]:
    return sorted({max(1, round(m * task.train_max_len)) for m in task.eval_multiples})


def validate(cfg: RunConfig, doc_max_tokens: int | None = None) -> None:
    """Every bad input gets a clear error here, before any training starts."""
    m, t, tr, ex = cfg.model, cfg.task, cfg.train, cfg.extension
    for name in t.tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
    if not t.tasks:
        raise ValueError("tasks is empty; choose from " + str(TASKS))
    for name in tr.strategies:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")
    if not tr.strategies:
        raise ValueError("strategies is empty; choose from " + str(STRATEGIES))
    if tr.curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {tr.curriculum!r}; choose from {CURRICULA}")
    if m.pos_encoding not in POS_ENCODINGS:
        raise ValueError(f"unknown pos_encoding {m.pos_encoding!r}; choose from {POS_ENCODINGS}")
    if m.mlp not in ("gelu", "swiglu"):
        raise ValueError(f"unknown mlp {m.mlp!r}; choose gelu or swiglu")
    kv = m.n_kv_heads or m.n_heads
    if m.d_model % m.n_heads or m.n_heads % kv or (m.d_model // m.n_heads) % 2:
        raise ValueError(f"d_model={m.d_model} must split into n_heads={m.n_heads} even-sized heads, "
                         f"and n_heads must be a multiple of n_kv_heads={kv}")
    if not 1 <= t.train_min_len <= t.train_max_len:
        raise ValueError(f"need 1 <= train_min_len <= train_max_len, got {t.train_min_len}, {t.train_max_len}")
    if not t.eval_multiples:
        raise ValueError("eval_multiples is empty")
    short = [x for x in t.eval_multiples if x < 1]
    if short:
        warnings.warn(f"eval_multiples {short} are below 1: those evaluation lengths are shorter than "
                      f"the training length {t.train_max_len}, so they measure nothing out of distribution",
                      stacklevel=2)
    if "copy_unique" in t.tasks and max(eval_lengths(t)) > t.alphabet:
        raise ValueError(f"copy_unique at eval length {max(eval_lengths(t))} needs alphabet >= that "
                         f"(alphabet={t.alphabet})")
    if t.passkey_digits < 1:
        raise ValueError(f"passkey_digits must be >= 1, got {t.passkey_digits}")
    if t.train_examples < 0 or t.eval_examples < 1:
        raise ValueError("train_examples must be >= 0 (0 = auto) and eval_examples >= 1")
    if doc_max_tokens is not None and tr.tokens_per_batch < doc_max_tokens:
        raise ValueError(f"tokens_per_batch={tr.tokens_per_batch} is smaller than the maximum training length "
                         f"({doc_max_tokens} tokens: the longest training document, or extension fine-tune "
                         "document, rounded up to a power of two); raise tokens_per_batch")
    if tr.steps < 1 or tr.eval_every < 1:
        raise ValueError("steps and eval_every must be >= 1")
    if tr.early_stop_patience < 1:
        raise ValueError(f"early_stop_patience must be >= 1, got {tr.early_stop_patience}")
    if not 0 <= tr.early_stop_drop < 1:
        raise ValueError(f"early_stop_drop must be in [0, 1), got {tr.early_stop_drop}")
    if tr.attn_backend not in ("", "cpu", "triton", "cuda", "reference"):
        raise ValueError(f"unknown attn_backend {tr.attn_backend!r}; choose '', cpu, triton, cuda or reference")
    if not tr.seeds:
        raise ValueError("seeds is empty")
    if ex.extend:
        if ex.ext_strategy not in STRATEGIES:
            raise ValueError(f"unknown ext_strategy {ex.ext_strategy!r}; choose from {STRATEGIES}")
        for s in ex.scalings:
            if s not in SCALINGS:
                raise ValueError(f"unknown rope scaling {s!r}; choose from {SCALINGS}")
        if ex.factor <= 1:
            raise ValueError(f"extension factor must be > 1, got {ex.factor}")
        if not 0 < ex.ext_steps_frac <= 1:
            raise ValueError(f"ext_steps_frac must be in (0, 1], got {ex.ext_steps_frac}")
    if m.pos_encoding == "learned":
        # longest eval document (tokens) plus offsets must fit in the learned table
        from .tasks import doc_tokens
        need = max(doc_tokens(name, n, t) for name in t.tasks if name != "text" for n in eval_lengths(t)) \
            if any(name != "text" for name in t.tasks) else 0
        need = max(need, max(eval_lengths(t)) if "text" in t.tasks else 0) + tr.pos_offset_max
        if need > m.max_positions:
            raise ValueError(f"max_positions={m.max_positions} is too small for learned positions: the longest "
                             f"eval document plus pos_offset_max needs {need}")
    out = Path(cfg.out)
    if not out.parent.exists():
        raise ValueError(f"output directory parent {str(out.parent)!r} does not exist")
