"""Can this run go, and what exactly will it do? ``make_plan`` validates a RunConfig once, before any
training, into one immutable :class:`Plan` that the experiment, the trainer and the report read.

Every bad input fails here with an error naming its field or file: a field out of range, a knob
combination that cannot run (with the reason), a budget an arm cannot reach within its step cap, an
evaluation length whose prompt space is empty, a ``--resume`` with nothing to resume or an unreadable
checkpoint. Problems that do not stop a run (too few seeds for an interval, evaluation lengths below
the training length) become warnings, kept in ``Plan.warnings`` and printed by the CLI.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

from . import distributed
from .config import ARM_PRESETS, ArmConfig, RunConfig, check_arm, check_fields, eval_lengths, parse_arm
from .evaluate import MIN_SEEDS
from .tasks import (EVAL_MOD, auto_train_examples, doc_tokens, eval_set, max_train_doc_tokens, text_base,
                    text_train_len, train_documents, train_table)


PLAN_SAMPLE = 20000     # examples per task that make_plan sizes budgets on


def next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class ArmPlan:
    """What one arm will do: its knobs, the lr schedule length, and the expected budget use per step."""
    arm: ArmConfig
    schedule_steps: int          # steps expected to spend the budget (sizes warmup + cosine)
    per_step: float              # expected supervised tokens (or FLOPs) per step, from seed 0's epoch
    steps_per_epoch: int         # of the (possibly sampled) plan-time table; the runs report their own


@dataclass(frozen=True)
class ExtensionPlan:
    arm: ArmConfig
    task: object                 # TaskConfig at factor x train_max_len
    seq_len: int
    finetune_steps: int
    scalings: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    cfg: RunConfig               # a private, validated copy: nothing changes it after make_plan
    command: str
    arms: tuple[ArmPlan, ...]
    seq_len: int                 # row length (concat, bfd) and largest decompose bucket
    doc_max: int                 # longest training document (tokens, unpadded)
    eval_lengths: tuple[int, ...]
    text_edges: tuple[int, ...]  # position buckets of the text loss ((0, L) when no text)
    vocab: int
    budget_kind: str             # "supervised" | "flops"
    budget: float                # per arm and seed
    max_steps: int               # step cap per arm
    train_examples: int          # per task
    num_params: int
    extension: ExtensionPlan | None
    warnings: tuple[str, ...]
    derived: MappingProxyType    # figures for the report

    def arm(self, name: str) -> ArmPlan:
        return next(a for a in self.arms if a.arm.name == name)


def resolve_arms(specs) -> tuple[ArmConfig, ...]:
    arms = tuple(parse_arm(s) for s in specs)
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"train.arms: arm names must be unique, {dup} repeat")
    for a in arms:
        check_arm(a)
    return arms


def text_edges(cfg: RunConfig) -> tuple[int, ...]:
    L = text_train_len(cfg.task)
    return tuple([0, L] + [round(m * L) for m in sorted(cfg.task.eval_multiples) if m > 1])


_DOCS_CACHE: dict = {}   # make_plan sizes the budget on seed 0's documents; the experiment trains on them


def task_docs(cfg: RunConfig, tc, seed: int, text, steps: int):
    """The seed's training documents (tokens, masks, task names), shared by every arm of the seed."""
    key = (repr(tc), seed, text is not None, steps, cfg.train.tokens_per_batch)
    if key not in _DOCS_CACHE:
        if len(_DOCS_CACHE) > 8:
            _DOCS_CACHE.clear()
        _DOCS_CACHE[key] = _task_docs(cfg, tc, seed, text, steps)
    return _DOCS_CACHE[key]


def _task_docs(cfg: RunConfig, tc, seed: int, text, steps: int):
    from .tasks import text_pieces
    if not tc.train_examples:
        tc = replace(tc, train_examples=auto_train_examples(tc, steps, cfg.train.tokens_per_batch))
    docs = None
    if text is not None:
        L = text_train_len(tc)
        docs = text_pieces(text.train, (min(L, 2 * tc.train_min_len + 4), L), tc.text_docs, seed)
    return train_documents(tc, seed, docs)


def epoch_use(loader, mask_table, model_cfg, num_params: int, arm: ArmConfig, kind: str) -> float:
    """Supervised tokens (or FLOPs) the arm spends per step, averaged over one epoch of ``loader``."""
    from .trainer import attention_flops, dense_flops
    flat, offs = mask_table
    cs = np.concatenate([[0], np.cumsum(flat, dtype=np.int64)])
    total = 0.0
    for s in range(len(loader)):
        _, _, doc, start, length, fill = loader.pieces(0, s)
        if kind == "supervised":  # labels of a piece: loss-mask of tokens 1..length-1 of the piece
            a = offs[doc] + start + 1
            b = offs[doc] + start + length
            total += float((cs[np.maximum(a, b)] - cs[a]).sum())
        else:
            seg = fill if arm.attention == "row" else length
            cu = np.concatenate([[0], np.cumsum(seg)])
            import torch
            total += dense_flops(num_params, loader.config.tokens_per_batch) + attention_flops(
                torch.as_tensor(cu), model_cfg.n_layers, model_cfg.d_model)
    return total / max(1, len(loader))


def make_plan(cfg: RunConfig, command: str = "run") -> Plan:
    """Validate ``cfg`` (every field, every arm, budgets, evaluation sets, resume) into a Plan."""
    cfg = copy.deepcopy(cfg)
    check_fields(cfg)
    class _Notes(list):  # warn at once, so that a later error still shows the warnings before it
        def append(self, msg):
            warnings.warn(msg, stacklevel=3)
            super().append(msg)
    notes = _Notes()
    m, tc, tr, ex = cfg.model, cfg.task, cfg.train, cfg.extension
    arms = resolve_arms(tr.arms)
    if len(tr.seeds) < 3:
        notes.append(f"train.seeds={tr.seeds}: a 95% interval needs at least {MIN_SEEDS} seeds and is very wide with "
                     "fewer than 3, so every verdict of this run will read 'inconclusive'" if len(tr.seeds) < MIN_SEEDS
                     else f"train.seeds={tr.seeds}: with {len(tr.seeds)} seeds the 95% t-interval is very wide "
                     "(t = 12.7 for 2 seeds); use 3 or more")
    short = [x for x in tc.eval_multiples if x < 1]
    if short:
        notes.append(f"eval_multiples {short} are below 1: those evaluation lengths are shorter than the training "
                     f"length {tc.train_max_len}, so they measure nothing out of distribution")
    lens = eval_lengths(tc)
    tasks = [t for t in tc.tasks if t != "text"]
    if "copy_unique" in tasks and max(lens) > tc.alphabet:
        raise ValueError(f"task.alphabet={tc.alphabet}: copy_unique at eval length {max(lens)} needs alphabet >= "
                         "that")
    if tasks and not any(n > tc.train_max_len for n in lens):
        notes.append("no evaluation length is beyond train_max_len: nothing out of distribution is measured")
    # evaluation sets: disjoint val/test prompts must exist at every (task, length)
    distinct = {}
    for t in tasks:
        for n in lens:
            distinct[f"{t}@{n}"] = {s: eval_set(t, n, tc, 0, s).distinct for s in ("val", "test")}
    small = {k: v for k, v in distinct.items() if min(v.values()) < tc.eval_examples}
    if small:
        notes.append("small prompt spaces (distinct val/test prompts below eval_examples="
                     f"{tc.eval_examples}; every one is used, none shared): "
                     + ", ".join(f"{k} {v['val']}/{v['test']}" for k, v in small.items()))
    # lengths
    doc_max = max_train_doc_tokens(tc)
    seq_len = tr.seq_len or next_pow2(doc_max)
    if tr.seq_len and tr.seq_len < doc_max and any(a.packing == "bfd" for a in arms):
        raise ValueError(f"train.seq_len={tr.seq_len} is shorter than the longest training document ({doc_max} "
                         "tokens): packing=bfd keeps documents whole (concat and decompose may cut them)")
    if any(a.packing == "decompose" for a in arms) and seq_len & (seq_len - 1):
        raise ValueError(f"train.seq_len={seq_len} must be a power of two for packing=decompose (its largest bucket)")
    if any(a.packing == "decompose" and a.fit == "pad" for a in arms) and seq_len < next_pow2(doc_max):
        raise ValueError(f"train.seq_len={seq_len} is shorter than the padded longest document "
                         f"({next_pow2(doc_max)}): fit=pad would still cut documents")
    ext = None
    ext_seq = seq_len
    if ex.extend and m.pos_encoding != "rope":
        notes.append(f"extension.extend: the staged RoPE extension study needs model.pos_encoding=rope (this run uses "
                     f"{m.pos_encoding}); it is skipped")
    elif ex.extend:
        ext_arm = next((a for a in arms if a.name == ex.ext_arm), None) or (
            ARM_PRESETS.get(ex.ext_arm) or _raise(f"extension.ext_arm={ex.ext_arm!r} is neither an arm of this run "
                                                  f"nor a preset {sorted(ARM_PRESETS)}"))
        ext_tc = replace(tc, train_max_len=round(ex.factor * tc.train_max_len))
        ext_seq = next_pow2(max(max_train_doc_tokens(ext_tc), seq_len))
        from .experiment import make_scaling
        for kind in ex.scalings:
            make_scaling(kind, ex.factor, seq_len)
        ext = ExtensionPlan(ext_arm, ext_tc, ext_seq, max(1, round(ex.ext_steps_frac * tr.steps)),
                            tuple(ex.scalings))
    if tr.tokens_per_batch < max(seq_len, ext_seq):
        raise ValueError(f"train.tokens_per_batch={tr.tokens_per_batch} is smaller than the row length "
                         f"{max(seq_len, ext_seq)} (the longest training document, or extension fine-tune document, "
                         "rounded up to a power of two); raise train.tokens_per_batch")
    if m.pos_encoding == "learned":
        need = max([doc_tokens(t, n, tc) for t in tasks for n in lens] + ([max(text_edges(cfg))] if "text" in tc.tasks
                                                                         else []) + [max(seq_len, ext_seq)])
        if need + tr.pos_offset_max > m.max_positions:
            raise ValueError(f"model.max_positions={m.max_positions} is too small for learned positions: the longest "
                             f"evaluation document or row ({need}) plus train.pos_offset_max ({tr.pos_offset_max}) "
                             f"needs {need + tr.pos_offset_max}")
    distributed.check_config(cfg, [seq_len, ext_seq], any(a.packing == "decompose" for a in arms)
                             or (ext is not None and ext.arm.packing == "decompose"))
    out = Path(cfg.out)
    if not out.parent.exists():
        raise ValueError(f"out: the parent of {str(out)!r} does not exist")
    if cfg.resume:
        check_resume(cfg, out, ext)
    # text and vocabulary
    text = None
    if "text" in tc.tasks:
        from .tasks import load_text
        text = load_text(tc)
    vocab = text_base(tc) + (text.vocab if text is not None else 0)
    from .model import Transformer
    num_params = Transformer(m, vocab).num_params()
    # budget: sized on seed 0's documents, the same for every arm and seed
    tcx = tc if tc.train_examples else replace(tc, train_examples=auto_train_examples(tc, tr.steps,
                                                                                      tr.tokens_per_batch))
    # (on at most PLAN_SAMPLE examples per task: a share and a per-step rate need no more, and large presets
    # would otherwise generate every document twice)
    tps = replace(tcx, train_examples=min(tcx.train_examples, PLAN_SAMPLE))
    toks, masks, names = task_docs(cfg, tps, 0, text, tr.steps)
    sup_share = sum(int(mk[1:].sum()) for mk in masks) / sum(len(t) for t in toks)
    if tr.budget == "supervised":
        budget = float(tr.budget_tokens or round(tr.steps * tr.tokens_per_batch * sup_share))
    else:
        budget = float(tr.budget_flops or tr.steps * 6.0 * num_params * tr.tokens_per_batch)
    max_steps = math.ceil(tr.max_steps_factor * tr.steps)
    arm_plans = []
    for arm in arms:
        table = train_table(tps, 0, pad_pow2=arm.fit == "pad", docs=(toks, masks, names))
        from .trainer import make_loader
        try:
            loader = make_loader(table, arm, seq_len, tr.tokens_per_batch, 0, shard=(0, 1))  # whole batches
        except ValueError as e:
            raise ValueError(f"arm {arm.name!r}: {e}") from None
        col = table.column("loss_mask").combine_chunks()
        flat = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.int64)
        offs = np.asarray(col.offsets.to_numpy(), dtype=np.int64)[:-1]
        per = epoch_use(loader, (flat, offs), m, num_params, arm, tr.budget)
        need = math.ceil(budget / per) if per > 0 else math.inf
        if need > max_steps:
            raise ValueError(f"arm {arm.name!r} cannot reach the budget of {budget:.4g} "
                             f"{'supervised tokens' if tr.budget == 'supervised' else 'FLOPs'}: it spends about "
                             f"{per:.4g} per step, so it needs ~{need} steps, more than the cap "
                             f"train.max_steps_factor x train.steps = {max_steps}; raise train.max_steps_factor or "
                             "lower the budget")
        arm_plans.append(ArmPlan(arm, int(need), float(per), len(loader)))
    derived = {"seq_len": seq_len, "doc_max_tokens": doc_max, "eval_lengths": lens, "vocab_size": vocab,
               "text_edges": list(text_edges(cfg)) if text is not None else None, "budget_kind": tr.budget,
               "budget": budget, "supervised_share": sup_share, "max_steps": max_steps,
               "train_examples": tcx.train_examples, "eval_distinct_seed0": distinct, "num_params": num_params,
               "eval_mod": EVAL_MOD}
    return Plan(cfg=cfg, command=command, arms=tuple(arm_plans), seq_len=seq_len, doc_max=doc_max,
                eval_lengths=tuple(lens), text_edges=text_edges(cfg), vocab=vocab, budget_kind=tr.budget,
                budget=budget, max_steps=max_steps, train_examples=tcx.train_examples, num_params=num_params,
                extension=ext, warnings=tuple(notes), derived=MappingProxyType(derived))


def _raise(msg: str):
    raise ValueError(msg)


def check_resume(cfg: RunConfig, out: Path, ext) -> None:
    """--resume needs at least one readable, compatible checkpoint under out/ckpt."""
    from .trainer import check_compatible, read_checkpoint
    found = sorted(out.glob("ckpt/*/last.pt"))
    if not found:
        raise ValueError(f"resume: there is no checkpoint to resume from under {str(out / 'ckpt')!r} "
                         "(no */last.pt); drop --resume to start a fresh run")
    world = distributed.env_world_size() if distributed.under_launcher() else cfg.dist.nproc
    for ck_path in found:
        ck = read_checkpoint(ck_path)
        name = ck_path.parent.name
        model_cfg = cfg.model
        if name.startswith("extend"):
            model_cfg = dataclasses.replace(cfg.model, pos_encoding="rope")
        check_compatible(ck, model_cfg, ck_path)
        distributed.check_resume_world(ck, world, ck_path)
