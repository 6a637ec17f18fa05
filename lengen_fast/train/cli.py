"""lengen-train: train every strategy on the same tasks and token budget, then report ID vs OOD.

    lengen-train                          the default comparison (<= 10 min on a 2-core CPU)
    lengen-train --preset quick           a < 1 min smoke run
    lengen-train compare --task parity    all strategies side by side on one task
    lengen-train --seeds 0,1,2 --steps 1500 --out runs/x

Every config field is a flag (``--d-model 128``, ``--no-tie-embeddings``, ``--tasks a,b``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import typing
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .config import SECTIONS, STRATEGIES, TASKS, RunConfig, apply_overrides, eval_lengths, load_preset, validate
from .evaluate import critical_length, distance_buckets, generalization_gap, loss_by_boundary_distance
from .tasks import (auto_train_examples, eval_set, load_text, make_example, max_train_doc_tokens, text_base, text_eval,
                    text_pieces, text_train_len, train_table)
from .trainer import EvalSets, Trainer, check_compatible, score


def next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------- experiment
def plan(cfg: RunConfig) -> dict:
    """Derived lengths; validates the whole config (every bad input fails here, before training)."""
    tc, tr, ex = cfg.task, cfg.train, cfg.extension
    doc_max = max_train_doc_tokens(tc)
    seq_len = tr.seq_len or next_pow2(doc_max)
    ext_tc = replace(tc, train_max_len=round(ex.factor * tc.train_max_len))
    ext_seq = next_pow2(max(max_train_doc_tokens(ext_tc), seq_len)) if ex.extend else seq_len
    validate(cfg, doc_max_tokens=max(seq_len, ext_seq))
    distributed.check_config(cfg, [seq_len, ext_seq])  # dist: backend, world size vs batch, resume
    if ex.extend:
        for kind in ex.scalings:
            make_scaling(kind, ex.factor, seq_len)
    if tr.seq_len and tr.seq_len < doc_max and any(s != "concat_chunk" for s in tr.strategies):
        raise ValueError(f"seq_len={tr.seq_len} is shorter than the longest training document ({doc_max} tokens); "
                         "only concat_chunk may cut documents")
    if "vsl" in tr.strategies and seq_len & (seq_len - 1):
        raise ValueError(f"seq_len={seq_len} must be a power of two for vsl (its largest bucket)")
    if cfg.resume:  # resumable runs: the strategies' and the extension's pretrained base
        for ck in sorted(Path(cfg.out).glob("ckpt/*/last.pt")):
            if ck.parent.name.startswith("extend_base"):
                check_compatible(torch.load(ck, map_location="cpu", weights_only=False),
                                 replace(cfg, model=replace(cfg.model, pos_encoding="rope")), ck)
            elif not ck.parent.name.startswith("extend"):
                check_compatible(torch.load(ck, map_location="cpu", weights_only=False), cfg, ck)
    return {"doc_max": doc_max, "seq_len": seq_len, "ext_tc": ext_tc, "ext_seq": ext_seq}


def text_edges(cfg: RunConfig) -> list[int]:
    L = text_train_len(cfg.task)
    return [0, L] + [round(m * L) for m in sorted(cfg.task.eval_multiples) if m > 1]


def make_scaling(kind: str, factor: float, orig: int):
    from ..rope import RopeScaling
    return RopeScaling(kind=kind, factor=factor, original_max_position_embeddings=orig)


def build_evals(cfg: RunConfig, seed: int, text) -> EvalSets:
    tc = cfg.task
    tasks = [t for t in tc.tasks if t != "text"]
    sets = {split: [eval_set(t, n, tc, seed, split) for t in tasks for n in eval_lengths(tc)]
            for split in ("val", "test")}
    tv = tt = None
    if text is not None:
        n = text_edges(cfg)[-1] + 1
        tv, tt = (text_eval(text, n, tc.eval_examples, s) for s in ("val", "test"))
    return EvalSets(sets["val"], sets["test"], tv, tt)


def table_for(cfg: RunConfig, tc, strategy: str, seed: int, text, steps: int | None = None):
    if not tc.train_examples:
        tc = replace(tc, train_examples=auto_train_examples(tc, steps or cfg.train.steps, cfg.train.tokens_per_batch))
    docs = None
    if text is not None:
        L = text_train_len(tc)
        docs = text_pieces(text.train, (min(L, 2 * tc.train_min_len + 4), L), tc.text_docs, seed)
    return train_table(tc, seed, docs, pad_pow2=strategy == "vsl" and cfg.train.vsl_pad_pow2)


def boundary_docs(cfg: RunConfig, seed: int, text, count: int = 48):
    """Fresh documents from the training distribution for the loss-vs-boundary-distance comparison
    (a loss diagnostic, not a generalization score: small sizes have too few prompts to hold out)."""
    tc = cfg.task
    rng = np.random.default_rng(seed + 7)
    docs, masks = [], []
    for t in tc.tasks:
        if t == "text":
            L = text_train_len(tc)
            for d in text_pieces(text.heldout, (min(L, 2 * tc.train_min_len + 4), L), count, seed + 7):
                docs.append(d)
                masks.append(np.ones(len(d), np.uint8))
            continue
        for _ in range(count):
            d, m = make_example(t, int(rng.integers(tc.train_min_len, tc.train_max_len + 1)), rng, tc, "train")
            docs.append(d)
            masks.append(m)
    order = rng.permutation(len(docs))
    return [docs[i] for i in order], [masks[i] for i in order]


def acc_dict(scored: dict) -> dict:
    return {t: {str(n): a for n, a in d.items()} for t, d in scored["acc"].items()}


def run_experiment(cfg: RunConfig, log=print) -> dict:
    p = plan(cfg)
    tc, tr, ex = cfg.task, cfg.train, cfg.extension
    torch.set_num_threads(tr.threads or max(1, auto_threads() // distributed.context().local_world_size))
    out = Path(cfg.out)
    out.mkdir(exist_ok=True)
    text = load_text(tc) if "text" in tc.tasks else None
    vocab = text_base(tc) + (text.vocab if text is not None else 0)
    edges = text_edges(cfg)
    runs, results, extension, boundary = [], [], [], []
    t_start = time.time()
    for seed in tr.seeds:
        evals = build_evals(cfg, seed, text)
        models, tables = {}, {}

        def table(strategy):  # built once per seed: vsl's copy differs only by power-of-two padding
            key = strategy == "vsl" and tr.vsl_pad_pow2
            if key not in tables:
                tables[key] = table_for(cfg, tc, strategy, seed, text)
            return tables[key]

        for strategy in tr.strategies:
            run_dir = out / "ckpt" / f"{strategy}_s{seed}"
            t = Trainer(cfg, strategy, seed, table(strategy), evals, vocab, run_dir,
                        max_len=p["seq_len"], train_max_len=tc.train_max_len, text_edges=edges)
            if cfg.resume and (run_dir / "last.pt").exists():
                t.load(run_dir / "last.pt")
                log(f"resumed {strategy} seed {seed} at step {t.step}")
            t.fit(progress=cfg.progress, desc=f"{strategy} seed {seed}")
            t.restore_best()
            test = score(t.model, evals.test, evals.text_test, tc.train_max_len, edges)
            models[strategy] = t.model
            run = summarize(cfg, t, test)
            runs.append(run)
            results += [dict(strategy=strategy, task=task, seed=seed, train_max_len=tc.train_max_len,
                             accuracy=acc, tokens_per_second=run["tokens_per_second"],
                             train_flops=run["train_flops"], best_step=run["best_step"],
                             early_stopped_at=run["early_stopped_at"],
                             flops_to_target=run["flops_to_target"].get(task),
                             generalization_gap=generalization_gap({int(k): v for k, v in acc.items()},
                                                                   tc.train_max_len),
                             critical_length=critical_length({int(k): v for k, v in acc.items()},
                                                             tr.critical_threshold))
                        for task, acc in acc_dict(test).items()]
            log(f"{strategy} seed {seed}: {run['steps']} steps, ID {test['id']:.3f} OOD {test['ood']:.3f}, "
                f"{run['tokens_per_second']:,.0f} tok/s ({time.time() - t_start:.0f}s elapsed)")
        if ex.extend:
            base = models.get(ex.ext_strategy) if cfg.model.pos_encoding == "rope" else None
            if base is None:  # pretrain a short-context rope model for the extension study
                rcfg = replace(cfg, model=replace(cfg.model, pos_encoding="rope"))
                t = Trainer(rcfg, ex.ext_strategy, seed, table(ex.ext_strategy), evals,
                            vocab, out / "ckpt" / f"extend_base_s{seed}", max_len=p["seq_len"],
                            train_max_len=tc.train_max_len, text_edges=edges)
                if cfg.resume and (t.run_dir / "last.pt").exists():
                    t.load(t.run_dir / "last.pt")
                t.fit(progress=cfg.progress, desc=f"extension base (rope, {ex.ext_strategy}) seed {seed}")
                t.restore_best()
                base = t.model
            extension += run_extension(cfg, p, seed, base, evals, vocab, text, edges, log)
        if "pack_naive" in models and "pack_masked" in models:
            docs, masks = boundary_docs(cfg, seed, text)
            bedges = distance_buckets(p["seq_len"])
            boundary.append({"seed": seed, "edges": bedges, **{  # dist: eval_model runs on the device
                s: loss_by_boundary_distance(distributed.context().eval_model(models[s]), docs, masks, p["seq_len"],
                                             s == "pack_masked", bedges)
                for s in ("pack_naive", "pack_masked")}})
    return {"config": cfg.to_dict(), "machine": machine(), "wall_seconds": time.time() - t_start,
            "derived": {"seq_len": p["seq_len"], "doc_max_tokens": p["doc_max"],
                        "eval_lengths": eval_lengths(tc), "text_edges": edges if text is not None else None,
                        "vocab_size": vocab},
            "results": results, "runs": runs, "extension": extension, "boundary": boundary}


def summarize(cfg: RunConfig, t: Trainer, test: dict) -> dict:
    tr = cfg.train
    reached = {}
    for h in t.history:  # FLOPs at the first validation where a task's ID accuracy reaches the target
        for task, d in h["acc"].items():
            ids = [a for n, a in d.items() if n <= cfg.task.train_max_len]
            if task not in reached and ids and max(ids) >= tr.target_acc:
                reached[task] = h["flops"]
    hist = [{"step": h["step"], "loss": h["loss"], "id": h["id"], "ood": h["ood"], "ood_score": h["ood_score"],
             "flops": h["flops"],
             "acc": {k: {str(n): a for n, a in d.items()} for k, d in h["acc"].items()},
             **({"text_loss": h["text_loss"]} if "text_loss" in h else {})} for h in t.history]
    return {"strategy": t.strategy, "seed": t.seed, "steps": t.step, "train_seconds": t.train_time,
            "tokens": t.tokens, "tokens_per_second": t.tokens / max(t.train_time, 1e-9), "train_flops": t.flops,
            "num_params": t.model.num_params(), "best_step": t.stopper.best_step,
            "best_val_ood": t.stopper.best, "early_stopped_at": t.stopper.stopped_at,
            "stop_reason": t.stopper.reason or ("completed all steps" if t.step >= t.steps else ""),
            "max_ood_drop_after_best": t.stopper.max_drop_after_best(), "flops_to_target": reached,
            "test": {"id": test["id"], "ood": test["ood"], "acc": acc_dict(test),
                     **({"text_loss": test["text_loss"]} if "text_loss" in test else {})},
            "losses": t.losses, "history": hist}


def run_extension(cfg, p, seed, base, evals, vocab, text, edges, log) -> list[dict]:
    """Three arms per scaling kind: no extension, scaling only, scaling + a brief fine-tune."""
    tc, tr, ex = cfg.task, cfg.train, cfg.extension
    orig = p["seq_len"]
    ft_steps = max(1, round(ex.ext_steps_frac * tr.steps))
    base.rope_scaling = None
    arms = [{"seed": seed, "scaling": "none", "arm": "no extension", "finetune_steps": 0,
             "acc": acc_dict(score(base, evals.test, None, tc.train_max_len, edges))}]
    for kind in ex.scalings:
        scaling = make_scaling(kind, ex.factor, orig)
        base.rope_scaling = scaling
        arms.append({"seed": seed, "scaling": kind, "arm": "scaling only", "finetune_steps": 0,
                     "acc": acc_dict(score(base, evals.test, None, tc.train_max_len, edges))})
        base.rope_scaling = None
        ext_cfg = replace(cfg, task=p["ext_tc"], train=replace(tr, eval_every=ft_steps, early_stop=False,
                                                               warmup=max(1, ft_steps // 10)))
        ft_evals = EvalSets(evals.val, evals.test, None, None)
        t = Trainer(ext_cfg, ex.ext_strategy, seed,
                    table_for(ext_cfg, p["ext_tc"], ex.ext_strategy, seed, text, steps=ft_steps),
                    ft_evals, vocab, Path(cfg.out) / "ckpt" / f"extend_{kind}_s{seed}", max_len=p["ext_seq"],
                    train_max_len=p["ext_tc"].train_max_len, text_edges=edges, steps=ft_steps, init_model=base,
                    rope_scaling=scaling)
        t.fit(progress=cfg.progress, desc=f"extend {kind} seed {seed}")
        arms.append({"seed": seed, "scaling": kind, "arm": "scaling + fine-tune", "finetune_steps": ft_steps,
                     "finetune_fraction": ft_steps / tr.steps, "finetune_len": p["ext_tc"].train_max_len,
                     "acc": acc_dict(score(t.model, evals.test, None, tc.train_max_len, edges))})
        log(f"extension {kind} seed {seed}: fine-tuned {ft_steps} steps ({ft_steps / tr.steps:.0%} of pretraining)")
    return arms


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


# ---------------------------------------------------------------------------------- argparse
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _list_parser(elem):
    def parse(s: str):
        try:
            return [elem(x) for x in s.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {elem.__name__}: {s!r}") from e
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lengen-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="a preset name (quick, default, long) or a .json path")
    ap.add_argument("--out", default=None, help="output directory (its parent must exist)")
    ap.add_argument("--resume", action="store_true", default=None,
                    help="resume every run found under --out from its last checkpoint")
    ap.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    ap.add_argument("--task", default=None, help="compare: the one task to run")
    for sec, cls in SECTIONS.items():
        g = ap.add_argument_group(sec)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            dest = f"{sec}.{f.name}"
            if tp is bool:
                g.add_argument(_flag(f.name), dest=dest, action=argparse.BooleanOptionalAction, default=None)
            elif typing.get_origin(tp) is list:
                g.add_argument(_flag(f.name), dest=dest, type=_list_parser(typing.get_args(tp)[0]), default=None,
                               metavar="A,B,...")
            else:
                g.add_argument(_flag(f.name), dest=dest, type=tp, default=None)
    return ap


def config_from_args(argv: list[str]) -> tuple[str, RunConfig]:
    cmd = "run"
    if argv and argv[0] in ("run", "compare"):
        cmd, argv = argv[0], argv[1:]
    args = build_parser().parse_args(argv)
    cfg = RunConfig()
    if args.preset:
        apply_overrides(cfg, load_preset(args.preset))
    over: dict = {}
    for k, v in vars(args).items():
        if v is None or k in ("preset", "task"):
            continue
        if "." in k:
            sec, name = k.split(".", 1)
            over.setdefault(sec, {})[name] = v
        else:
            over[k] = v
    apply_overrides(cfg, over)
    if cmd == "compare":
        task = args.task or cfg.task.tasks[0]
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
        cfg.task.tasks = [task]
        if "train" not in over or "strategies" not in over["train"]:
            cfg.train.strategies = list(STRATEGIES)
    elif args.task:
        raise ValueError("--task belongs to `lengen-train compare`; use --tasks for a run")
    return cmd, cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm"]:  # the language-model mode has its own config and driver (lm.py)
        from . import lm
        return lm.main(argv[1:])
    try:
        cmd, cfg = config_from_args(argv)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                plan(cfg)
            finally:
                for w in caught:
                    print(f"lengen-train: warning: {w.message}", file=sys.stderr)
        spawn = cfg.dist.nproc > 1 and not distributed.under_launcher()
        ctx = None if spawn else distributed.init_distributed(cfg.dist.dist_backend, cfg.dist.parallel,
                                                                   cfg.dist.device)
    except (ValueError, TypeError) as e:
        print(f"lengen-train: error: {e}", file=sys.stderr)
        return 2
    if spawn:  # dist: lengen-train --nproc N relaunches itself as N torchrun workers
        return distributed.launch(cfg.dist.nproc, argv)
    try:  # dist: every rank trains and evaluates; rank 0 alone prints and writes
        return _main(cmd, cfg, ctx.is_main)
    finally:
        distributed.shutdown()


def _main(cmd: str, cfg: RunConfig, is_main: bool) -> int:
    from .report import write_reports

    if not is_main:
        cfg.progress = False
        run_experiment(cfg, log=lambda *a: None)
        return 0
    print(f"lengen-train {cmd}: tasks {cfg.task.tasks}, strategies {cfg.train.strategies}, seeds {cfg.train.seeds}, "
          f"{cfg.train.steps} steps x {cfg.train.tokens_per_batch} tokens -> {cfg.out}")
    report = run_experiment(cfg)
    paths = write_reports(report, Path(cfg.out))
    print(paths["table"])
    print(f"\nreport: {paths['md']}\njson:   {paths['json']}\nplots:  {', '.join(str(p) for p in paths['plots'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
