"""What does a whole experiment run, and in what order? Arms x seeds under one Plan, then the scoring of
every run at its three checkpoints, the boundary diagnostic, the staged-extension study, and the
one-factor-at-a-time arm sets of ``lengen-train ablate``.

Pairing: within a seed every arm gets the same training documents (fit=pad only appends PAD), the
same model initialization and the same validation and test sets, so per-seed differences between arms
are paired. Across seeds all of these change, so the seed interval covers data, initialization and
evaluation-sample noise together.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed, runinfo
from .config import ARM_PRESETS, KNOB_CHOICES, KNOBS, ArmConfig, check_arm
from .evaluate import distance_buckets, loss_by_boundary_distance, score, with_scaling
from .plan import Plan, task_docs
from .tasks import EvalSet, eval_set, load_text, text_eval, train_table
from .trainer import Trainer

CHECKPOINTS = ("final", "best_id", "best_ood")   # headline: final and best_id; best_ood is its own analysis
BOUNDARY_NEAR = (1, 4)       # distances [1, 4) from the document start: context that a boundary can disturb
BOUNDARY_FAR = 8             # distances >= 8


def make_scaling(kind: str, factor: float, orig: int):
    from ..rope import RopeScaling
    return RopeScaling(kind=kind, factor=factor, original_max_position_embeddings=orig)


@dataclass
class EvalSets:
    val: list[EvalSet]
    test: list[EvalSet]
    text_val: np.ndarray | None       # (B, L_eval) held-out text windows
    text_test: np.ndarray | None


def build_evals(plan: Plan, seed: int, text) -> EvalSets:
    tc = plan.cfg.task
    tasks = [t for t in tc.tasks if t != "text"]
    sets = {split: [eval_set(t, n, tc, seed, split) for t in tasks for n in plan.eval_lengths]
            for split in ("val", "test")}
    tv = tt = None
    if text is not None:
        n = plan.text_edges[-1] + 1
        tv, tt = (text_eval(text, n, tc.eval_examples, s) for s in ("val", "test"))
    return EvalSets(sets["val"], sets["test"], tv, tt)


def boundary_pieces(plan: Plan, text, seed: int) -> list[np.ndarray]:
    """Held-out natural text (the test windows, never used for selection) cut into pieces whose lengths are
    uniform in [BOUNDARY_FAR + 4, seq_len]: the same mix of distances for every arm, whatever the tasks."""
    L = plan.seq_len
    windows = text_eval(text, L, plan.cfg.task.eval_examples, "test")
    rng = np.random.default_rng([seed, 77])
    stream = windows.reshape(-1)
    out, at = [], 0
    lo = min(BOUNDARY_FAR + 4, L)
    while at < len(stream):
        n = int(rng.integers(lo, L + 1))
        if at + n > len(stream):
            break
        out.append(stream[at:at + n].astype(np.int32))
        at += n
    return out


def boundary_summary(res: dict, edges: list[int]) -> dict:
    """near / far / near - far / overall loss from a loss_by_boundary_distance result."""
    b = res["buckets"]
    near = [v for i, v in enumerate(b) if BOUNDARY_NEAR[0] <= edges[i] and edges[i + 1] <= BOUNDARY_NEAR[1]
            and not math.isnan(v)]
    far = [v for i, v in enumerate(b) if edges[i] >= BOUNDARY_FAR and not math.isnan(v)]
    n, f = (float(np.mean(near)) if near else math.nan), (float(np.mean(far)) if far else math.nan)
    return {"near": n, "far": f, "near_minus_far": n - f, "all": res["all"], "buckets": b}


def test_scores(model, evals: EvalSets, plan: Plan, scaling=None) -> dict:
    tc = plan.cfg.task
    s = score(with_scaling(model, scaling), evals.test, evals.text_test, tc.train_max_len, plan.text_edges, tc,
              plan.cfg.train.critical_threshold)
    out = {"id": s["id"], "ood": s["ood"], "acc": {t: {str(n): a for n, a in d.items()} for t, d in s["acc"].items()},
           "distinct": {t: {str(n): c for n, c in d.items()} for t, d in s["distinct"].items()}}
    if "text_loss" in s:
        out["text_loss"] = s["text_loss"]
    return out


def flops_to_target(history: list[dict], train_max_len: int, target: float) -> dict:
    """FLOPs at the first validation where a task's accuracy reached ``target`` at every ID length (None: never)."""
    reached = {}
    for h in history:
        for task, d in h["acc"].items():
            ids = [a for n, a in d.items() if int(n) <= train_max_len]
            if task not in reached and ids and min(ids) >= target:
                reached[task] = h["flops"]
    tasks = {t for h in history for t in h["acc"]}
    return {t: reached.get(t) for t in sorted(tasks)}


def run(plan: Plan, log=print) -> dict:
    """Train every arm for every seed, score, and return the report dict (written by report.write_reports)."""
    cfg = plan.cfg
    tc, tr, ex = cfg.task, cfg.train, cfg.extension
    torch.set_num_threads(tr.threads or max(1, auto_threads() // distributed.context().local_world_size))
    out = Path(cfg.out)
    out.mkdir(exist_ok=True)
    text = load_text(tc) if "text" in tc.tasks else None
    tcx = dataclasses.replace(tc, train_examples=plan.train_examples)
    runs, extension, boundary = [], [], []
    t_start, load_start = time.time(), (os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    ctx = distributed.context()
    # how this ran (report.json "run", the header of report.md); dtype: the trainers' own, set below
    run_info = runinfo.collect(device=ctx.device, parallel=ctx.parallel if ctx.enabled else "none",
                               requested_backends={"attention": tr.attn_backend or None})
    bedges = distance_buckets(plan.seq_len)
    for seed in tr.seeds:
        evals = build_evals(plan, seed, text)
        docs = task_docs(cfg, tcx, seed, text, tr.steps)
        tables, finals = {}, {}
        pieces = boundary_pieces(plan, text, seed) if text is not None else None
        for ap in plan.arms:
            arm = ap.arm
            if arm.fit not in tables:
                tables[arm.fit] = train_table(tcx, seed, pad_pow2=arm.fit == "pad", docs=docs)
            run_dir = out / "ckpt" / f"{arm.name}_s{seed}"
            t = Trainer(plan, arm, seed, tables[arm.fit], evals, run_dir, max_steps=plan.max_steps,
                        schedule_steps=ap.schedule_steps, budget=(plan.budget_kind, plan.budget))
            run_info["dtype"] = str(t.dtype).removeprefix("torch.")
            if cfg.resume and (run_dir / "last.pt").exists():
                t.load(run_dir / "last.pt")
                log(f"resumed {arm.name} seed {seed} at step {t.step}")
            t.fit(progress=cfg.progress, desc=f"{arm.name} seed {seed}")
            test = {"final": test_scores(t.model, evals, plan)}
            finals[arm.name] = copy.deepcopy(t.model) if (ex.extend and plan.extension.arm.name == arm.name) else None
            bnd = None
            if pieces is not None:  # dist: eval_model runs on the device
                bnd = boundary_summary(loss_by_boundary_distance(distributed.context().eval_model(t.model), pieces,
                                                                 plan.seq_len, arm, bedges), bedges)
            for which in ("best_id", "best_ood"):
                test[which] = test_scores(t.model, evals, plan) if t.restore(which) else None
            runs.append(summarize(plan, t, test, bnd))
            a = runs[-1]["accounting"]
            log(f"{arm.name} seed {seed}: {t.step} steps, {a['supervised']:,} supervised tokens "
                f"({'met' if a['budget_met'] else 'NOT met'}), padding {100 * a['padding_frac']:.0f}%, "
                f"final ID {test['final']['id']:.3f} OOD {test['final']['ood']:.3f} "
                f"({time.time() - t_start:.0f}s elapsed)")
        if plan.extension is not None:
            base = finals.get(plan.extension.arm.name)
            if base is None:  # the extension arm is a preset outside this run's arms: train it now
                ap_arm = plan.extension.arm
                if ap_arm.fit not in tables:
                    tables[ap_arm.fit] = train_table(tcx, seed, pad_pow2=ap_arm.fit == "pad", docs=docs)
                t = Trainer(plan, ap_arm, seed, tables[ap_arm.fit], evals, out / "ckpt" / f"extend_base_s{seed}",
                            max_steps=plan.max_steps, schedule_steps=tr.steps, budget=(plan.budget_kind, plan.budget))
                t.fit(progress=cfg.progress, desc=f"extension base ({ap_arm.name}) seed {seed}")
                base = t.model
            extension += run_extension(plan, seed, base, evals, text, log)
        if pieces is not None:
            boundary.append({"seed": seed, "edges": bedges, "pieces": len(pieces)})
    return {"run": run_info, "config": cfg.to_dict(), "command": plan.command, "machine": machine() | {"load_avg_1min_start": load_start},
            "wall_seconds": time.time() - t_start, "derived": dict(plan.derived),
            "arms": [{"name": ap.arm.name, **ap.arm.knobs(), "schedule_steps": ap.schedule_steps,
                      "per_step": ap.per_step, "steps_per_epoch": ap.steps_per_epoch} for ap in plan.arms],
            "warnings": list(plan.warnings), "runs": runs, "extension": extension, "boundary": boundary}


def summarize(plan: Plan, t: Trainer, test: dict, boundary: dict | None) -> dict:
    tr, tc = plan.cfg.train, plan.cfg.task
    hist = [{"step": h["step"], "loss": h["loss"], "id": h["id"], "ood": h["ood"], "ood_score": h["ood_score"],
             "noise_sd": h["noise_sd"], "learned": h["learned"], "flops": h["flops"], "supervised": h["supervised"],
             "acc": {k: {str(n): a for n, a in d.items()} for k, d in h["acc"].items()}} for h in t.history]
    acct = t.accounting()
    st = t.stopper
    return {"arm": t.arm.name, "knobs": t.arm.knobs(), "seed": t.seed, "steps": t.step, "accounting": acct,
            "train_seconds": t.train_time, "tokens_per_second": acct["tokens"] / max(t.train_time, 1e-9),
            "num_params": t.model.num_params(), "best_id_step": t.best_id_step,
            "early_stop": {"fired_at": st.stopped_at, "kept_step": st.best_step, "reason": st.reason,
                           "halted_training": bool(tr.early_stop and st.stopped_at is not None),
                           "max_ood_drop_after_best": st.max_drop_after_best()},
            "flops_to_target": flops_to_target(hist, tc.train_max_len, tr.target_acc),
            "test": test, "boundary": boundary, "final_loss": t.losses[-1] if t.losses else math.nan,
            "history": hist}


def run_extension(plan: Plan, seed: int, base, evals: EvalSets, text, log) -> list[dict]:
    """Three arms per scaling kind: no extension, scaling only (at evaluation), scaling + a brief fine-tune."""
    cfg, ext = plan.cfg, plan.extension
    orig = plan.seq_len
    arms = [{"seed": seed, "scaling": "none", "arm": "no extension", "finetune_steps": 0,
             "acc": test_scores(base, evals, plan)["acc"]}]
    ev = EvalSets(evals.val, evals.test, None, None)
    docs = task_docs(cfg, dataclasses.replace(ext.task, train_examples=0), seed, None, ext.finetune_steps)
    table = train_table(ext.task, seed, pad_pow2=ext.arm.fit == "pad", docs=docs)
    for kind in ext.scalings:
        scaling = make_scaling(kind, cfg.extension.factor, orig)
        arms.append({"seed": seed, "scaling": kind, "arm": "scaling only", "finetune_steps": 0,
                     "acc": test_scores(base, ev, plan, scaling)["acc"]})
        t = Trainer(plan, ext.arm, seed, table, ev, Path(cfg.out) / "ckpt" / f"extend_{kind}_s{seed}",
                    max_steps=ext.finetune_steps, schedule_steps=ext.finetune_steps, budget=None,
                    task_cfg=ext.task, seq_len=ext.seq_len, init_model=base, rope_scaling=scaling)
        t.fit(progress=cfg.progress, desc=f"extend {kind} seed {seed}")
        arms.append({"seed": seed, "scaling": kind, "arm": "scaling + fine-tune", "finetune_steps": ext.finetune_steps,
                     "finetune_len": ext.task.train_max_len, "acc": test_scores(t.model, ev, plan, scaling)["acc"]})
        log(f"extension {kind} seed {seed}: fine-tuned {ext.finetune_steps} steps at n <= {ext.task.train_max_len}")
    return arms


# ------------------------------------------------------------------------------------------ ablate
def ablation_arms(base: ArmConfig) -> list[tuple[str, ArmConfig, str]]:
    """(factor, arm, note) for the base arm and one arm per changed knob value (one factor at a time).

    Each knob moves to every other value (curriculum: to natural; cycles stays). Where the new value cannot
    run with the base's other knobs (packing away from decompose with a curriculum), the dependent knob
    takes its only valid value and the note says so.
    """
    out = [("base", base, "")]
    for k in KNOBS:
        if k == "cycles":
            continue
        alts = [v for v in KNOB_CHOICES[k] if v != getattr(base, k)]
        if k == "curriculum":
            alts = ["natural"] if base.curriculum != "natural" else []
            if base.packing != "decompose":
                alts = []
        for v in alts:
            arm = dataclasses.replace(base, name=f"{base.name}-{k}-{v}", **{k: v})
            note = ""
            if k == "packing" and v != "decompose" and (arm.curriculum != "natural" or arm.cycles != 1):
                arm = dataclasses.replace(arm, curriculum="natural", cycles=1)
                note = f"curriculum {base.curriculum} -> natural too ({v} has one row length)"
            check_arm(arm)
            out.append((k, arm, note))
    return out


def ablation_specs(base_spec: str) -> list[str]:
    """The arm specs (``name:knob=v,...``) of the ablation around ``base_spec`` (a preset or a spec)."""
    from .config import parse_arm
    base = parse_arm(base_spec)
    specs = []
    for _, arm, _ in ablation_arms(base):
        knobs = ",".join(f"{k}={v}" for k, v in arm.knobs().items())
        specs.append(base.name if arm is base and base.name in ARM_PRESETS else f"{arm.name}:{knobs}")
    return specs


# --------------------------------------------------------------------------------------- machine
def auto_threads() -> int:
    cores = os.cpu_count() or 1
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def ablation_meta(plan: Plan) -> dict:
    """{"base": name, "variants": [{"factor", "arm", "note"}]} for the report of ``lengen-train ablate``
    (the plan's first arm is the base; its other arms are ablation_arms of it)."""
    base = plan.arms[0].arm
    by_name = {arm.name: (k, note) for k, arm, note in ablation_arms(base)}
    return {"base": base.name, "variants": [{"factor": by_name.get(ap.arm.name, ("other", ""))[0],
                                             "arm": ap.arm.name, "note": by_name.get(ap.arm.name, ("", ""))[1]}
                                            for ap in plan.arms[1:]]}
