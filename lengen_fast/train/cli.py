"""lengen-train: which command line maps onto which config? Argument parsing only: the command line ->
RunConfig (config.py) -> Plan (plan.py, validated once) -> engine.run -> report.

    lengen-train                              the default comparison on the tasks workload (see the README)
    lengen-train --preset quick               a < 1 min smoke run
    lengen-train compare --task parity        the four task preset arms side by side on one task
    lengen-train ablate --base vsl            one factor at a time around an arm, one table of effects
    lengen-train lm                           the corpus workload (language modelling) with its default preset
    lengen-train lm --preset quick            its smoke run
    lengen-train replicate runs               re-run a finished experiment with disjoint seeds; compare verdicts
    lengen-train --seeds auto --mde 0.1       add seeds until every headline MDE is <= 0.1

Every config field is a flag (``--d-model 128``, ``--no-tie-embeddings``, ``--tasks a,b``). An arm is a preset
(concat_chunk, pack_naive, pack_masked, vsl, concat_docmask, dd_natural, dd_grow_p2; aliases concat, bfd_docmask)
or ``name:knob=value,...`` with knobs packing (concat | bfd | decompose), attention (row | document), positions
(row | document), curriculum, cycles, fit (none | pad) and ``base=<preset>`` for the knobs not given.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings
from pathlib import Path

from . import distributed
from .arms import ablation_specs
from .config import SECTIONS, TOP_LEVEL, RunConfig, apply_overrides, load_preset
from .tasks import TASKS


# ---------------------------------------------------------------------------------- subcommands
def _compare(cfg: RunConfig, args) -> None:
    task = args.task or cfg.task.tasks[0]
    if task not in TASKS:
        raise ValueError(f"--task: unknown task {task!r}; choose from {TASKS}")
    cfg.task.tasks = [task]
    if not args.arms_given:
        cfg.train.arms = ["concat_chunk", "pack_naive", "pack_masked", "vsl"]


def _ablate(cfg: RunConfig, args) -> None:
    cfg.train.arms = ablation_specs(args.base)


# name -> (workload, help, hook that adjusts the config)
COMMANDS: dict[str, tuple[str, str, typing.Callable]] = {
    "run": ("tasks", "train and compare the arms (the default)", lambda cfg, args: None),
    "compare": ("tasks", "the four task preset arms on one task (--task)", _compare),
    "ablate": ("tasks", "one-factor-at-a-time arms around --base, one table of effects", _ablate),
    "lm": ("corpus", "the corpus workload: language modelling on a text corpus", lambda cfg, args: None),
}


# ---------------------------------------------------------------------------------- argparse
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _list_parser(elem, seeds: bool = False):
    """A comma-separated list. For --seeds also "auto", and a bare count N meaning seeds 0..N-1 (one explicit seed
    is a list of one: "5,")."""
    def parse(s: str):
        if seeds and s.strip() == "auto":
            return "auto"
        if seeds and "," not in s:
            try:
                n = int(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a count of seeds, a comma-separated list or auto: {s!r}")
            if n < 1:
                raise argparse.ArgumentTypeError(f"--seeds {s}: a bare number is a count of seeds (0..N-1) and must be "
                                                 ">= 1; one explicit seed is a list of one, e.g. --seeds 0,")
            return list(range(n))
        try:
            return [elem(x) for x in s.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {elem.__name__}"
                                             f"{' or auto' if seeds else ''}: {s!r}") from e
    return parse


def _help(f) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return f"{f.metadata.get('help', '')} (default: {shown!r})".replace("%", "%%")


def build_parser(cmd: str = "run") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lengen-train" + ("" if cmd == "run" else f" {cmd}"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="a preset of this workload (tasks: quick, default, long; lm: "
                    "quick, default = lm_cpu, lm_gpt2) or a .json path (default: 'default')")
    ap.add_argument("--task", default=None, help="compare: the one task to run (default: the first of --tasks)")
    ap.add_argument("--base", default="vsl", help="ablate: the base arm, a preset or a name:knob=v,... spec "
                    "(default: 'vsl')")
    ap.add_argument("--arm", dest="extra_arms", action="append", default=None, metavar="NAME:KNOB=V,...",
                    help="add an arm (repeatable) to those of --arms (default: none)")
    ap.add_argument("--model", dest="model.arch", default=None, metavar="lengen|hf:PATH",
                    help="the model to train: lengen (ours) or hf:PATH, a Hugging Face config.json or checkpoint "
                    "directory (default: 'lengen')")
    ap.add_argument("--context", dest="train.seq_len", type=int, default=None,
                    help="the same as --seq-len: the context L (default: the preset's)")
    top = ap.add_argument_group("run")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name, tp in TOP_LEVEL.items():
        if name == "workload":
            continue
        if tp is bool:
            top.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                             help=_help(fields[name]))
        else:
            top.add_argument(_flag(name), dest=name, default=None, help=_help(fields[name]))
    for sec, cls in SECTIONS.items():
        g = ap.add_argument_group(sec)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, dest = hints[f.name], f"{sec}.{f.name}"
            if dest == "model.arch":
                continue   # --model
            if tp is bool:
                g.add_argument(_flag(f.name), dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=_help(f))
            elif typing.get_origin(tp) is list:
                g.add_argument(_flag(f.name), dest=dest, type=_list_parser(typing.get_args(tp)[0],
                                                                            dest == "train.seeds"),
                               default=None, metavar="A,B,...", help=_help(f))
            else:
                g.add_argument(_flag(f.name), dest=dest, type=tp, default=None, help=_help(f),
                               metavar={int: "N", float: "X", str: "S"}[tp])
    return ap


def config_from_args(argv: list[str]) -> tuple[str, RunConfig]:
    cmd = "run"
    if argv and argv[0] in COMMANDS:
        cmd, argv = argv[0], argv[1:]
    workload = COMMANDS[cmd][0]
    args = build_parser(cmd).parse_args(argv)
    cfg = RunConfig(workload=workload)
    preset = load_preset(args.preset or "default", workload)
    if cmd != "run" and preset.get("workload", workload) != workload:
        raise ValueError(f"--preset {args.preset!r} is a {preset['workload']} preset; `lengen-train {cmd}` runs the "
                         f"{workload} workload")
    apply_overrides(cfg, preset, source=f"preset {args.preset or 'default'!r}")
    over: dict = {}
    for k, v in vars(args).items():
        if v is None or k in ("preset", "task", "base", "extra_arms"):
            continue
        if "." in k:
            sec, name = k.split(".", 1)
            over.setdefault(sec, {})[name] = v
        else:
            over[k] = v
    if over.get("train", {}).get("seeds") == "auto":
        del over["train"]["seeds"]
        over["train"]["seeds_auto"] = True
    apply_overrides(cfg, over, source="command line")
    args.arms_given = "arms" in over.get("train", {})
    if args.task and cmd != "compare":
        raise ValueError("--task belongs to `lengen-train compare`; use --tasks for a run")
    COMMANDS[cmd][2](cfg, args)
    if args.extra_arms:
        cfg.train.arms = list(cfg.train.arms) + list(args.extra_arms)
    return cmd, cfg


def plan_printing_warnings(cfg: RunConfig, command: str, mode: str):
    """make_plan, printing its warnings (too few seeds, short lengths) as they come, before any error."""
    from .plan import make_plan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return make_plan(cfg, command, mode)
        finally:
            for w in caught:
                print(f"lengen-train: warning: {w.message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["replicate"]:
        from .replicate import main as replicate_main
        return replicate_main(argv[1:])
    try:
        cmd, cfg = config_from_args(argv)
        plan = plan_printing_warnings(cfg, "lengen-train " + " ".join(argv) if argv else "lengen-train", cmd)
        spawn = cfg.dist.nproc > 1 and not distributed.under_launcher()
        ctx = None if spawn else distributed.init_distributed(cfg.dist.dist_backend, cfg.dist.parallel,
                                                                   cfg.dist.device)
    except (ValueError, TypeError) as e:
        print(f"lengen-train: error: {e}", file=sys.stderr)
        return 2
    if spawn:  # dist: lengen-train --nproc N relaunches itself as N torchrun workers
        from .launch import launch
        return launch(cfg.dist.nproc, argv)
    try:  # dist: every rank trains and evaluates; rank 0 alone prints and writes
        return run_plan(plan, ctx.is_main)
    except (ValueError, OSError) as e:
        print(f"lengen-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


def run_plan(plan, is_main: bool = True) -> int:
    from . import engine
    from .report import write_reports
    if not is_main:
        engine.run(plan, log=lambda *a: None)
        return 0
    cfg = plan.cfg
    print(f"lengen-train {plan.mode} ({cfg.workload}): arms {[a.name for a in plan.arms]}, seeds "
          f"{'auto from ' if cfg.train.seeds_auto else ''}{cfg.train.seeds}, budget {plan.budget.amount:.4g} "
          f"{plan.budget.kind} per arm, {plan.workers} worker(s) -> {cfg.out}", flush=True)
    report = engine.run(plan)
    paths = write_reports(report, Path(cfg.out))
    print(paths["table"])
    print(f"\nreport: {paths['md']}\njson:   {paths['json']}\nplots:  {', '.join(str(p) for p in paths['plots'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
