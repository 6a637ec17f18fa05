"""What exactly will a run do? One validation of a RunConfig into one frozen :class:`Plan`.

Every bad input fails here, before any training, with the field it concerns: types and ranges (config.py), arms
(arms.py), the workload's lengths, vocabulary and budget (workload.py), the extension study, learned-position
tables, distributed settings, the output directory, seeds auto, and --resume (a changed config is refused,
naming each field and both values). Soft problems (too few seeds, evaluation lengths below the training length)
become warnings, kept in ``Plan.warnings`` and printed by the CLI.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .arms import ARM_PRESETS, ArmConfig, parse_arm, resolve_arms
from .config import RunConfig, check_fields
from .stats import MIN_N
from .trainer import Budget

CONFIG_FILE = "config.json"     # under --out: the config a run started with (what --resume compares)
# fields that do not change any (arm, seed) result: a resume may change them. (The world size is checked against
# each checkpoint instead, with its own message: dist.nproc and dist.dist_backend are free here.)
RESUME_FREE = ("out", "resume", "progress", "train.workers", "train.export", "train.seeds_auto", "train.mde", "train.max_seeds",
               "train.wall_budget_s", "dist.nproc", "dist.dist_backend")
EXT_DEFAULT_ARM = {"tasks": "pack_masked", "corpus": "dd_natural"}


@dataclass(frozen=True)
class ExtensionPlan:
    arm: ArmConfig               # the arm whose final models get the scaling arms (its fine-tune: curriculum natural)
    task: object                 # tasks: the TaskConfig at finetune_factor x train_max_len (None for a corpus)
    seq_len: int                 # fine-tune row length
    tokens_per_batch: int
    budget: Budget               # the fine-tune's
    scalings: tuple[str, ...]    # evaluation-time
    finetune_scalings: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    cfg: RunConfig               # a private, validated copy: nothing changes it after make_plan
    command: str                 # the command line, for the report
    mode: str                    # run | compare | ablate (ablate: the first arm is the base)
    arms: tuple[ArmConfig, ...]
    baseline: str
    seq_len: int                 # row length and largest decompose bucket (the context L)
    vocab: int
    budget: Budget               # per arm and seed
    num_params: int
    workers: int                 # parallel seed worker processes
    extension: ExtensionPlan | None
    warnings: tuple[str, ...]
    derived: dict                # figures for the report (per-arm expected use per step, lengths, ...)

    def arm(self, name: str) -> ArmConfig:
        return next(a for a in self.arms if a.name == name)


def param_count(cfg: RunConfig, vocab: int) -> int:
    from .model import Transformer
    if cfg.model.arch.startswith("hf:"):
        from ..integrations.hf.engine_model import load_hf_model
        try:
            return load_hf_model(cfg.model.arch[3:]).num_params()
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"model.arch={cfg.model.arch!r}: cannot build that model: {e}") from None
    return Transformer(cfg.model, vocab).num_params()


def make_scaling(kind: str, factor: float, orig: int):
    """A RopeScaling of ``kind`` at ``factor`` over the original context ``orig``; None for "none"."""
    from ..rope import RopeScaling
    if kind == "none":
        return None
    return RopeScaling(kind=kind, factor=float(factor), original_max_position_embeddings=int(orig))


def make_plan(cfg: RunConfig, command: str = "lengen-train", mode: str = "run") -> Plan:
    """Validate ``cfg`` (every field, arms, workload, budget, extension, resume) into a Plan."""
    from .workload import WORKLOADS
    cfg = copy.deepcopy(cfg)
    check_fields(cfg)

    class _Notes(list):  # warn at once, so that a later error still shows the warnings before it
        def append(self, msg):
            warnings.warn(msg, stacklevel=3)
            super().append(msg)
    notes = _Notes()
    m, tr, ex = cfg.model, cfg.train, cfg.extension
    arms = resolve_arms(tr.arms)
    names = [a.name for a in arms]
    baseline = tr.baseline or next((n for n in ("concat_chunk", "concat") if n in names), names[0])
    if baseline not in names:
        raise ValueError(f"train.baseline={baseline!r} is not an arm of this run {names}")
    if tr.seeds_auto and not tr.mde > 0:
        raise ValueError("train.seeds_auto (--seeds auto) needs a target --mde > 0 in the headline metric's unit "
                         "(exact-match accuracy for tasks, nats for a corpus): seeds are added until every "
                         "headline MDE is at most that")
    if len(tr.seeds) < 3 and not tr.seeds_auto:
        notes.append(f"train.seeds={tr.seeds}: a 95% interval needs at least {MIN_N} seeds and is very wide with "
                     "fewer than 3, so every verdict of this run will read 'inconclusive'" if len(tr.seeds) < MIN_N
                     else f"train.seeds={tr.seeds}: with {len(tr.seeds)} seeds the 95% t-interval is very wide "
                     "(t = 12.7 for 2 seeds); use 3 or more")
    if cfg.workload == "tasks" and any(x < 1 for x in cfg.task.eval_multiples):
        notes.append(f"eval_multiples {[x for x in cfg.task.eval_multiples if x < 1]} are below 1: those evaluation "
                     f"lengths are shorter than the training length {cfg.task.train_max_len}, so they measure nothing "
                     "out of distribution")
    part = WORKLOADS[cfg.workload].plan(cfg, arms, notes, lambda vocab: param_count(cfg, vocab))
    seq_len, vocab, budget, num_params = part["seq_len"], part["vocab"], part["budget"], part["num_params"]
    if tr.tokens_per_batch < seq_len:
        raise ValueError(f"train.tokens_per_batch={tr.tokens_per_batch} is smaller than the row length {seq_len} "
                         "(the longest training document rounded up to a power of two, or train.seq_len)")
    # the step cap: max_steps_factor x the steps a full batch of unpadded documents needs
    share = part["derived"].get("supervised_share", 1.0) if tr.budget == "supervised" else 1.0
    nominal = {"supervised": tr.tokens_per_batch * tr.grad_accum * share, "steps": 1.0,
               "flops": 6.0 * num_params * tr.tokens_per_batch * tr.grad_accum}[tr.budget]
    max_steps = max(1, math.ceil(tr.max_steps_factor * budget / nominal))
    for arm in arms:
        per, _ = part["per_step"][arm.name]
        need = math.ceil(budget / per) if per > 0 else math.inf
        if need > max_steps:
            raise ValueError(f"arm {arm.name!r} cannot reach the budget of {budget:.4g} {tr.budget}: it spends about "
                             f"{per:.4g} per step, so it needs ~{need} steps, more than the cap "
                             f"train.max_steps_factor x the nominal steps = {max_steps}; raise train.max_steps_factor "
                             "or lower the budget")
    budget = Budget(tr.budget, budget, max_steps)
    ext = _extension(cfg, arms, part, seq_len, budget, notes)
    ext_seq = ext.seq_len if ext else seq_len
    if m.pos_encoding == "learned":
        need = max(part["learned_positions_need"], ext_seq)
        if need + tr.pos_offset_max > m.max_positions:
            raise ValueError(f"model.max_positions={m.max_positions} is too small for learned positions: the longest "
                             f"evaluation document or row ({need}) plus train.pos_offset_max ({tr.pos_offset_max}) "
                             f"needs {need + tr.pos_offset_max}")
    decompose = any(a.packing == "decompose" for a in arms) or (ext is not None and ext.arm.packing == "decompose")
    distributed.check_config(cfg, [seq_len, ext_seq], decompose)
    world = distributed.env_world_size() if distributed.under_launcher() else cfg.dist.nproc
    if world > 1 and tr.workers > 1:
        raise ValueError(f"train.workers={tr.workers}: parallel seed workers and data parallelism (world size "
                         f"{world}) do not combine; use --workers 1 with --nproc / torchrun")
    workers = 1 if world > 1 else (tr.workers or min(os.cpu_count() or 1, len(tr.seeds)))
    out = Path(cfg.out)
    if not out.parent.exists():
        raise ValueError(f"out: the parent of {str(out)!r} does not exist")
    if cfg.resume:
        check_resume(cfg, out)
    derived = part["derived"] | {
        "seq_len": seq_len, "vocab_size": vocab, "budget_kind": tr.budget, "budget": budget.amount,
        "max_steps": max_steps, "num_params": num_params, "baseline": baseline, "workers": workers,
        "arms": {a.name: {"per_step": part["per_step"][a.name][0], "steps_per_epoch": part["per_step"][a.name][1],
                          "expected_steps": math.ceil(budget.amount / part["per_step"][a.name][0])} for a in arms}}
    return Plan(cfg=cfg, command=command, mode=mode, arms=arms, baseline=baseline, seq_len=seq_len, vocab=vocab, budget=budget,
                num_params=num_params, workers=workers, extension=ext, warnings=tuple(notes), derived=derived)


def _extension(cfg, arms, part, seq_len, budget: Budget, notes) -> ExtensionPlan | None:
    ex, tr = cfg.extension, cfg.train
    if not ex.extend:
        return None
    if cfg.model.pos_encoding != "rope":
        notes.append(f"extension.extend: the RoPE extension study needs model.pos_encoding=rope (this run uses "
                     f"{cfg.model.pos_encoding}); it is skipped")
        return None
    name = ex.ext_arm or EXT_DEFAULT_ARM[cfg.workload]
    arm = next((a for a in arms if a.name == name), None)
    if arm is None:
        if name not in ARM_PRESETS:
            raise ValueError(f"extension.ext_arm={name!r} is neither an arm of this run {[a.name for a in arms]} nor a "
                             f"preset {sorted(ARM_PRESETS)}")
        arm = parse_arm(name)
    for kind in list(ex.scalings) + list(ex.finetune_scalings if ex.finetune else []):
        try:
            make_scaling(kind, ex.factor if kind in ex.scalings else ex.finetune_factor, seq_len)
        except (ValueError, TypeError) as e:
            raise ValueError(f"extension: scaling {kind!r}: {e}") from None
    task, ext_seq = part["extension_len"](ex.finetune_factor)
    tpb = tr.tokens_per_batch if cfg.workload == "tasks" else max(tr.tokens_per_batch, ext_seq)
    if ex.finetune and tpb < ext_seq:
        raise ValueError(f"train.tokens_per_batch={tpb} is smaller than the extension fine-tune's row length "
                         f"{ext_seq} (finetune_factor x the training length, rounded up to a power of two); raise "
                         "train.tokens_per_batch or lower extension.finetune_factor")
    ft_budget = Budget(budget.kind, ex.finetune_frac * budget.amount,
                       max(1, math.ceil(2 * ex.finetune_frac * budget.max_steps)))
    return ExtensionPlan(dataclasses.replace(arm, curriculum="natural", cycles=1), task, ext_seq, tpb, ft_budget,
                         tuple(ex.scalings), tuple(ex.finetune_scalings) if ex.finetune else ())


def result_config(cfg: RunConfig) -> dict:
    """The config as a flat {"section.field": value} of every field that can change a result."""
    flat = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, dict):
            flat.update({f"{k}.{f}": x for f, x in v.items()})
        else:
            flat[k] = v
    return {k: v for k, v in flat.items() if k not in RESUME_FREE}


def check_resume(cfg: RunConfig, out: Path) -> None:
    """--resume needs the run's config.json and at least one readable checkpoint, and refuses a config that differs
    in any field that changes a result (naming each with both values)."""
    from .trainer import read_checkpoint
    path = out / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"resume: {str(path)!r} does not exist, so there is no run to resume under {str(out)!r}; "
                         "drop --resume to start a fresh run")
    try:
        saved = json.loads(path.read_text())["result_config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"resume: cannot read {str(path)!r}: {type(e).__name__}: {e}") from None
    mine = json.loads(json.dumps(result_config(cfg)))
    diff = [f"{k}: {saved.get(k)!r} (run) != {mine.get(k)!r} (now)" for k in sorted(set(saved) | set(mine))
            if saved.get(k) != mine.get(k)]
    if diff:
        raise ValueError(f"resume: the config differs from the run's ({str(path)!r}) in fields that change the "
                         f"results; resume with the same settings or start a fresh --out: " + "; ".join(diff))
    found = sorted(out.glob("ckpt/*/last.pt"))
    world = distributed.env_world_size() if distributed.under_launcher() else cfg.dist.nproc
    for ck_path in found:
        distributed.check_resume_world(read_checkpoint(ck_path), world, ck_path)
