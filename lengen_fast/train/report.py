"""What did the run measure, and which claims hold? report.json, report.md (tables and verdicts computed
from the numbers: means with 95% t-intervals over seeds, paired differences) and PNG plots.

A verdict says "holds" only when the 95% interval of the paired difference excludes zero in the
claimed direction, "opposite" when it excludes zero the other way, and "inconclusive" otherwise,
always with the numbers. Headline numbers come from the final and the best in-distribution
validation checkpoints; the best-OOD checkpoint (the "stop when OOD drops" recipe) is its own section.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .config import KNOBS
from .evaluate import fmt_ci, mean_ci, paired, verdict
from .runinfo import render_header
from .tasks import RETRIEVAL, SYNTHESIS

SELECTIONS = {"final": "final checkpoint", "best_id": "best in-distribution validation checkpoint"}
# (a, b, claim): claims from the literature, tested wherever both arms ran
CLAIMS = (("pack_masked", "pack_naive", "masked packing generalizes further than naive packing"),
          ("vsl", "pack_masked", "vsl (decomposition + curriculum) generalizes further than masked BFD packing"),
          ("vsl", "concat_chunk", "vsl generalizes further than concat_chunk"),
          ("pack_naive", "concat_chunk", "BFD packing (documents whole) beats concat-and-cut"))


# ------------------------------------------------------------------------------------------ access
def _L(rep) -> int:
    return rep["config"]["task"]["train_max_len"]


def _lens(rep) -> list[str]:
    return [str(n) for n in rep["derived"]["eval_lengths"]]


def _mult(rep, n) -> str:
    return f"{int(n) / _L(rep):g}×"


def _tasks(rep) -> list[str]:
    return [t for t in rep["config"]["task"]["tasks"] if t != "text"]


def _arms(rep) -> list[str]:
    return [a["name"] for a in rep["arms"]]


def _seeds(rep) -> list[int]:
    return rep["config"]["train"]["seeds"]


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
    ood = [n for n in _lens(rep) if int(n) > _L(rep)]
    for s in _seeds(rep):
        r = _run(rep, arm, s)
        t = r and r["test"].get(sel)
        vals = [t["acc"][k][n] for k in _tasks(rep) for n in ood if t and k in t["acc"]]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def knob_diff(rep, a, b) -> str:
    ka = next(x for x in rep["arms"] if x["name"] == a)
    kb = next(x for x in rep["arms"] if x["name"] == b)
    d = [f"{k} {kb[k]}→{ka[k]}" for k in KNOBS if ka[k] != kb[k]]
    return ", ".join(d) or "nothing (same knobs)"


# ------------------------------------------------------------------------------------------ tables
def arms_table(rep) -> str:
    lines = ["| arm | " + " | ".join(KNOBS) + " | lr schedule steps | steps per epoch |",
             "|---|" + "---|" * (len(KNOBS) + 2)]
    for a in rep["arms"]:
        spe = [r["accounting"]["steps_per_epoch"] for r in rep["runs"] if r["arm"] == a["name"]]
        lines.append(f"| {a['name']} | " + " | ".join(str(a[k]) for k in KNOBS) +
                     f" | {a['schedule_steps']} | {np.mean(spe) if spe else a['steps_per_epoch']:.0f} |")
    return "\n".join(lines)


def budget_table(rep) -> str:
    kind = rep["derived"]["budget_kind"]
    lines = ["| arm | budget met | steps | supervised tokens | tokens seen | padding | FLOPs | epochs | "
             "documents seen | document pieces cut | documents cut |", "|---|" + "---|" * 10]
    for name in _arms(rep):
        rs = [r for r in rep["runs"] if r["arm"] == name]
        if not rs:
            continue
        a = [r["accounting"] for r in rs]
        met = sum(x["budget_met"] for x in a)

        def m(key, f="{:,.0f}"):
            return f.format(np.mean([x[key] for x in a]))
        lines.append(f"| {name} | {met}/{len(a)}{'' if met == len(a) else ' **NOT MET**'} | {m('steps')} | "
                     f"{m('supervised')} | {m('tokens')} | {m('padding')} ({100 * np.mean([x['padding_frac'] for x in a]):.1f}%)"
                     f" | {np.mean([x['flops'] for x in a]):.3g} | {m('epochs', '{:.2f}')} | "
                     f"{m('documents_seen')} of {m('documents')} | {m('pieces_cut')} of {m('pieces')} | "
                     f"{m('documents_cut')} |")
    what = ("supervised target tokens" if kind == "supervised" else "FLOPs")
    lines.append(f"\nBudget: {rep['derived']['budget']:.4g} {what} per arm and seed (means over seeds above). "
                 "Padding = empty slots at row ends plus PAD tokens of fit=pad; it counts against the budget "
                 "(a padded arm needs more steps for the same supervised tokens).")
    return "\n".join(lines)


def eval_size_lines(rep) -> list[str]:
    out = []
    for r in rep["runs"][:1]:
        d = r["test"]["final"]["distinct"]
        req = rep["config"]["task"]["eval_examples"]
        for t, byn in d.items():
            for n, c in byn.items():
                if c < req:
                    out.append(f"- {t} at n={n}: {c} distinct test prompts (of {req} requested; seed {r['seed']}); "
                               "the prompt space there holds no more that are disjoint from train and validation.")
    return out or [f"- every test set holds {rep['config']['task']['eval_examples']} distinct prompts."]


def accuracy_table(rep, sel: str) -> str:
    lens = _lens(rep)
    lines = ["| task | arm | " + " | ".join(f"{_mult(rep, n)} (n={n})" for n in lens) + " |",
             "|---|---|" + "---|" * len(lens)]
    for task in _tasks(rep):
        for name in _arms(rep):
            lines.append(f"| {task} | {name} | " + " | ".join(fmt_ci(mean_ci(acc(rep, name, task, n, sel)))
                                                              for n in lens) + " |")
    return "\n".join(lines)


def claim_rows(rep, a, b, claim) -> list[dict]:
    thr = rep["config"]["train"]["critical_threshold"]
    ood = [n for n in _lens(rep) if int(n) > _L(rep)]
    idn = [n for n in _lens(rep) if int(n) <= _L(rep)]
    rows = []
    for sel in SELECTIONS:
        for task in _tasks(rep):
            learned = [np.mean([x for x in acc(rep, arm, task, idn[-1], sel) if x is not None]) >= thr
                       for arm in (a, b)] if idn else [True, True]
            for n in ood:
                xa, xb = acc(rep, a, task, n, sel), acc(rep, b, task, n, sel)
                ci = paired(xa, xb)
                v = verdict(ci) if any(learned) else "untestable"
                rows.append({"claim": claim, "a": a, "b": b, "sel": sel, "task": task, "n": n, "a_mean": mean_ci(xa),
                             "b_mean": mean_ci(xb), "diff": ci, "verdict": v})
    return rows


def claims_table(rep) -> tuple[str, list[dict]]:
    arms = set(_arms(rep))
    rows = [r for a, b, c in CLAIMS if a in arms and b in arms for r in claim_rows(rep, a, b, c)]
    if not rows:
        return "(none of the claimed pairs of arms ran)", []
    lines = ["| a vs b | selection | task | n | a | b | a − b [95% CI] | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['a']} vs {r['b']} | {r['sel']} | {r['task']} | "
                     f"{r['n']} ({_mult(rep, r['n'])}) | {r['a_mean']['mean']:.2f} | {r['b_mean']['mean']:.2f} | "
                     f"{fmt_ci(r['diff'], signed=True)} | **{r['verdict']}** |")
    return "\n".join(lines), rows


def claim_summary(rep, rows) -> list[str]:
    out = []
    for a, b, claim in CLAIMS:
        rs = [r for r in rows if r["a"] == a and r["b"] == b]
        if not rs:
            continue
        counts = {v: sum(r["verdict"] == v for r in rs) for v in ("holds", "inconclusive", "opposite", "untestable")}
        held = [f"{r['task']}@{r['n']} ({r['sel']})" for r in rs if r["verdict"] == "holds"]
        out.append(f"- {claim} ({a} vs {b}; differs in {knob_diff(rep, a, b)}): holds in {counts['holds']} of "
                   f"{len(rs)} (task, length, selection) cells, inconclusive in {counts['inconclusive']}, opposite in "
                   f"{counts['opposite']}, untestable (neither arm learned the task in distribution) in "
                   f"{counts['untestable']}" + (f"; holds at {', '.join(held)}" if held else "") + ".")
    return out


def best_ood_table(rep) -> str:
    lines = ["| arm | rule fired (seeds) | fired at / kept step | OOD acc at best-OOD ckpt | OOD acc at final | "
             "best-OOD − final [95% CI] |", "|---|---|---|---|---|---|"]
    for name in _arms(rep):
        rs = [r for r in rep["runs"] if r["arm"] == name]
        fired = [r for r in rs if r["early_stop"]["fired_at"] is not None]
        steps = ", ".join(f"{r['early_stop']['fired_at'] or '—'}/{r['early_stop']['kept_step']}" for r in rs)
        bo, fi = ood_acc(rep, name, "best_ood"), ood_acc(rep, name, "final")
        lines.append(f"| {name} | {len(fired)}/{len(rs)} | {steps} | {fmt_ci(mean_ci(bo))} | {fmt_ci(mean_ci(fi))} | "
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
            lines.append(f"| {task} | {name} | {np.mean(got):.3g} |" if got else f"| {task} | {name} | not reached |")
            lines[-1] += f" {len(got)} of {len(v)} |"
    return "\n".join(lines)


def boundary_section(rep) -> list[str]:
    runs = [r for r in rep["runs"] if r.get("boundary")]
    if not runs:
        return ["(needs `text` among the training tasks: the diagnostic measures natural-text loss)"]
    b0 = rep["boundary"][0]
    lines = [f"Held-out natural text (test windows of the held-out documents, never used for selection), cut into "
             f"pieces of {min(12, rep['derived']['seq_len'])}–{rep['derived']['seq_len']} tokens ({b0['pieces']} per "
             "seed, the same for every arm), packed in order into rows and laid out as each arm trains (its attention "
             "and positions knobs). Near: distances 1–3 from the document start; far: ≥ 8. Loss in nats, mean "
             "[95% CI] over seeds.\n",
             "| arm | attention / positions | near | far | near − far | all tokens |", "|---|---|---|---|---|---|"]
    for name in _arms(rep):
        rs = [_run(rep, name, s) for s in _seeds(rep)]
        if not all(r and r.get("boundary") for r in rs):
            continue
        a = next(x for x in rep["arms"] if x["name"] == name)
        g = {k: mean_ci([r["boundary"][k] for r in rs]) for k in ("near", "far", "near_minus_far", "all")}
        lines.append(f"| {name} | {a['attention']} / {a['positions']} | {fmt_ci(g['near'])} | {fmt_ci(g['far'])} | "
                     f"{fmt_ci(g['near_minus_far'], signed=True)} | {fmt_ci(g['all'])} |")
    names = set(_arms(rep))
    if {"pack_naive", "pack_masked"} <= names:
        nv = [_run(rep, "pack_naive", s)["boundary"] for s in _seeds(rep)]
        mk = [_run(rep, "pack_masked", s)["boundary"] for s in _seeds(rep)]
        did = paired([x["near_minus_far"] for x in nv], [x["near_minus_far"] for x in mk])
        cost = paired([x["all"] for x in nv], [x["all"] for x in mk])
        lines += ["", f"- Claim: naive packing raises loss near document boundaries — (near − far) of pack_naive minus "
                  f"that of pack_masked = {fmt_ci(did, 3, True)} nats: **{verdict(did)}**.",
                  f"- Its overall cost (all tokens, pack_naive − pack_masked) = {fmt_ci(cost, 3, True)} nats: " +
                  {"holds": "**above zero** (naive packing costs loss overall).",
                   "opposite": "**below zero** (naive packing had the lower loss overall).",
                   "inconclusive": "**inconclusive** (not distinguishable from zero)."}[verdict(cost)]]
    return lines


def retrieval_synthesis(rep) -> str:
    lens = _lens(rep)
    lines = ["| kind | arm | " + " | ".join(f"{_mult(rep, n)}" for n in lens) + " |", "|---|---|" + "---|" * len(lens)]
    for kind, tasks in (("retrieval", RETRIEVAL), ("synthesis", SYNTHESIS)):
        present = [t for t in tasks if t in _tasks(rep)]
        if not present:
            lines.append(f"| {kind} | (no such task in this run) |" + " |" * len(lens))
            continue
        for name in _arms(rep):
            cells = []
            for n in lens:
                per = [np.mean([x for t in present for x in [acc(rep, name, t, n)[i]] if x is not None])
                       for i in range(len(_seeds(rep)))]
                cells.append(fmt_ci(mean_ci(per)))
            lines.append(f"| {kind} ({', '.join(present)}) | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extension_table(rep) -> str:
    ext = rep["extension"]
    if not ext:
        return "(staged context extension disabled)"
    lens = [n for n in _lens(rep) if int(n) > _L(rep)]
    keys = list(dict.fromkeys((a["scaling"], a["arm"]) for a in ext))
    lines = ["| task | scaling | arm | fine-tune steps | " + " | ".join(f"acc {_mult(rep, n)}" for n in lens) + " |",
             "|---|---|---|---|" + "---|" * len(lens)]
    for task in sorted({t for a in ext for t in a["acc"]}):
        for sc, arm in keys:
            arms = [a for a in ext if a["scaling"] == sc and a["arm"] == arm]
            lines.append(f"| {task} | {sc} | {arm} | {arms[0]['finetune_steps']} | " +
                         " | ".join(fmt_ci(mean_ci([a["acc"][task].get(n) for a in arms])) for n in lens) + " |")
    return "\n".join(lines)


def ablation_rows(rep) -> list[dict]:
    ab = rep.get("ablation")
    if not ab:
        return []
    base = ab["base"]
    rows = []
    for v in ab["variants"]:
        for sel in SELECTIONS:
            b, x = ood_acc(rep, base, sel), ood_acc(rep, v["arm"], sel)
            ci = paired(x, b)
            same = all(p is not None and q is not None and p == q for p, q in zip(x, b))
            word = ("no effect: identical in every seed" if same else
                    {"holds": "moves it up", "opposite": "moves it down"}.get(verdict(ci), "inconclusive"))
            rows.append({"factor": v["factor"], "arm": v["arm"], "change": knob_diff(rep, v["arm"], base),
                         "note": v["note"], "sel": sel, "base": mean_ci(b), "variant": mean_ci(x), "effect": ci,
                         "verdict": word})
    return rows


def ablation_table(rep) -> str:
    rows = ablation_rows(rep)
    if not rows:
        return ""
    lines = ["| factor | change | selection | OOD acc, base | OOD acc, variant | effect (variant − base) [95% CI] | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['factor']} | {r['change']}{' (' + r['note'] + ')' if r['note'] else ''} | {r['sel']} | "
                     f"{fmt_ci(r['base'])} | {fmt_ci(r['variant'])} | {fmt_ci(r['effect'], signed=True)} | "
                     f"**{r['verdict']}** |")
    return "\n".join(lines)


def ablation_cells_table(rep) -> str:
    """Per task and OOD length: each variant's paired effect on exact match (uncorrected for the many cells)."""
    ab = rep.get("ablation")
    if not ab:
        return ""
    ood = [n for n in _lens(rep) if int(n) > _L(rep)]
    lines = ["| variant | task | n | effect, final [95% CI] | verdict | effect, best-ID [95% CI] | verdict |",
             "|---|---|---|---|---|---|---|"]
    for v in ab["variants"]:
        for task in _tasks(rep):
            for n in ood:
                cells = []
                for sel in SELECTIONS:
                    x, b = acc(rep, v["arm"], task, n, sel), acc(rep, ab["base"], task, n, sel)
                    ci = paired(x, b)
                    same = all(p is not None and p == q for p, q in zip(x, b))
                    cells += [fmt_ci(ci, signed=True), "identical" if same else verdict(ci)]
                lines.append(f"| {v['arm']} | {task} | {n} ({_mult(rep, n)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rep: dict) -> str:
    c, m, d = rep["config"], rep["machine"], rep["derived"]
    mc, tc, tr = c["model"], c["task"], c["train"]
    params = rep["runs"][0]["num_params"] if rep["runs"] else 0
    ctable, rows = claims_table(rep)
    load = (f"{m['load_avg_1min_start']:.1f} at the start, " if m.get("load_avg_1min_start") is not None else "")
    md = ["# lengen-train report\n"]
    if rep.get("run"):  # reports written before runinfo have no "run"
        md.append(render_header(rep["run"]))
    md += [
           f"Measured on {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads, 1-min load average {load}"
           f"{m['load_avg_1min']:.1f} at the end), torch {m['torch']}, finished {m['date']}; wall time "
           f"{rep['wall_seconds']:.0f} s. Command: `{rep['command']}`.\n",
           f"Model: {mc['n_layers']} layers, d={mc['d_model']}, {mc['n_heads']} heads, {mc['mlp']} MLP, {params:,} "
           f"parameters, positions: {mc['pos_encoding']}"
           + (f" with random offsets in [0, {tr['pos_offset_max']}]" if tr["pos_offset_max"] else "") + ". "
           f"Tasks: {', '.join(tc['tasks'])}; training sizes n in [{tc['train_min_len']}, {tc['train_max_len']}] "
           f"(documents up to {d['doc_max_tokens']} tokens, rows of {d['seq_len']}), {tr['tokens_per_batch']} token "
           f"slots per step. Seeds {_seeds(rep)}: every number is a mean with its 95% t-interval over seeds "
           "(sample std); a verdict holds only when the interval of the paired difference excludes zero.\n"]
    if rep["warnings"]:
        md += ["Warnings:\n"] + [f"- {w}" for w in rep["warnings"]] + [""]
    md += ["## Arms: the knobs\n", arms_table(rep), "",
           "## Budgets\n", budget_table(rep), "",
           "## Evaluation sets\n",
           "Test prompts are disjoint from validation prompts (and both from training prompts) at every length, "
           "by a hash split of the prompt.\n", *eval_size_lines(rep), ""]
    if rep.get("ablation"):
        md += ["## Ablation: one factor at a time\n",
               f"Base arm `{rep['ablation']['base']}`; each row changes one knob. OOD acc: mean exact match over tasks "
               "and lengths beyond the training length. \"Identical in every seed\" means the knob changed nothing "
               "that the model sees (e.g. attention or positions when every row holds one document).\n",
               ablation_table(rep), "",
               "Per task and length (each cell its own paired interval; with this many cells, a few exclusions of zero "
               "are expected by chance alone, so read single cells with care):\n", ablation_cells_table(rep), ""]
    for sel, label in SELECTIONS.items():
        md += [f"## Exact match at the {label}\n", accuracy_table(rep, sel), ""]
    md += ["## Claims\n", *claim_summary(rep, rows), "", ctable, "",
           "## Best-OOD selection (the \"stop when OOD drops\" recipe), a separate analysis\n",
           f"The rule watches the validation OOD score (chance-corrected, a task counting 0 until learned in "
           f"distribution) and fires after {tr['early_stop_patience']} validations below best − max("
           f"{100 * tr['early_stop_drop']:.0f}%, {tr['early_stop_z']:g} × the score's sampling sd), never before step "
           f"{tr['early_stop_min_steps']} nor before a task is learned in distribution. "
           + ("Training halted when it fired." if tr["early_stop"] else
              "Training was not halted (equal budgets); the checkpoint the recipe would keep is scored here.") + "\n",
           best_ood_table(rep), "",
           "## FLOPs to target\n", flops_table(rep), "",
           "## Naive vs masked packing: loss by distance from the document start\n", *boundary_section(rep), "",
           "## Retrieval vs synthesis (final checkpoint)\n",
           "Passkey retrieval only needs to find one span; synthesis tasks must integrate the whole input.\n",
           retrieval_synthesis(rep), "",
           "## Staged context extension (final checkpoint of the extension arm)\n", extension_table(rep), "",
           "## Runs\n", "| arm | seed | steps | budget met | best-ID step | OOD rule fired | tokens/s |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['accounting']['budget_met']} | {r['best_id_step']} | "
           f"{r['early_stop']['fired_at'] or '—'} | {r['tokens_per_second']:,.0f} |" for r in rep["runs"]]
    md.append("\nPlots: accuracy_vs_length.png, curves.png.\n")
    return "\n".join(md)


def summary_table(rep) -> str:
    """The short table printed at the end of a run."""
    if rep.get("ablation"):
        return ablation_table(rep)
    lens = [n for n in _lens(rep) if int(n) > _L(rep)]
    lines = ["| arm | supervised tokens | padding | OOD acc, final | OOD acc, best-ID |", "|---|---|---|---|---|"]
    for name in _arms(rep):
        rs = [r for r in rep["runs"] if r["arm"] == name]
        lines.append(f"| {name} | {np.mean([r['accounting']['supervised'] for r in rs]):,.0f} | "
                     f"{100 * np.mean([r['accounting']['padding_frac'] for r in rs]):.1f}% | "
                     f"{fmt_ci(mean_ci(ood_acc(rep, name)))} | {fmt_ci(mean_ci(ood_acc(rep, name, 'best_id')))} |")
    return "\n".join(lines) + (f"\n(OOD: n in {lens})" if lens else "")


def plots(rep: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks, lens = _tasks(rep), _lens(rep)
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for i, name in enumerate(_arms(rep)):
                cis = [mean_ci(acc(rep, name, task, n)) for n in lens]
                mean = [c["mean"] for c in cis]
                err = [0 if math.isnan(c["lo"]) else c["mean"] - c["lo"] for c in cis]
                ax.errorbar([int(n) * (1 + 0.02 * (i - 1.5)) for n in lens], mean, yerr=err, marker="osD^v"[i % 5],
                            capsize=3, label=name)
            ax.axvline(_L(rep), color="gray", ls=":", lw=1)
            ax.set(title=task, xlabel="problem size n", ylabel="exact match (final, 95% CI)", ylim=(-0.03, 1.03),
                   xscale="log")
            ax.set_xticks([int(n) for n in lens], lens)
            ax.minorticks_off()
        axes[0][0].legend(fontsize=7, loc="best")
        fig.tight_layout()
        paths.append(out / "accuracy_vs_length.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    names = _arms(rep)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        for r in (r for r in rep["runs"] if r["arm"] == name):
            steps = [h["step"] for h in r["history"]]
            ax.plot(steps, [h["id"] for h in r["history"]], color="C0")
            ax.plot(steps, [h["ood"] for h in r["history"]], color="C3")
        ax.set(title=name, xlabel="step", ylabel="validation ID (blue) / OOD (red)")
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def write_reports(rep: dict, out: Path) -> dict:
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=float))
    (out / "report.md").write_text(markdown(rep))
    return {"json": out / "report.json", "md": out / "report.md", "plots": plots(rep, out),
            "table": summary_table(rep)}
