"""The tasks workload's part of the report: comparisons (headline and per cell), tables and plots.

Headline (pre-registered): each claim from the literature (CLAIMS) whose two arms ran, on the mean OOD exact
match over tasks and lengths beyond the training length, at the final and at the best-ID checkpoint; when no claim
pair ran, every arm against the baseline. Per (task, length) cells are secondary: with many cells a few
exclusions of zero are expected by chance alone. An ablation's headline is each variant against the base.
"""
from __future__ import annotations

import math

import numpy as np

from .arms import KNOBS
from .stats import compare, fmt_ci, fmt_mde, interval, paired, verdict
from .tasks import RETRIEVAL, SYNTHESIS

SELECTIONS = {"final": "final checkpoint", "best_id": "best in-distribution validation checkpoint"}
# (a, b, claim): claims from the literature, tested wherever both arms ran
CLAIMS = (("pack_masked", "pack_naive", "masked packing generalizes further than naive packing"),
          ("vsl", "pack_masked", "vsl (decomposition + curriculum) generalizes further than masked BFD packing"),
          ("vsl", "concat_chunk", "vsl generalizes further than concat_chunk"),
          ("pack_naive", "concat_chunk", "BFD packing (documents whole) beats concat-and-cut"))
OOD_METRIC = "OOD exact match"


def _L(rep) -> int:
    return rep["config"]["task"]["train_max_len"]


def _lens(rep) -> list[str]:
    return [str(n) for n in rep["derived"]["eval_lengths"]]


def _ood(rep) -> list[str]:
    return [n for n in _lens(rep) if int(n) > _L(rep)]


def _mult(rep, n) -> str:
    return f"{int(n) / _L(rep):g}×"


def _tasks(rep) -> list[str]:
    return [t for t in rep["config"]["task"]["tasks"] if t != "text"]


def _arms(rep) -> list[str]:
    return [a["name"] for a in rep["arms"]]


def _seeds(rep) -> list[int]:
    return rep["seeds"]["list"]


def _run(rep, arm, seed):
    return next((r for r in rep["runs"] if r["arm"] == arm and r["seed"] == seed), None)


def acc(rep, arm, task, n, sel="final") -> list:
    """Per-seed exact match (None where missing), in seed order: paired across arms."""
    out = []
    for s in _seeds(rep):
        r = _run(rep, arm, s)
        t = r and r["test"].get(sel)
        out.append(t["acc"].get(task, {}).get(n) if t else None)
    return out


def ood_acc(rep, arm, sel="final") -> list:
    """Per-seed mean exact match over tasks and lengths beyond train_max_len."""
    out = []
    for s in _seeds(rep):
        r = _run(rep, arm, s)
        t = r and r["test"].get(sel)
        vals = [t["acc"][k][n] for k in _tasks(rep) for n in _ood(rep) if t and k in t["acc"]]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def knob_diff(rep, a, b) -> str:
    ka = next(x for x in rep["arms"] if x["name"] == a)
    kb = next(x for x in rep["arms"] if x["name"] == b)
    return ", ".join(f"{k} {kb[k]}→{ka[k]}" for k in KNOBS if ka[k] != kb[k]) or "nothing (same knobs)"


# ------------------------------------------------------------------------------------------ comparisons
def _cmp(key, group, a, b, sel, xa, xb, metric, note="", primary=False, untestable=False) -> dict:
    c = compare(xa, xb, "higher")
    same = all(p is not None and q is not None and p == q for p, q in zip(xa, xb))
    return {"key": key, "group": group, "primary": primary, "metric": metric, "unit": "exact match", "a": a, "b": b,
            "selection": sel, "better": "higher", "a_mean": interval(xa), "b_mean": interval(xb), "diff": c,
            "verdict": "untestable" if untestable else ("identical" if same else c["verdict"]), "note": note}


def comparisons(rep) -> list[dict]:
    arms = _arms(rep)
    out = []
    ab = rep.get("ablation")
    if ab:
        pairs = [(v["arm"], ab["base"], f"{v['factor']}: {knob_diff(rep, v['arm'], ab['base'])}") for v in ab["variants"]]
    else:
        pairs = [(a, b, c) for a, b, c in CLAIMS if a in arms and b in arms] or \
                [(a, rep["baseline"], f"{a} vs the baseline") for a in arms if a != rep["baseline"]]
    thr = rep["config"]["train"]["critical_threshold"]
    idn = [n for n in _lens(rep) if int(n) <= _L(rep)]
    for a, b, note in pairs:
        for sel in SELECTIONS:
            out.append(_cmp(f"{a} - {b} | {OOD_METRIC} | {sel}", "headline", a, b, sel, ood_acc(rep, a, sel),
                            ood_acc(rep, b, sel), OOD_METRIC, note, primary=True))
            for task in _tasks(rep):
                learned = [np.mean([x for x in acc(rep, arm, task, idn[-1], sel) if x is not None] or [0]) >= thr
                           for arm in (a, b)] if idn else [True, True]
                for n in _ood(rep):
                    out.append(_cmp(f"{a} - {b} | {task}@{n} | {sel}", "cells", a, b, sel, acc(rep, a, task, n, sel),
                                    acc(rep, b, task, n, sel), f"{task} exact match at n={n} ({_mult(rep, n)})",
                                    note, untestable=not any(learned)))
    return out


# ------------------------------------------------------------------------------------------ tables
def arms_table(rep) -> str:
    lines = ["| arm | " + " | ".join(KNOBS) + " | expected steps | steps per epoch |", "|---|" + "---|" * (len(KNOBS) + 2)]
    for a in rep["arms"]:
        lines.append(f"| {a['name']} | " + " | ".join(str(a[k]) for k in KNOBS) +
                     f" | {a['expected_steps']} | {a['steps_per_epoch']} |")
    return "\n".join(lines)


def accuracy_table(rep, sel: str) -> str:
    lens = _lens(rep)
    lines = ["| task | arm | " + " | ".join(f"{_mult(rep, n)} (n={n})" for n in lens) + " |",
             "|---|---|" + "---|" * len(lens)]
    for task in _tasks(rep):
        for name in _arms(rep):
            lines.append(f"| {task} | {name} | " + " | ".join(fmt_ci(interval(acc(rep, name, task, n, sel)))
                                                              for n in lens) + " |")
    return "\n".join(lines)


def cells_table(rep) -> str:
    rows = [c for c in rep["comparisons"] if c["group"] == "cells"]
    if not rows:
        return "(no cells)"
    lines = ["| a vs b | selection | task and length | a | b | a − b [95% CI] | MDE | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {c['a']} vs {c['b']} | {c['selection']} | {c['metric']} | {c['a_mean']['mean']:.2f} | "
                     f"{c['b_mean']['mean']:.2f} | {fmt_ci(c['diff'], signed=True)} | {fmt_mde(c['diff'])} | "
                     f"{c['verdict']} |")
    counts = {v: sum(c["verdict"] == v for c in rows) for v in ("holds", "inconclusive", "opposite", "untestable",
                                                                 "identical")}
    lines.append(f"\n{len(rows)} cells: " + ", ".join(f"{v} {n}" for v, n in counts.items() if n) +
                 ". At a 5% level about 1 in 20 cells excludes zero by chance alone when nothing differs.")
    return "\n".join(lines)


def best_ood_table(rep) -> str:
    lines = ["| arm | rule fired (seeds) | fired at / kept step | OOD acc at best-OOD ckpt | OOD acc at final | "
             "best-OOD − final [95% CI] |", "|---|---|---|---|---|---|"]
    for name in _arms(rep):
        rs = [r for r in rep["runs"] if r["arm"] == name]
        fired = [r for r in rs if r["early_stop"]["fired_at"] is not None]
        steps = ", ".join(f"{r['early_stop']['fired_at'] or '—'}/{r['early_stop']['kept_step']}" for r in rs)
        bo, fi = ood_acc(rep, name, "best_ood"), ood_acc(rep, name, "final")
        lines.append(f"| {name} | {len(fired)}/{len(rs)} | {steps} | {fmt_ci(interval(bo))} | {fmt_ci(interval(fi))} | "
                     f"{fmt_ci(paired(bo, fi), signed=True)} |")
    return "\n".join(lines)


def flops_table(rep) -> str:
    tgt = rep["config"]["train"]["target_acc"]
    lines = [f"| task | arm | FLOPs to ID accuracy ≥ {tgt} (mean over the seeds that reached it) | seeds that reached it |",
             "|---|---|---|---|"]
    for task in _tasks(rep):
        for name in _arms(rep):
            v = [r["flops_to_target"].get(task) for r in rep["runs"] if r["arm"] == name]
            got = [x for x in v if x is not None]
            lines.append((f"| {task} | {name} | {np.mean(got):.3g} |" if got else f"| {task} | {name} | not reached |")
                         + f" {len(got)} of {len(v)} |")
    return "\n".join(lines)


def boundary_section(rep) -> list[str]:
    runs = [r for r in rep["runs"] if r.get("boundary")]
    if not runs:
        return ["(needs `text` among the training tasks: the diagnostic measures natural-text loss)"]
    lines = [f"Held-out natural text (test windows, never used for selection), cut into pieces of "
             f"{min(12, rep['derived']['seq_len'])}–{rep['derived']['seq_len']} tokens (the same for every arm), packed "
             "in order into rows and laid out as each arm trains. Near: distances 1–3 from the document start; far: "
             "≥ 8. Loss in nats, mean [95% CI] over seeds.\n",
             "| arm | attention / positions | near | far | near − far | all tokens |", "|---|---|---|---|---|---|"]
    for name in _arms(rep):
        rs = [_run(rep, name, s) for s in _seeds(rep)]
        if not all(r and r.get("boundary") for r in rs):
            continue
        a = next(x for x in rep["arms"] if x["name"] == name)
        g = {k: interval([r["boundary"][k] for r in rs]) for k in ("near", "far", "near_minus_far", "all")}
        lines.append(f"| {name} | {a['attention']} / {a['positions']} | {fmt_ci(g['near'])} | {fmt_ci(g['far'])} | "
                     f"{fmt_ci(g['near_minus_far'], signed=True)} | {fmt_ci(g['all'])} |")
    if {"pack_naive", "pack_masked"} <= set(_arms(rep)):
        nv = [_run(rep, "pack_naive", s)["boundary"] for s in _seeds(rep)]
        mk = [_run(rep, "pack_masked", s)["boundary"] for s in _seeds(rep)]
        did = paired([x["near_minus_far"] for x in nv], [x["near_minus_far"] for x in mk])
        cost = paired([x["all"] for x in nv], [x["all"] for x in mk])
        lines += ["", f"- Claim: naive packing raises loss near document boundaries — (near − far) of pack_naive minus "
                  f"that of pack_masked = {fmt_ci(did, 3, True)} nats (MDE {fmt_mde(did, 3)}): **{verdict(did)}**.",
                  f"- Its overall cost (all tokens, pack_naive − pack_masked) = {fmt_ci(cost, 3, True)} nats; the claim "
                  f"that naive packing costs loss overall: **{verdict(cost, 'higher')}**."]
    return lines


def retrieval_synthesis(rep) -> str:
    lens = _lens(rep)
    lines = ["| kind | arm | " + " | ".join(f"{_mult(rep, n)}" for n in lens) + " |", "|---|---|" + "---|" * len(lens)]
    for kind, tasks in (("retrieval", RETRIEVAL), ("synthesis", SYNTHESIS)):
        present = [t for t in tasks if t in _tasks(rep)]
        if not present:
            continue
        for name in _arms(rep):
            cells = [fmt_ci(interval([np.mean([x for t in present for x in [acc(rep, name, t, n)[i]] if x is not None]
                                              or [math.nan]) for i in range(len(_seeds(rep)))])) for n in lens]
            lines.append(f"| {kind} ({', '.join(present)}) | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extension_table(rep) -> str:
    ext = rep["extension"]
    if not ext:
        return "(context extension study disabled)"
    lens = _ood(rep)
    keys = list(dict.fromkeys((e["stage"], e["scaling"]) for e in ext))
    lines = ["| task | stage | scaling | " + " | ".join(f"acc {_mult(rep, n)}" for n in lens) + " |",
             "|---|---|---|" + "---|" * len(lens)]
    for task in sorted({t for e in ext for t in e["test"]["acc"]}):
        for stage, sc in keys:
            es = [e for e in ext if e["stage"] == stage and e["scaling"] == sc]
            lines.append(f"| {task} | {stage} | {sc} | " +
                         " | ".join(fmt_ci(interval([e["test"]["acc"][task].get(n) for e in es])) for n in lens) + " |")
    return "\n".join(lines)


def ablation_table(rep) -> str:
    """One row per (variant, selection): the headline comparison against the base, with the knob it changes."""
    ab = rep.get("ablation")
    if not ab:
        return ""
    note = {v["arm"]: v["note"] for v in ab["variants"]}
    lines = ["| factor | change | selection | OOD acc, base | OOD acc, variant | effect (variant − base) [95% CI] | MDE | "
             "verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in (c for c in rep["comparisons"] if c["group"] == "headline"):
        factor = next(v["factor"] for v in ab["variants"] if v["arm"] == c["a"])
        change = knob_diff(rep, c["a"], c["b"]) + (f" ({note[c['a']]})" if note.get(c["a"]) else "")
        lines.append(f"| {factor} | {change} | {c['selection']} | {fmt_ci(c['b_mean'])} | {fmt_ci(c['a_mean'])} | "
                     f"{fmt_ci(c['diff'], signed=True)} | {fmt_mde(c['diff'])} | **{c['verdict']}** |")
    return "\n".join(lines)


def sections(rep) -> list[str]:
    tr = rep["config"]["train"]
    md = []
    if rep.get("ablation"):
        md += ["## Ablation: one factor at a time\n",
               f"Base arm `{rep['ablation']['base']}`; each row changes one knob. \"identical\" means the knob changed "
               "nothing the model sees in any seed (e.g. attention or positions when every row holds one document).\n",
               ablation_table(rep), ""]
    md += ["## Arms: the knobs\n", arms_table(rep), "",
          "## Evaluation sets\n",
          "Test prompts are disjoint from validation prompts (and both from training prompts) at every length, by a "
          "hash split of the prompt.\n"]
    for sel, label in SELECTIONS.items():
        md += [f"## Exact match at the {label}\n", accuracy_table(rep, sel), ""]
    md += ["## Secondary: every (task, length) cell\n", cells_table(rep), "",
           "## Best-OOD selection (the \"stop when OOD drops\" recipe), a separate analysis\n",
           f"The rule watches the validation OOD score (chance-corrected, a task counting 0 until learned in "
           f"distribution) and fires after {tr['early_stop_patience']} validations below best − max("
           f"{100 * tr['early_stop_drop']:.0f}%, {tr['early_stop_z']:g} × the score's sampling sd), never before step "
           f"{tr['early_stop_min_steps']} nor before a task is learned in distribution. "
           + ("Training halted when it fired." if tr["early_stop"] else
              "Training was not halted (equal budgets); the checkpoint the recipe would keep is scored here.") + "\n",
           best_ood_table(rep), "", "## FLOPs to target\n", flops_table(rep), "",
           "## Naive vs masked packing: loss by distance from the document start\n", *boundary_section(rep), "",
           "## Retrieval vs synthesis (final checkpoint)\n", retrieval_synthesis(rep), "",
           "## Context extension (final checkpoint of the extension arm)\n", extension_table(rep), ""]
    return md


def summary_rows(rep) -> list[str]:
    if rep.get("ablation"):
        return [ablation_table(rep)]
    lines = ["| arm | supervised tokens | padding | OOD acc, final | OOD acc, best-ID |", "|---|---|---|---|---|"]
    for name in _arms(rep):
        rs = [r for r in rep["runs"] if r["arm"] == name]
        lines.append(f"| {name} | {np.mean([r['accounting']['supervised'] for r in rs]):,.0f} | "
                     f"{100 * np.mean([r['accounting']['padding_frac'] for r in rs]):.1f}% | "
                     f"{fmt_ci(interval(ood_acc(rep, name)))} | {fmt_ci(interval(ood_acc(rep, name, 'best_id')))} |")
    return lines


def plots(rep: dict, out, save) -> list:
    import matplotlib.pyplot as plt
    paths = []
    tasks, lens = _tasks(rep), _lens(rep)
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for i, name in enumerate(_arms(rep)):
                cis = [interval(acc(rep, name, task, n)) for n in lens]
                err = [0 if math.isnan(c["lo"]) else c["mean"] - c["lo"] for c in cis]
                ax.errorbar([int(n) * (1 + 0.02 * (i - 1.5)) for n in lens], [c["mean"] for c in cis], yerr=err,
                            marker="osD^v"[i % 5], capsize=3, label=name)
            ax.axvline(_L(rep), color="gray", ls=":", lw=1)
            ax.set(title=task, xlabel="problem size n", ylabel="exact match (final, 95% CI)", ylim=(-0.03, 1.03),
                   xscale="log")
            ax.set_xticks([int(n) for n in lens], lens)
            ax.minorticks_off()
        axes[0][0].legend(fontsize=7, loc="best")
        paths.append(save(fig, out / "accuracy_vs_length.png"))
    names = _arms(rep)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        for r in (r for r in rep["runs"] if r["arm"] == name):
            steps = [h["step"] for h in r["history"]]
            ax.plot(steps, [h["id"] for h in r["history"]], color="C0")
            ax.plot(steps, [h["ood"] for h in r["history"]], color="C3")
        ax.set(title=name, xlabel="step", ylabel="validation ID (blue) / OOD (red)")
    paths.append(save(fig, out / "curves.png"))
    return paths
