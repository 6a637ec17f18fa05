"""lengen-train: which command line maps onto which config? Argument parsing only: the command line ->
RunConfig (config.py) -> Plan (plan.py, validated once) -> experiment.run -> report.

    lengen-train                              the default comparison: 4 arms x 3 seeds (<= 10 min, 2-core CPU)
    lengen-train --preset quick               a < 1 min smoke run
    lengen-train compare --task parity        the four preset arms side by side on one task
    lengen-train ablate --base vsl            one factor at a time around an arm, one table of effects
    lengen-train --arms vsl --arm 'mine:packing=bfd,attention=document,positions=row'

Every config field is a flag (``--d-model 128``, ``--no-tie-embeddings``, ``--tasks a,b``). An arm is a preset
(concat_chunk, pack_naive, pack_masked, vsl) or ``name:knob=value,...`` with knobs packing (concat | bfd |
decompose), attention (row | document), positions (row | document), curriculum, cycles, fit (none | pad)
and ``base=<preset>`` for the knobs not given.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings
from pathlib import Path

from . import distributed
from .config import ARM_PRESETS, SECTIONS, RunConfig, apply_overrides, load_preset
from .tasks import TASKS


# ---------------------------------------------------------------------------------- subcommands
def _compare(cfg: RunConfig, args) -> None:
    task = args.task or cfg.task.tasks[0]
    if task not in TASKS:
        raise ValueError(f"--task: unknown task {task!r}; choose from {TASKS}")
    cfg.task.tasks = [task]
    if not args.arms_given:
        cfg.train.arms = list(ARM_PRESETS)


def _ablate(cfg: RunConfig, args) -> None:
    from .experiment import ablation_specs
    cfg.train.arms = ablation_specs(args.base)


# name -> (help, hook that adjusts the config); another mode adds itself here (COMMANDS["lm"] = ...)
COMMANDS: dict[str, tuple[str, typing.Callable]] = {
    "run": ("train and compare the arms (the default)", lambda cfg, args: None),
    "compare": ("the four preset arms on one task (--task)", _compare),
    "ablate": ("one-factor-at-a-time arms around --base, one table of effects", _ablate),
}


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
                    help="resume every run found under --out from its last checkpoint (an error if there is none)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    ap.add_argument("--task", default=None, help="compare: the one task to run")
    ap.add_argument("--base", default="vsl", help="ablate: the base arm (a preset or a name:knob=v,... spec)")
    ap.add_argument("--arm", dest="extra_arms", action="append", default=None, metavar="NAME:KNOB=V,...",
                    help="add an arm (repeatable); see the knobs above")
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
    if argv and argv[0] in COMMANDS:
        cmd, argv = argv[0], argv[1:]
    args = build_parser().parse_args(argv)
    cfg = RunConfig()
    if args.preset:
        apply_overrides(cfg, load_preset(args.preset), source=f"preset {args.preset!r}")
    over: dict = {}
    for k, v in vars(args).items():
        if v is None or k in ("preset", "task", "base", "extra_arms"):
            continue
        if "." in k:
            sec, name = k.split(".", 1)
            over.setdefault(sec, {})[name] = v
        else:
            over[k] = v
    apply_overrides(cfg, over, source="command line")
    args.arms_given = "arms" in over.get("train", {})
    if args.task and cmd != "compare":
        raise ValueError("--task belongs to `lengen-train compare`; use --tasks for a run")
    COMMANDS[cmd][1](cfg, args)
    if args.extra_arms:
        cfg.train.arms = list(cfg.train.arms) + list(args.extra_arms)
    return cmd, cfg


def main(argv: list[str] | None = None) -> int:
    from .plan import make_plan

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm"]:  # the language-model mode has its own config and driver (lm.py)
        from . import lm
        return lm.main(argv[1:])
    try:
        cmd, cfg = config_from_args(argv)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                plan = make_plan(cfg, "lengen-train " + " ".join(argv) if argv else "lengen-train")
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
        return _main(cmd, plan, ctx.is_main, argv)
    finally:
        distributed.shutdown()


def _main(cmd: str, plan, is_main: bool, argv) -> int:
    from . import experiment
    from .report import write_reports

    if not is_main:
        experiment.run(plan, log=lambda *a: None)
        return 0
    cfg = plan.cfg
    print(f"lengen-train {cmd}: tasks {cfg.task.tasks}, arms {[a.arm.name for a in plan.arms]}, seeds "
          f"{cfg.train.seeds}, budget {plan.budget:.4g} {plan.budget_kind} per arm -> {cfg.out}")
    report = experiment.run(plan)
    if cmd == "ablate":
        report["ablation"] = experiment.ablation_meta(plan)
    paths = write_reports(report, Path(cfg.out))
    print(paths["table"])
    print(f"\nreport: {paths['md']}\njson:   {paths['json']}\nplots:  {', '.join(str(p) for p in paths['plots'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
