"""Which settings define a lengen-train run? Typed configs, one CLI flag per field (``--d-model`` -> d_model).

A run compares *arms*. An arm is a set of orthogonal knobs (:class:`ArmConfig`): packing, attention
span, positions, curriculum and how task documents are fitted to rows. The four familiar strategies
are named presets of those knobs (:data:`ARM_PRESETS`); ``name:knob=value,...`` defines a new arm
without code. Presets are small JSON files in ``presets/`` holding ``{"section": {"field": value}}``.

This module only describes and type-checks fields (:func:`check_fields`, every error names its
field); :mod:`.plan` turns a config into the one validated, immutable plan a run follows.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..data.curriculum import CURRICULA
from .tasks import TASKS

POS_ENCODINGS = ("rope", "nope", "learned")
SCALINGS = ("linear", "ntk", "yarn")
PACKINGS = ("concat", "bfd", "decompose")   # cut every seq_len | best-fit-decreasing rows | DD buckets
SPANS = ("row", "document")                 # attention span and position resets
FITS = ("none", "pad")                      # pad: task documents padded to a power of two (counted as padding)
BUDGETS = ("supervised", "flops")           # what arms are equalized on
ATTN_BACKENDS = ("", "cpu", "triton", "cuda", "reference")
PRESET_DIR = Path(__file__).parent / "presets"


# ------------------------------------------------------------------------------------------ arms
@dataclass(frozen=True)
class ArmConfig:
    """One arm of the comparison: each field is one independent knob."""
    name: str
    packing: str = "bfd"
    attention: str = "document"
    positions: str = "document"
    curriculum: str = "natural"         # decompose only: the order of its buckets
    cycles: int = 1                     # decompose only: curriculum cycles per epoch
    fit: str = "none"

    def knobs(self) -> dict:
        return {k: getattr(self, k) for k in KNOBS}


KNOBS = ("packing", "attention", "positions", "curriculum", "cycles", "fit")
KNOB_CHOICES = {"packing": PACKINGS, "attention": SPANS, "positions": SPANS, "curriculum": CURRICULA, "fit": FITS}
ARM_PRESETS = {
    "concat_chunk": ArmConfig("concat_chunk", packing="concat", attention="row", positions="row"),
    "pack_naive": ArmConfig("pack_naive", packing="bfd", attention="row", positions="row"),
    "pack_masked": ArmConfig("pack_masked", packing="bfd", attention="document", positions="document"),
    "vsl": ArmConfig("vsl", packing="decompose", attention="document", positions="document", curriculum="grow_p2",
                     fit="pad"),
}


def parse_arm(spec: str) -> ArmConfig:
    """``vsl`` (a preset) or ``name:knob=value,...``; ``base=<preset>`` supplies the knobs not given."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"arm spec must be a non-empty string, got {spec!r}")
    if ":" not in spec:
        if spec not in ARM_PRESETS:
            raise ValueError(f"unknown arm {spec!r}: choose a preset {sorted(ARM_PRESETS)} or define one as "
                             "name:packing=bfd,attention=document,positions=document,curriculum=natural,fit=none")
        return ARM_PRESETS[spec]
    name, _, body = spec.partition(":")
    name = name.strip()
    if not name or any(c in name for c in "/\\ ") or name in ARM_PRESETS:
        raise ValueError(f"arm spec {spec!r}: the name before ':' must be a new, plain name (not a preset; "
                         "no spaces or slashes)")
    vals = {}
    for item in filter(None, (x.strip() for x in body.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"arm spec {spec!r}: {item!r} is not knob=value")
        vals[k.strip()] = v.strip()
    base = ArmConfig(name)
    if "base" in vals:
        b = vals.pop("base")
        if b not in ARM_PRESETS:
            raise ValueError(f"arm spec {spec!r}: base={b!r} is not a preset {sorted(ARM_PRESETS)}")
        base = dataclasses.replace(ARM_PRESETS[b], name=name)
    for k, v in vals.items():
        if k not in KNOBS:
            raise ValueError(f"arm spec {spec!r}: unknown knob {k!r} (knobs: {KNOBS} and base)")
        if k == "cycles":
            try:
                vals[k] = int(v)
            except ValueError:
                raise ValueError(f"arm spec {spec!r}: cycles must be an int, got {v!r}") from None
    arm = dataclasses.replace(base, **vals)
    check_arm(arm)
    return arm


def check_arm(arm: ArmConfig) -> None:
    """Every knob value is known and the combination can run (with the reason when it cannot)."""
    for k, choices in KNOB_CHOICES.items():
        if getattr(arm, k) not in choices:
            raise ValueError(f"arm {arm.name!r}: {k}={getattr(arm, k)!r} is not one of {choices}")
    if not isinstance(arm.cycles, int) or isinstance(arm.cycles, bool) or arm.cycles < 1:
        raise ValueError(f"arm {arm.name!r}: cycles must be an int >= 1, got {arm.cycles!r}")
    if arm.packing != "decompose" and (arm.curriculum != "natural" or arm.cycles != 1):
        raise ValueError(f"arm {arm.name!r}: curriculum={arm.curriculum}, cycles={arm.cycles} cannot run with "
                         f"packing={arm.packing}: a curriculum orders the length buckets of packing=decompose, and "
                         f"{arm.packing} has a single row length, so there is nothing to order (use "
                         "curriculum=natural,cycles=1, or packing=decompose)")


# ---------------------------------------------------------------------------------------- sections
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
    tasks: list[str] = field(default_factory=lambda: ["passkey", "majority", "parity", "text"])
    train_min_len: int = 2              # problem size n (items / digits / filler tokens), not tokens
    train_max_len: int = 8
    eval_multiples: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    train_examples: int = 0             # per task; 0 = enough that the budget is about 0.8 of an epoch
    eval_examples: int = 96             # per task and eval length, for each of val and test (distinct prompts;
                                        # fewer where the prompt space is smaller, and the report says so)
    alphabet: int = 64                  # symbols for copy/reverse; copy_unique needs n <= alphabet
    passkey_digits: int = 1             # 1: one content lookup; more digits need induction heads, which a
                                        # 2-layer d=64 model did not form within 400 steps on CPU
    scratchpad: bool = False            # parity/majority: running state; addition: carries
    index_hints: bool = False           # addition: position markers before each digit
    text_source: str = ""               # "" = the data pipeline's embedded corpus
    text_docs: int = 400                # training pieces of natural text (the boundary diagnostic's language)


@dataclass
class TrainConfig:
    arms: list[str] = field(default_factory=lambda: list(ARM_PRESETS))   # presets or name:knob=v,... specs
    budget: str = "supervised"          # supervised: equal supervised target tokens | flops: equal FLOPs
    budget_tokens: int = 0              # supervised target tokens per arm; 0 = what `steps` full batches of
                                        # unpadded documents hold
    budget_flops: float = 0.0           # budget=flops: FLOPs per arm; 0 = `steps` full batches
    max_steps_factor: float = 2.0       # an arm gets at most this x steps to reach the budget (else flagged)
    tokens_per_batch: int = 1024
    seq_len: int = 0                    # row length (concat, bfd) and largest decompose bucket; 0 = next
                                        # power of two >= the longest training document
    steps: int = 500                    # sizes the budget (and the lr schedule of an unpadded arm)
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 30                    # linear warmup steps (at most a tenth of the schedule)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    pos_offset_max: int = 0             # random per-segment position offset in [0, max] while training;
                                        # for learned positions (RoPE is invariant to a shared offset)
    eval_every: int = 100
    early_stop: bool = False            # True: training halts when the rule fires (the arm then misses its
                                        # budget and is flagged); False: the rule is only an analysis
    early_stop_min_steps: int = 100     # the rule cannot fire before this step ...
    early_stop_drop: float = 0.05       # ... nor unless the OOD score is this fraction below its best ...
    early_stop_z: float = 2.0           # ... and more than z standard errors of the validation score
    early_stop_patience: int = 2        # ... for this many validations in a row, once ID is learned
    target_acc: float = 0.9             # "FLOPs to reach target": first eval with ID accuracy >= this
    critical_threshold: float = 0.9     # learned in distribution / critical length: accuracy >= this
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    threads: int = 0                    # torch threads; 0 = the cores not already busy (at least 1):
                                        # oversubscribed OpenMP threads make small ops ~50x slower
    attn_backend: str = ""              # "" = lengen_fast.backends default order


@dataclass
class ExtensionConfig:
    extend: bool = True
    ext_arm: str = "pack_masked"        # arm of the rope model that is pretrained short, then extended
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
    resume: bool = False                # continue every run under out/ckpt from its last.pt
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
TOP_LEVEL = ("out", "resume", "progress")


def apply_overrides(cfg, d, source: str = "overrides", sections: dict = SECTIONS,
                    top_level: tuple = TOP_LEVEL) -> None:
    """Set fields from ``{"section": {"field": v}}`` or top-level ``{"out": ...}``; unknown keys raise,
    naming ``source`` (a preset file, or "overrides"). ``sections`` / ``top_level``: those of ``cfg``'s
    class (RunConfig's by default; lengen-train lm passes LMConfig's)."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: must be a JSON object mapping sections {sorted(sections)} to "
                         f"{{field: value}} objects, got a {type(d).__name__}")
    for key, val in d.items():
        if key in sections:
            if not isinstance(val, dict):
                raise ValueError(f"{source}: section {key!r} must be an object of fields, got "
                                 f"{type(val).__name__} {val!r}")
            sec = getattr(cfg, key)
            names = {f.name for f in dataclasses.fields(sec)}
            for k, v in val.items():
                if k not in names:
                    raise ValueError(f"{source}: unknown config field {key}.{k} (known: {sorted(names)})")
                setattr(sec, k, v)
        elif key in top_level:
            setattr(cfg, key, val)
        else:
            raise ValueError(f"{source}: unknown config section {key!r} (known: {sorted(sections)} and "
                             f"{', '.join(top_level)})")


def load_preset(name: str) -> dict:
    path = Path(name) if name.endswith(".json") else PRESET_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise ValueError(f"preset {name!r} not found (known presets: {known}, or a path to a .json file)")
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
    "model.d_model": _finite(2), "model.n_layers": _finite(1), "model.n_heads": _finite(1),
    "model.n_kv_heads": _finite(0), "model.mlp": _choice(("gelu", "swiglu")), "model.mlp_ratio": _finite(1),
    "model.dropout": _finite(0, 1, hi_open=True), "model.pos_encoding": _choice(POS_ENCODINGS),
    "model.rope_base": _finite(1, lo_open=True), "model.max_positions": _finite(1),
    "task.tasks": _choice(TASKS), "task.train_min_len": _finite(1), "task.train_max_len": _finite(1),
    "task.eval_multiples": _finite(0, lo_open=True), "task.train_examples": _finite(0),
    "task.eval_examples": _finite(1), "task.alphabet": _finite(2), "task.passkey_digits": _finite(1),
    "task.text_docs": _finite(1),
    "train.budget": _choice(BUDGETS), "train.budget_tokens": _finite(0), "train.budget_flops": _finite(0),
    "train.max_steps_factor": _finite(1), "train.tokens_per_batch": _finite(1), "train.seq_len": _finite(0),
    "train.steps": _finite(1), "train.lr": _finite(0, 1, lo_open=True), "train.min_lr_frac": _finite(0, 1),
    "train.warmup": _finite(0), "train.weight_decay": _finite(0), "train.grad_clip": _finite(0),
    "train.pos_offset_max": _finite(0), "train.eval_every": _finite(1), "train.early_stop_min_steps": _finite(0),
    "train.early_stop_drop": _finite(0, 1, hi_open=True), "train.early_stop_z": _finite(0),
    "train.early_stop_patience": _finite(1), "train.target_acc": _finite(0, 1),
    "train.critical_threshold": _finite(0, 1), "train.seeds": _finite(0), "train.threads": _finite(0),
    "train.attn_backend": _choice(ATTN_BACKENDS),
    "extension.scalings": _choice(SCALINGS), "extension.factor": _finite(1, lo_open=True),
    "extension.ext_steps_frac": _finite(0, 1, lo_open=True),
    "dist.nproc": _finite(1),
}
NONEMPTY = ("task.tasks", "task.eval_multiples", "train.arms", "train.seeds")


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


def check_fields(cfg: RunConfig) -> None:
    """Type and range of every field; each error names ``section.field``. Floats given as ints are converted."""
    for name in TOP_LEVEL:
        tp = {"out": str, "resume": bool, "progress": bool}[name]
        if not _type_ok(getattr(cfg, name), tp):
            raise ValueError(f"{name} must be {_tname(tp)}, got {getattr(cfg, name)!r}")
    for sec, cls in SECTIONS.items():
        obj = getattr(cfg, sec)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, v, tp = f"{sec}.{f.name}", getattr(obj, f.name), hints[f.name]
            is_list = typing.get_origin(tp) is list
            elem = typing.get_args(tp)[0] if is_list else tp
            if is_list:
                if not isinstance(v, (list, tuple)):
                    raise ValueError(f"{key} must be a list of {_tname(elem)[2:]}s, got {v!r}")
                if key in NONEMPTY and not v:
                    raise ValueError(f"{key} is empty")
                items = list(v)
            else:
                items = [v]
            for x in items:
                if not _type_ok(x, elem):
                    raise ValueError(f"{key} must be {'a list of ' if is_list else ''}{_tname(elem)}"
                                     f"{'s' if is_list else ''}, got {v!r}")
                why = RULES[key](x) if key in RULES else ""
                if why:
                    raise ValueError(f"{key} {why}, got {x!r}")
            if elem is float:  # JSON and the CLI may give 3 for 3.0
                setattr(obj, f.name, [float(x) for x in v] if is_list else float(v))
            elif is_list:
                setattr(obj, f.name, list(v))
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
