"""Which settings define a lengen-train run? One typed config for every workload; one CLI flag per field.

A run trains arms (arms.py) x seeds on a workload: ``tasks`` (synthetic length-generalization tasks scored by
exact match, plus natural text) or ``corpus`` (a text corpus scored by loss, loss by position and time to a
target loss). Sections: model, task (the tasks workload), corpus (the corpus workload), train (arms, budget,
optimizer, seeds and workers), extension (the RoPE context-extension study) and dist (data parallelism).
Every field carries one sentence of help (``opt``), which ``lengen-train --help`` prints with the default.

Presets are small JSON files in ``presets/`` holding ``{"section": {"field": value}}``; each belongs to one
workload (PRESETS), so ``--preset quick`` is the tasks smoke run and ``lengen-train lm --preset quick`` the
corpus one. This module only describes and type-checks fields (:func:`check_fields`: every error names its
field); :mod:`.plan` turns a config into the one validated, frozen plan a run follows.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import TASKS

WORKLOADS = ("tasks", "corpus")
POS_ENCODINGS = ("rope", "nope", "learned")
SCALINGS = ("linear", "ntk", "dynamic", "yarn", "llama3")
BUDGETS = ("supervised", "flops", "steps")   # what arms are equalized on
ATTN_BACKENDS = ("", "cpu", "triton", "cuda", "reference")
PRESET_DIR = Path(__file__).parent / "presets"
# preset name -> file, per workload: the same word means the same kind of run in both
PRESETS = {"tasks": {"default": "default", "quick": "quick", "long": "long"},
           "corpus": {"default": "lm_cpu", "quick": "lm_tiny", "lm_cpu": "lm_cpu", "lm_tiny": "lm_tiny",
                      "lm_gpt2": "lm_gpt2"}}


def opt(default, help: str):
    """A config field with its one-sentence help (printed by --help with the default)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    arch: str = opt("lengen", "the model: lengen (our decoder) or hf:PATH (a Hugging Face config.json or "
                              "checkpoint directory, trained from its own initialization)")
    d_model: int = opt(64, "model width")
    n_layers: int = opt(2, "transformer blocks")
    n_heads: int = opt(4, "attention heads")
    n_kv_heads: int = opt(0, "key/value heads for GQA (0 = n_heads)")
    mlp: str = opt("gelu", "MLP kind: gelu or swiglu (swiglu exports to Llama)")
    mlp_ratio: int = opt(4, "MLP hidden size as a multiple of d_model")
    tie_embeddings: bool = opt(True, "share the input embedding and the output head")
    dropout: float = opt(0.0, "dropout probability")
    pos_encoding: str = opt("rope", "positions: rope, nope or learned")
    rope_base: float = opt(10000.0, "RoPE base (theta)")
    max_positions: int = opt(256, "learned position table size; must cover eval lengths plus offsets")


@dataclass
class TaskConfig:
    tasks: list[str] = opt(["passkey", "majority", "parity", "text"], f"tasks to train and score, from {TASKS}")
    train_min_len: int = opt(2, "smallest training problem size n (items, digits or filler tokens)")
    train_max_len: int = opt(8, "largest training problem size n; longer is out of distribution")
    eval_multiples: list[float] = opt([1.0, 2.0, 4.0], "evaluation sizes as multiples of train_max_len")
    train_examples: int = opt(0, "training examples per task (0 = about 0.8 of an epoch for the budget)")
    eval_examples: int = opt(96, "distinct prompts per task and length, for each of validation and test")
    alphabet: int = opt(64, "symbols for copy/reverse (copy_unique needs n <= alphabet)")
    passkey_digits: int = opt(1, "digits of the passkey (more need induction heads)")
    scratchpad: bool = opt(False, "parity/majority: running state; addition: carries")
    index_hints: bool = opt(False, "addition: position markers before each digit")
    text_source: str = opt("", "natural text for the text task ('' = the embedded corpus, else a path or dir)")
    text_docs: int = opt(400, "training pieces of natural text")


@dataclass
class CorpusConfig:
    corpus: str = opt("", "training text ('' = the embedded stdlib definitions, else a lengen-data prepare dir, "
                          "file or glob)")
    column: str = opt("input_ids", "token column of a prepared corpus")
    heldout_frac: float = opt(0.05, "share of documents held out (embedded: whole files; prepared: by hash)")
    corpus_files: int = opt(0, "embedded corpus: first N stdlib files only (0 = all)")
    vocab_size: int = opt(0, "prepared corpus vocabulary (0 = from its manifest, else max token + 1)")
    subset_factor: int = opt(1, "each seed trains on a random subset of this many budgets of tokens")
    val_tokens: int = opt(16384, "held-out validation tokens scored at every evaluation")
    multiples: list[float] = opt([1.0, 2.0, 4.0, 8.0], "loss-by-position bucket edges as multiples of seq_len")
    pos_docs: int = opt(2, "held-out test documents per position bucket")
    target_loss: float = opt(0.0, "time-to-target loss (0 = the highest final validation loss of any run)")


@dataclass
class TrainConfig:
    arms: list[str] = opt(["concat_chunk", "pack_naive", "pack_masked", "vsl"], "arms: presets, aliases or "
                          "name:knob=value,... specs")
    baseline: str = opt("", "arm every other arm is compared with ('' = concat_chunk or concat if present, "
                            "else the first arm)")
    budget: str = opt("supervised", f"what arms are equalized on: {', '.join(BUDGETS)}")
    budget_tokens: int = opt(0, "supervised target tokens per arm (0 = what `steps` full batches hold)")
    budget_flops: float = opt(0.0, "budget=flops: FLOPs per arm (0 = `steps` full batches)")
    steps: int = opt(500, "steps that size the budget (budget=steps: the budget itself)")
    max_steps_factor: float = opt(2.0, "an arm gets at most this x the steps it should need (else it is flagged)")
    tokens_per_batch: int = opt(1024, "token slots per micro-batch, over all ranks")
    seq_len: int = opt(0, "row length and largest decomposition bucket, the context L (0 = tasks: the next "
                          "power of two >= the longest document)")
    min_len: int = opt(0, "decompose: smallest bucket (0 = the shortest document's power of two)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    evals: int = opt(5, "validations per arm, evenly spaced over the budget")
    lr: float = opt(3e-3, "peak learning rate")
    min_lr_frac: float = opt(0.1, "final learning rate as a fraction of lr (cosine decay)")
    warmup_frac: float = opt(0.05, "linear warmup as a fraction of the budget")
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only)")
    grad_clip: float = opt(1.0, "gradient norm clip (0 = off)")
    pos_offset_max: int = opt(0, "random per-document position offset in [0, max] while training")
    early_stop: bool = opt(False, "halt an arm when the OOD rule fires (it then misses its budget)")
    early_stop_min_steps: int = opt(100, "the OOD rule cannot fire before this step")
    early_stop_drop: float = opt(0.05, "the OOD rule needs a drop of this fraction of the best score")
    early_stop_z: float = opt(2.0, "... and of more than z standard errors of the validation score")
    early_stop_patience: int = opt(2, "... for this many validations in a row")
    target_acc: float = opt(0.9, "tasks: FLOPs to target = first validation with ID accuracy >= this")
    critical_threshold: float = opt(0.9, "tasks: a task counts as learned at accuracy >= this")
    seeds: list[int] = opt([0, 1, 2, 3, 4, 5], "seeds: a count N (0..N-1), a list a,b,c (one seed: '5,') or auto "
                                               "(add seeds until --mde is met)")
    seeds_auto: bool = opt(False, "add seeds (a worker-count at a time) until every headline MDE <= mde")
    mde: float = opt(0.0, "seeds auto: target minimum detectable effect in the headline metric's unit")
    max_seeds: int = opt(12, "seeds auto: never more seeds than this")
    wall_budget_s: float = opt(0.0, "seeds auto: stop adding seeds when the next round would pass this (0 = none)")
    workers: int = opt(0, "parallel seed worker processes (0 = one per core, at most one per seed)")
    threads: int = opt(1, "torch threads per worker (results do not depend on the worker count)")
    export: bool = opt(True, "corpus: also save each final model as a Hugging Face checkpoint directory "
                             "ckpt/<arm>_s<seed>/hf (Llama layout for our swiglu RoPE decoder; --model hf: its own)")
    compile: bool = opt(False, "torch.compile the training model")
    loss_chunk: int = opt(4096, "rows of logits per chunk of the loss (no (N, V) logits are held)")
    attn_backend: str = opt("", "attention backend ('' = lengen_fast.backends' default)")
    peak_tflops: float = opt(0.0, "peak TFLOP/s for MFU (0 = from the GPU name; none on CPU)")


@dataclass
class ExtensionConfig:
    extend: bool = opt(True, "run the RoPE context-extension study on one arm's final models")
    ext_arm: str = opt("", "its arm ('' = pack_masked for tasks, dd_natural for a corpus; or any arm or preset)")
    scalings: list[str] = opt(["linear"], f"evaluation-time scalings, from {SCALINGS}")
    factor: float = opt(2.0, "evaluation-time scaling factor (original context: the training length)")
    finetune: bool = opt(True, "also fine-tune briefly at finetune_factor x the training length")
    finetune_scalings: list[str] = opt(["linear"], "the scalings a fine-tune trains with (one run each)")
    finetune_factor: float = opt(2.0, "fine-tune length as a multiple of the training length")
    finetune_frac: float = opt(0.1, "fine-tune budget as a fraction of the pretraining budget")
    finetune_lr_frac: float = opt(1.0, "fine-tune peak learning rate as a fraction of lr")


@dataclass
class DistConfig:
    """Data parallelism (distributed.py); torchrun sets the world size itself."""
    nproc: int = opt(1, "spawn N local data-parallel workers (loopback rendezvous)")
    dist_backend: str = opt("auto", "process group: auto (nccl with CUDA, else gloo), gloo or nccl")
    parallel: str = opt("ddp", "ddp or fsdp (FSDP2 fully_shard)")
    device: str = opt("auto", "auto (cuda when torch sees a GPU), cpu or cuda")


@dataclass
class RunConfig:
    workload: str = opt("tasks", "tasks (exact match) or corpus (loss, loss by position, time to target)")
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extension: ExtensionConfig = field(default_factory=ExtensionConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    out: str = opt("runs", "output directory (its parent must exist)")
    resume: bool = opt(False, "continue every run under out/ from its last checkpoint")
    progress: bool = opt(True, "progress bars (a terminal) or periodic lines (a log)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        cfg = cls()
        apply_overrides(cfg, d)
        return cfg


SECTIONS = {"model": ModelConfig, "task": TaskConfig, "corpus": CorpusConfig, "train": TrainConfig,
            "extension": ExtensionConfig, "dist": DistConfig}
TOP_LEVEL = {"workload": str, "out": str, "resume": bool, "progress": bool}


def apply_overrides(cfg: RunConfig, d, source: str = "overrides") -> None:
    """Set fields from ``{"section": {"field": v}}`` or top-level ``{"out": ...}``; unknown keys raise,
    naming ``source`` (a preset file, or "command line")."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: must be a JSON object mapping sections {sorted(SECTIONS)} to "
                         f"{{field: value}} objects, got a {type(d).__name__}")
    for key, val in d.items():
        if key in SECTIONS:
            if not isinstance(val, dict):
                raise ValueError(f"{source}: section {key!r} must be an object of fields, got "
                                 f"{type(val).__name__} {val!r}")
            sec = getattr(cfg, key)
            names = {f.name for f in dataclasses.fields(sec)}
            for k, v in val.items():
                if k not in names:
                    raise ValueError(f"{source}: unknown config field {key}.{k} (known: {sorted(names)})")
                setattr(sec, k, v)
        elif key in TOP_LEVEL:
            setattr(cfg, key, val)
        else:
            raise ValueError(f"{source}: unknown config section {key!r} (known: {sorted(SECTIONS)} and "
                             f"{', '.join(TOP_LEVEL)})")


def preset_path(name: str, workload: str) -> Path:
    """A preset name of ``workload`` (PRESETS), any preset file's own name (its JSON says its workload), or a
    path to a .json file."""
    if name.endswith(".json"):
        return Path(name)
    table = PRESETS.get(workload, {})
    if name in table:
        return PRESET_DIR / f"{table[name]}.json"
    if name in {f for t in PRESETS.values() for f in t.values()}:
        return PRESET_DIR / f"{name}.json"
    raise ValueError(f"preset {name!r} not found (presets of the {workload} workload: {sorted(table)}; files: "
                     f"{sorted(p.stem for p in PRESET_DIR.glob('*.json'))}; or a path to a .json file)")


def load_preset(name: str, workload: str = "tasks") -> dict:
    path = preset_path(name, workload)
    if not path.is_file():
        raise ValueError(f"preset file {str(path)!r} does not exist")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"preset file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not all(isinstance(v, dict) for k, v in d.items() if k in SECTIONS):
        raise ValueError(f"preset file {str(path)!r} must be a JSON object mapping sections {sorted(SECTIONS)} to "
                         "{field: value} objects")
    return d


def eval_lengths(task: TaskConfig) -> list[int]:
    return sorted({max(1, round(m * task.train_max_len)) for m in task.eval_multiples})


# ------------------------------------------------------------------------------ per-field checks
def _finite(lo=None, hi=None, lo_open=False, hi_open=False):
    """A range rule: returns the error text for a bad number, "" when it is fine."""
    def rule(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "must be finite"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return ""
    return rule


def _choice(choices):
    return lambda v: "" if v in choices else f"must be one of {choices}"


RULES = {
    "workload": _choice(WORKLOADS),
    "model.d_model": _finite(2), "model.n_layers": _finite(1), "model.n_heads": _finite(1),
    "model.n_kv_heads": _finite(0), "model.mlp": _choice(("gelu", "swiglu")), "model.mlp_ratio": _finite(1),
    "model.dropout": _finite(0, 1, hi_open=True), "model.pos_encoding": _choice(POS_ENCODINGS),
    "model.rope_base": _finite(1, lo_open=True), "model.max_positions": _finite(1),
    "model.arch": lambda v: "" if v == "lengen" or (v.startswith("hf:") and len(v) > 3) else
    "must be 'lengen' or 'hf:PATH' (a Hugging Face config.json or checkpoint directory)",
    "task.tasks": _choice(TASKS), "task.train_min_len": _finite(1), "task.train_max_len": _finite(1),
    "task.eval_multiples": _finite(0, lo_open=True), "task.train_examples": _finite(0),
    "task.eval_examples": _finite(1), "task.alphabet": _finite(2), "task.passkey_digits": _finite(1),
    "task.text_docs": _finite(1),
    "corpus.heldout_frac": _finite(0, 1, lo_open=True, hi_open=True), "corpus.corpus_files": _finite(0),
    "corpus.vocab_size": _finite(0), "corpus.subset_factor": _finite(1), "corpus.val_tokens": _finite(1),
    "corpus.multiples": _finite(0, lo_open=True), "corpus.pos_docs": _finite(1), "corpus.target_loss": _finite(0),
    "train.budget": _choice(BUDGETS), "train.budget_tokens": _finite(0), "train.budget_flops": _finite(0),
    "train.max_steps_factor": _finite(1), "train.tokens_per_batch": _finite(1), "train.seq_len": _finite(0),
    "train.min_len": _finite(0), "train.grad_accum": _finite(1), "train.evals": _finite(1),
    "train.steps": _finite(1), "train.lr": _finite(0, 1, lo_open=True), "train.min_lr_frac": _finite(0, 1),
    "train.warmup_frac": _finite(0, 1, hi_open=True), "train.weight_decay": _finite(0), "train.grad_clip": _finite(0),
    "train.pos_offset_max": _finite(0), "train.early_stop_min_steps": _finite(0),
    "train.early_stop_drop": _finite(0, 1, hi_open=True), "train.early_stop_z": _finite(0),
    "train.early_stop_patience": _finite(1), "train.target_acc": _finite(0, 1),
    "train.critical_threshold": _finite(0, 1), "train.seeds": _finite(0), "train.mde": _finite(0),
    "train.max_seeds": _finite(2), "train.wall_budget_s": _finite(0), "train.workers": _finite(0),
    "train.threads": _finite(0), "train.loss_chunk": _finite(1), "train.peak_tflops": _finite(0),
    "train.attn_backend": _choice(ATTN_BACKENDS),
    "extension.scalings": _choice(SCALINGS), "extension.factor": _finite(1),
    "extension.finetune_scalings": _choice(SCALINGS), "extension.finetune_factor": _finite(1, lo_open=True),
    "extension.finetune_frac": _finite(0, 1, lo_open=True), "extension.finetune_lr_frac": _finite(0, 1, lo_open=True),
    "dist.nproc": _finite(1),
}
NONEMPTY = ("task.tasks", "task.eval_multiples", "corpus.multiples", "train.arms", "train.seeds")


def _type_ok(v, tp) -> bool:
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, tp)


def _tname(tp) -> str:
    return {int: "an int", float: "a number", bool: "true or false", str: "a string"}[tp]


def _check(key: str, obj, name: str, tp) -> None:
    v = getattr(obj, name)
    is_list = typing.get_origin(tp) is list
    elem = typing.get_args(tp)[0] if is_list else tp
    if is_list:
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{key} must be a list of {_tname(elem)[2:]}s, got {v!r}")
        if key in NONEMPTY and not v:
            raise ValueError(f"{key} is empty")
    for x in (list(v) if is_list else [v]):
        if not _type_ok(x, elem):
            raise ValueError(f"{key} must be {'a list of ' if is_list else ''}{_tname(elem)}"
                             f"{'s' if is_list else ''}, got {v!r}")
        why = RULES[key](x) if key in RULES else ""
        if why:
            raise ValueError(f"{key} {why}, got {x!r}")
    if elem is float:  # JSON and the CLI may give 3 for 3.0
        setattr(obj, name, [float(x) for x in v] if is_list else float(v))
    elif is_list:
        setattr(obj, name, list(v))


def check_fields(cfg: RunConfig) -> None:
    """Type and range of every field; each error names ``section.field``. Floats given as ints are converted."""
    for name, tp in TOP_LEVEL.items():
        _check(name, cfg, name, tp)
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _check(f"{sec}.{f.name}", getattr(cfg, sec), f.name, hints[f.name])
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ValueError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ValueError(f"model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even (RoPE rotates pairs)")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ValueError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={kv}")
    t = cfg.task
    if t.train_min_len > t.train_max_len:
        raise ValueError(f"task.train_min_len={t.train_min_len} must be <= task.train_max_len={t.train_max_len}")
    if len(set(cfg.train.seeds)) != len(cfg.train.seeds):
        raise ValueError(f"train.seeds has repeats: {cfg.train.seeds}")
