"""How does an experiment run? Arms x seeds x a workload, seeds in parallel worker processes, then the report.

A seed is the unit of work: every arm of the seed trains on the same documents (and the same evaluation sets), the
arms taking turns one evaluation interval at a time, so machine-load swings hit every arm of a seed alike; then the
final, best-ID and best-OOD checkpoints are scored on the test sets, and the extension study runs on one arm's
final model. Seeds are independent: ``train.workers`` processes run them in parallel (spawned, ``train.threads``
torch threads each), and a seed's result depends only on (plan, seed), never on the worker count or on which
worker ran it. Each finished seed is written to ``out/seeds/seed_<s>.json``; ``--resume`` skips finished seeds
and continues the others from their checkpoints.

``--seeds auto`` (train.seeds_auto) runs rounds: after each, the headline comparisons' minimum detectable effects
(report.headline) are checked against ``train.mde``; another round of ``workers`` new seeds starts until every MDE
is at or below the target, ``max_seeds`` is reached, the target is out of reach at ``max_seeds``, or the next
round would pass ``wall_budget_s``. The report says which stopped it.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from pathlib import Path

import torch

from .. import __version__
from ..fsio import atomic_write_text
from ..progress import progress
from . import distributed, runinfo
from .plan import CONFIG_FILE, Plan, make_scaling, result_config
from .trainer import Run

REPORT_VERSION = 2       # report.json layout; replicate refuses another version
_WORKLOAD: dict = {}     # one workload per process (text / corpus loaded once)
UNITS = {"supervised": "tok", "flops": "FLOP", "steps": "step"}


def workload(plan: Plan):
    from .workload import WORKLOADS
    key = (plan.command, json.dumps(plan.cfg.to_dict(), sort_keys=True, default=str))
    if _WORKLOAD.get("key") != key:
        _WORKLOAD.clear()
        _WORKLOAD.update(key=key, w=WORKLOADS[plan.cfg.workload](plan))
    return _WORKLOAD["w"]


# ------------------------------------------------------------------------------------------ one seed
def run_seed(plan: Plan, seed: int, log=print, tty: bool | None = None) -> dict:
    """Train every arm of ``seed`` (taking turns), score it, run the extension study; a JSON-ready dict."""
    cfg, tr = plan.cfg, plan.cfg.train
    W = workload(plan)
    out = Path(cfg.out)
    ctx = distributed.context()
    cycles = cfg.corpus.subset_factor if cfg.workload == "corpus" else 1
    arms = list(plan.arms)
    ext = plan.extension
    if ext is not None and ext.arm.name not in {a.name for a in arms}:
        arms.append(ext.arm)    # the extension arm is a preset outside this run's arms: it trains too, unreported
    runs = []
    for arm in arms:
        r = Run(plan, arm, seed, W.source(seed, arm), out / "ckpt" / f"{arm.name}_s{seed}", budget=plan.budget,
                seq_len=plan.seq_len, lr=tr.lr, validate=W.validator(seed), cycles=cycles)
        if cfg.resume and (r.run_dir / "last.pt").exists():
            r.load(r.run_dir / "last.pt")
            log(f"resumed {arm.name} seed {seed} at step {r.step}")
        runs.append(r)
    bars = {r.label: progress(total=plan.budget.amount, initial=plan.budget.spent(r), desc=f"{r.label} seed {seed}",
                              enabled=cfg.progress and ctx.is_main, tty=tty, unit=UNITS[plan.budget.kind])
            for r in runs}
    for k in range(1, tr.evals + 1):                      # arms take turns, one evaluation interval each
        goal = plan.budget.amount * k / tr.evals
        for r in runs:
            if r.evals_done >= k or (r.history and r.halted and r.history[-1]["step"] == r.step):
                continue
            r.train_until(goal, bars[r.label])
            row = r.evaluate()
            bars[r.label].event("eval", loss=f"{row['train_loss']:.3f}", id=f"{row['id']:.3f}",
                                **({"ood": f"{row['ood']:.3f}"} if "ood" in row else {}))
    for b in bars.values():
        b.close()
    result = {"seed": seed, "runs": [], "extension": [], "notes": []}
    for r in runs:
        test = {"final": W.test(r.model, seed)}
        summary = summarize(plan, r, W.extras(r, seed))
        if cfg.train.export and cfg.workload == "corpus" and r.arm in plan.arms:
            note = export_final(plan, W, r)
            if note:
                result["notes"].append(note)
        if ext is not None and r.arm.name == ext.arm.name:
            result["extension"] = run_extension(plan, W, r, seed, log, result["notes"])
        for which in ("best_id", "best_ood"):
            test[which] = W.test(r.model, seed) if r.restore(which) else None
        summary["test"] = test
        if r.arm in plan.arms:
            result["runs"].append(summary)
        a = summary["accounting"]
        log(f"{r.label} seed {seed}: {r.step} steps, {a['supervised']:,} supervised tokens "
            f"({'met' if a['budget_met'] else 'NOT met'}), padding {100 * a['padding_frac']:.0f}%")
    return result


def summarize(plan: Plan, r: Run, extras: dict) -> dict:
    acct, st = r.accounting(), r.stopper
    peak = _peak_flops(plan)
    fps = r.flops / r.train_time if r.train_time else math.nan
    out = {"arm": r.label, "knobs": r.arm.knobs(), "seed": r.seed, "steps": r.step, "accounting": acct,
           "train_seconds": r.train_time, "cpu_seconds": r.cpu_time, "eval_seconds": r.eval_time,
           "tokens_per_second": acct["tokens"] / max(r.train_time, 1e-9),
           "supervised_per_second": acct["supervised"] / max(r.train_time, 1e-9),
           "supervised_per_cpu_second": acct["supervised"] / max(r.cpu_time, 1e-9),
           "flops_per_second": fps, "mfu": fps / peak if peak else None, "num_params": r.num_params,
           "best_id_step": r.best_id_step, "history": r.history, "dtype": r.dtype,
           "early_stop": {"fired_at": st.stopped_at, "kept_step": st.best_step, "reason": st.reason,
                          "halted_training": bool(plan.cfg.train.early_stop and st.stopped_at is not None),
                          "max_ood_drop_after_best": st.max_drop_after_best()}}
    if r.history and "val_loss" in r.history[-1]:
        out["final_val_loss"] = r.history[-1]["val_loss"]
    return out | extras


def run_extension(plan: Plan, W, base: Run, seed: int, log, notes: list) -> list[dict]:
    """Evaluation-time RoPE scaling arms on ``base``'s final model, then a brief fine-tune at finetune_factor x the
    training length with each fine-tune scaling, from the same weights."""
    cfg, ext = plan.cfg, plan.extension
    rows = [{"seed": seed, "arm": base.label, "stage": "evaluation", "scaling": "none", "factor": 1.0,
             "test": W.test(base.model, seed)}]
    for kind in ext.scalings:
        rows.append({"seed": seed, "arm": base.label, "stage": "evaluation", "scaling": kind,
                     "factor": cfg.extension.factor,
                     "test": W.test(base.model, seed, make_scaling(kind, cfg.extension.factor, plan.seq_len))})
    state = {k: v.detach().cpu().clone() for k, v in base.model.state_dict().items()}
    for kind in ext.finetune_scalings:
        sc = make_scaling(kind, cfg.extension.finetune_factor, plan.seq_len)
        label = f"{base.label}+ft{cfg.extension.finetune_factor:g}x_{kind}"
        try:
            ft = Run(plan, ext.arm, seed, W.finetune_source(seed, ext.arm),
                     Path(cfg.out) / "ckpt" / f"extend_{kind}_s{seed}", budget=ext.budget, seq_len=ext.seq_len,
                     lr=cfg.train.lr * cfg.extension.finetune_lr_frac, validate=W.validator(seed, "finetune"),
                     label=label, init_state=state, rope_scaling=sc, tokens_per_batch=ext.tokens_per_batch)
            ft.train_until(ext.budget.amount)
        except ValueError as e:  # keep every other result: say why this fine-tune is missing
            notes.append(f"seed {seed}: the {kind} fine-tune could not run: {e}")
            log(f"lengen-train: note: {notes[-1]}")
            continue
        ft.evaluate()
        rows.append({"seed": seed, "arm": label, "stage": "fine-tune", "scaling": kind,
                     "factor": cfg.extension.finetune_factor, "seq_len": ext.seq_len, "steps": ft.step,
                     "supervised": ft.acct["supervised"], "flops": ft.flops, "train_seconds": ft.train_time,
                     "compute_frac": ft.flops / base.flops if base.flops else math.nan,
                     "time_frac": ft.train_time / base.train_time if base.train_time else math.nan,
                     "val": ft.history[-1], "test": W.test(ft.model, seed, sc)})
        log(f"extension {kind} seed {seed}: fine-tuned {ft.step} steps at {ext.seq_len} tokens "
            f"({rows[-1]['compute_frac']:.3f} of the pretraining FLOPs)")
    return rows


def export_final(plan: Plan, W, r: Run) -> str | None:
    """The run's final model as a Hugging Face checkpoint directory ``<run_dir>/hf`` that transformers and
    lengen-eval load (rank 0; atomic). Returns a note when it cannot be exported."""
    from ..integrations.hf.export import export_llama, save_pretrained_dir
    m, ctx = plan.cfg.model, r.ctx
    if ctx.fsdp:
        return f"{r.label} seed {r.seed}: not exported as a Hugging Face checkpoint (FSDP-sharded weights)"
    if not ctx.is_main:
        return None
    tok = W.tokenizer()
    if m.arch.startswith("hf:"):
        from ..integrations.hf.export import byte_tokenizer
        save_pretrained_dir(r.model.hf, r.run_dir / "hf", byte_tokenizer() if tok == "bytes" else tok, plan.seq_len,
                            source=m.arch, overwrite=True)
    elif m.mlp != "swiglu" or m.pos_encoding != "rope":
        return (f"{r.label} seed {r.seed}: not exported as a Llama checkpoint: Llama needs mlp=swiglu and RoPE "
                f"(this run: mlp={m.mlp}, positions={m.pos_encoding}); use --mlp swiglu to export")
    else:
        export_llama(r.model, r.run_dir / "hf", tokenizer=tok, context=plan.seq_len, overwrite=True)
    return None


def _peak_flops(plan: Plan) -> float | None:
    tr = plan.cfg.train
    if tr.peak_tflops > 0:
        return tr.peak_tflops * 1e12
    dev = distributed.context().device
    if dev.type != "cuda":
        return None
    from .runinfo import PEAK_BF16_FLOPS
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------------------ many seeds
def _seed_job(args) -> dict:
    """A worker process's job: one seed, with this process's own torch threads and plain progress lines."""
    plan, seed, threads = args
    torch.set_num_threads(threads)
    return run_seed(plan, seed, log=lambda m: print(m, flush=True), tty=False)


def threads_per_worker(plan: Plan) -> int:
    tr = plan.cfg.train
    if tr.threads:
        return tr.threads
    local = distributed.context().local_world_size
    return max(1, (os.cpu_count() or 1) // max(1, plan.workers * local))


def run_seeds(plan: Plan, seeds: list[int], log=print) -> dict[int, dict]:
    """Each seed's result (from out/seeds/ when a resumed run finished it), seeds in parallel workers."""
    out = Path(plan.cfg.out) / "seeds"
    done, todo = {}, []
    for s in seeds:
        f = out / f"seed_{s}.json"
        if plan.cfg.resume and f.is_file():
            done[s] = json.loads(f.read_text())
            log(f"seed {s}: finished earlier, read from {f}")
        else:
            todo.append(s)
    threads = threads_per_worker(plan)
    workers = min(plan.workers, len(todo))
    if workers <= 1:
        torch.set_num_threads(threads)
        results = (run_seed(plan, s, log) for s in todo)
    else:
        log(f"{len(todo)} seeds on {workers} worker processes x {threads} torch thread(s)")
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(_seed_job, [(plan, s, threads) for s in todo])
    try:
        for s, res in zip(todo, results):
            done[s] = res
            if distributed.context().is_main:
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(out / f"seed_{s}.json", json.dumps(res, default=float))
    finally:
        if workers > 1:
            pool.terminate()
    return done


def run(plan: Plan, log=print) -> dict:
    """The experiment: every seed (more under seeds auto), then the report dict (report.finish computes the
    comparisons; report.write_reports writes it)."""
    from .report import finish, headline
    cfg, tr = plan.cfg, plan.cfg.train
    ctx = distributed.context()
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(exist_ok=True)
        atomic_write_text(out / CONFIG_FILE, json.dumps({"version": __version__, "command": plan.command,
                                                          "result_config": result_config(cfg),
                                                          "config": cfg.to_dict()}, indent=1, default=str))
    t0, load0 = time.time(), (os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    run_info = runinfo.collect(device=ctx.device, parallel=ctx.parallel if ctx.enabled else "none",
                               requested_backends={"attention": tr.attn_backend or None})
    if run_info["device"]["type"] == "cpu":  # what each training process uses, not this (parent) process's count
        run_info["device"]["torch_threads"] = threads_per_worker(plan)
    seeds, results, rounds, stop = list(tr.seeds), {}, [], None
    while True:
        r0 = time.time()
        results.update(run_seeds(plan, [s for s in seeds if s not in results], log))
        rounds.append({"seeds": sorted(results), "seconds": time.time() - r0})
        if not tr.seeds_auto:
            break
        rep = finish(assemble(plan, results, run_info, t0, load0, {}))
        mdes = {h["key"]: h["diff"]["mde"] for h in headline(rep) if h["primary"]}
        worst = max(mdes.values()) if mdes else math.inf
        need = rep["power"]["seeds_needed"]
        per_round = rounds[-1]["seconds"]
        if worst <= tr.mde:
            stop = f"every headline MDE is at or below the target {tr.mde:g} (largest {worst:.3g})"
        elif len(results) >= tr.max_seeds:
            stop = f"max_seeds={tr.max_seeds} reached with the largest headline MDE {worst:.3g} > target {tr.mde:g}"
        elif need is None or need > tr.max_seeds:
            stop = (f"the target MDE {tr.mde:g} is out of reach: at the observed seed variance it needs "
                    f"{'more than 1000' if need is None else need} seeds, above max_seeds={tr.max_seeds}")
        elif tr.wall_budget_s and time.time() - t0 + per_round > tr.wall_budget_s:
            stop = (f"wall budget: another round (~{per_round:.0f} s) would pass wall_budget_s={tr.wall_budget_s:g} "
                    f"with the largest headline MDE {worst:.3g} > target {tr.mde:g}")
        if stop:
            break
        add = max(1, min(plan.workers, tr.max_seeds - len(results)))
        seeds += [max(seeds) + 1 + i for i in range(add)]
        log(f"seeds auto: largest headline MDE {worst:.3g} > target {tr.mde:g}; adding seeds {seeds[-add:]}")
    rep = assemble(plan, results, run_info, t0, load0, {"auto": tr.seeds_auto, "rounds": rounds, "stopped": stop,
                                                         "target_mde": tr.mde if tr.seeds_auto else None})
    return finish(rep)


def assemble(plan: Plan, results: dict, run_info: dict, t0: float, load0, seeds_info: dict) -> dict:
    """The report dict from the per-seed results (before report.finish adds the comparisons)."""
    cfg = plan.cfg
    order = sorted(results)
    run_info = dict(run_info)
    first = next((r for s in order for r in results[s]["runs"]), None)
    run_info["dtype"] = first["dtype"] if first else None
    rep = {"version": REPORT_VERSION, "workload": cfg.workload, "mode": plan.mode, "run": run_info, "config": cfg.to_dict(),
           "command": plan.command, "machine": machine(threads_per_worker(plan)) | {"load_avg_1min_start": load0},
           "wall_seconds": time.time() - t0, "derived": dict(plan.derived), "baseline": plan.baseline,
           "seeds": {"list": order, **seeds_info}, "warnings": list(plan.warnings),
           "arms": [{"name": a.name, **a.knobs(), **plan.derived["arms"][a.name]} for a in plan.arms],
           "runs": [r for s in order for r in results[s]["runs"]],
           "extension": [e for s in order for e in results[s]["extension"]],
           "notes": [n for s in order for n in results[s]["notes"]]}
    if plan.mode == "ablate":
        from .arms import ablation_meta
        rep["ablation"] = ablation_meta(plan.arms)
    if cfg.workload == "corpus":
        from .corpus import corpus_stats
        W = workload(plan)
        rep["corpus"] = corpus_stats(W.corpus, W.val, W.pos_docs)
        rep["edges"] = W.edges
        rep["notes"] = W.notes + rep["notes"]
    return rep


def machine(threads: int) -> dict:
    """The host, its load and the versions a report needs to be told apart from another machine's; threads: the
    torch threads of each training process (the workers', not this parent's own count)."""
    import platform
    dev = distributed.context().device
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": runinfo.cpu_name(),
            "cores": os.cpu_count(), "threads": threads,
            "cpu_isa": _isa(), "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}


def _isa() -> str | None:
    try:
        from .. import backends
        return backends.describe().get("cpu_isa")
    except Exception:  # noqa: BLE001 - a report without the ISA is still a report
        return None
