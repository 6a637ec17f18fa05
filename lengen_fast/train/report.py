"""report.json, report.md (tables + verdicts computed from the numbers) and PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .tasks import RETRIEVAL, SYNTHESIS


def _ms(xs, digits: int = 2) -> str:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{np.mean(xs):.{digits}f} ± {np.std(xs):.{digits}f}"


def _sci(xs) -> str:
    xs = [x for x in xs if x is not None]
    return f"{np.mean(xs):.2e}" if xs else "not reached"


def _lengths(report) -> list[str]:
    return [str(n) for n in report["derived"]["eval_lengths"]]


def _mult(report, n: str) -> str:
    return f"{int(n) / report['config']['task']['train_max_len']:g}×"


def main_table(report: dict) -> str:
    """strategy | token efficiency | length generalization | overfitting risk, per task."""
    lens = _lengths(report)
    runs = report["runs"]
    head = ("| task | strategy | tokens/s | FLOPs to target | " +
            " | ".join(f"acc {_mult(report, n)} (n={n})" for n in lens) +
            " | gap ID−OOD | critical len | overfitting risk | stopped |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    tasks = sorted({r["task"] for r in report["results"]}, key=lambda t: [r["task"] for r in report["results"]].index(t))
    for task in tasks:
        for strategy in report["config"]["train"]["strategies"]:
            rs = [r for r in report["results"] if r["task"] == task and r["strategy"] == strategy]
            rn = [r for r in runs if r["strategy"] == strategy]
            if not rs:
                continue
            stops = [str(r["early_stopped_at"]) if r["early_stopped_at"] is not None else "—" for r in rs]
            lines.append(
                f"| {task} | {strategy} | {np.mean([r['tokens_per_second'] for r in rs]):,.0f} | "
                f"{_sci([r['flops_to_target'] for r in rs])} | " +
                " | ".join(_ms([r["accuracy"].get(n) for r in rs]) for n in lens) +
                f" | {_ms([r['generalization_gap'] for r in rs])} | {_ms([r['critical_length'] for r in rs], 0)} | "
                f"{_ms([100 * r['max_ood_drop_after_best'] for r in rn])}% | {', '.join(stops)} |")
    return "\n".join(lines)


def _acc(report, strategy, task, n, seed=None) -> list[float]:
    return [r["accuracy"][n] for r in report["results"]
            if r["strategy"] == strategy and r["task"] == task and n in r["accuracy"]
            and (seed is None or r["seed"] == seed)]


def verdicts(report: dict) -> list[str]:
    """Each literature claim checked against the measured numbers, seed by seed."""
    cfg, out = report["config"], []
    strategies = cfg["train"]["strategies"]
    L = cfg["task"]["train_max_len"]
    lens = _lengths(report)
    ood = [n for n in lens if int(n) > L]
    idn = [n for n in lens if int(n) <= L]
    tasks = [t for t in cfg["task"]["tasks"] if t != "text"]
    seeds = cfg["train"]["seeds"]

    def compare(a, b, claim):
        if a not in strategies or b not in strategies or not ood:
            return
        for task in tasks:
            for n in ood:
                per = [(np.mean(_acc(report, a, task, n, s)), np.mean(_acc(report, b, task, n, s))) for s in seeds]
                wins = sum(x > y for x, y in per)
                losses = sum(x < y for x, y in per)
                ma, mb = np.mean(_acc(report, a, task, n)), np.mean(_acc(report, b, task, n))
                if wins == len(seeds):
                    word = "holds"
                elif losses == len(seeds):
                    word = "does not hold (the opposite was measured)"
                elif wins == losses == 0:
                    word = "no difference measured"
                else:
                    word = f"mixed: {a} higher for {wins}, lower for {losses} of {len(seeds)} seeds"
                out.append(f"- {claim} — {task} at n={n} ({_mult(report, n)}): {a} {ma:.2f} vs {b} {mb:.2f}: "
                           f"**{word}**.")

    if "concat_chunk" in strategies and idn and ood:
        for task in tasks:
            i, o = np.mean(_acc(report, "concat_chunk", task, idn[-1])), np.mean(
                [np.mean(_acc(report, "concat_chunk", task, n)) for n in ood])
            if i < cfg["train"]["critical_threshold"]:
                out.append(f"- concat_chunk collapses beyond the training length — {task}: it did not learn the "
                           f"task in distribution (ID {i:.2f}), so this run cannot test the claim.")
            else:
                out.append(f"- concat_chunk collapses beyond the training length — {task}: ID {i:.2f}, mean OOD "
                           f"{o:.2f}: **{'holds' if o < 0.5 * i else 'does not hold'}** (collapse = OOD below half of ID).")
    compare("vsl", "concat_chunk", "vsl generalizes further than concat_chunk")
    compare("pack_masked", "pack_naive", "masked packing beats naive packing out of distribution")
    for b in report["boundary"]:
        e, nv, mk = b["edges"], b["pack_naive"], b["pack_masked"]
        near = [i for i in range(len(e) - 1) if e[i] < 8 and not math.isnan(nv[i]) and not math.isnan(mk[i])]
        if near:
            d = np.mean([nv[i] - mk[i] for i in near])
            tot = np.nanmean(nv) - np.nanmean(mk)
            out.append(f"- naive packing has higher loss near document boundaries (distance < 8), seed {b['seed']}: "
                       f"naive − masked = {d:+.3f} nats: **{'holds' if d > 0 else 'does not hold'}**; "
                       f"over all distances {tot:+.3f} nats.")
    stopped = [r for r in report["runs"] if r["early_stopped_at"] is not None]
    out.append(f"- OOD early stopping fired in {len(stopped)} of {len(report['runs'])} runs" +
               ("".join(f"; {r['strategy']} s{r['seed']}: {r['stop_reason']}" for r in stopped)) + ".")
    t = cfg["task"]
    if not (t["scratchpad"] or t["index_hints"]):
        out.append("- scratchpad / index hints: not tested in this run (enable with --scratchpad / --index-hints "
                   "and compare against a run without them).")
    else:
        out.append(f"- scratchpad={t['scratchpad']}, index_hints={t['index_hints']} in this run; compare against a "
                   "run without them to test the claim.")
    return out


def retrieval_synthesis(report: dict) -> str:
    lens = _lengths(report)
    lines = ["| kind | strategy | " + " | ".join(f"{_mult(report, n)}" for n in lens) + " |",
             "|---|---|" + "---|" * len(lens)]
    for kind, tasks in (("retrieval", RETRIEVAL), ("synthesis", SYNTHESIS)):
        present = [t for t in tasks if t in report["config"]["task"]["tasks"]]
        name = f"{kind} ({', '.join(present or tasks)})"
        if not present:
            lines.append(f"| {name} | (no such task in this run) |" + " |" * len(lens))
            continue
        for s in report["config"]["train"]["strategies"]:
            lines.append(f"| {name} | {s} | " + " | ".join(
                _ms([np.mean([a for t in present for a in _acc(report, s, t, n, seed)])
                     for seed in report["config"]["train"]["seeds"]]) for n in lens) + " |")
    return "\n".join(lines)


def extension_table(report: dict) -> str:
    ext = report["extension"]
    if not ext:
        return "(staged context extension disabled)"
    lens = [n for n in _lengths(report) if int(n) > report["config"]["task"]["train_max_len"]]
    tasks = sorted({t for a in ext for t in a["acc"]})
    lines = ["| task | scaling | arm | fine-tune steps (fraction of pretraining) | " +
             " | ".join(f"acc {_mult(report, n)}" for n in lens) + " |", "|---|---|---|---|" + "---|" * len(lens)]
    keys = []
    for a in ext:
        if (a["scaling"], a["arm"]) not in keys:
            keys.append((a["scaling"], a["arm"]))
    steps = report["config"]["train"]["steps"]
    for task in tasks:
        for sc, arm in keys:
            arms = [a for a in ext if a["scaling"] == sc and a["arm"] == arm]
            ft = arms[0]["finetune_steps"]
            lines.append(f"| {task} | {sc} | {arm} | {ft} ({ft / steps:.0%}) | " +
                         " | ".join(_ms([a["acc"][task].get(n) for a in arms]) for n in lens) + " |")
    return "\n".join(lines)


def _boundary_means(report: dict):
    """Bucket edges and the per-strategy mean over seeds, keeping buckets that hold any token."""
    e = report["boundary"][0]["edges"]
    vals = {s: np.array([b[s] for b in report["boundary"]], dtype=float) for s in ("pack_naive", "pack_masked")}
    keep = [i for i in range(len(e) - 1) if all(not np.isnan(v[:, i]).all() for v in vals.values())]
    means = {s: [float(np.nanmean(v[:, i])) for i in keep] for s, v in vals.items()}
    overall = {s: float(np.nanmean(v)) for s, v in vals.items()}
    return e, keep, means, overall


def boundary_table(report: dict) -> str:
    if not report["boundary"]:
        return "(needs both pack_naive and pack_masked)"
    e, keep, means, overall = _boundary_means(report)
    cols = [f"{e[i]}" if e[i + 1] - e[i] == 1 else f"{e[i]}–{e[i + 1] - 1}" for i in keep]
    lines = ["| strategy | " + " | ".join(cols) + " | mean over buckets |", "|---|" + "---|" * (len(cols) + 1)]
    for s, m in means.items():
        lines.append(f"| {s} | " + " | ".join(f"{v:.3f}" for v in m) + f" | {overall[s]:.3f} |")
    return "\n".join(lines)


def text_table(report: dict) -> str:
    edges = report["derived"]["text_edges"]
    if not edges:
        return ""
    lines = ["| strategy | " + " | ".join(f"pos {a}–{b - 1}" for a, b in zip(edges[:-1], edges[1:])) + " |",
             "|---|" + "---|" * (len(edges) - 1)]
    for s in report["config"]["train"]["strategies"]:
        vals = [r["test"]["text_loss"] for r in report["runs"] if r["strategy"] == s and "text_loss" in r["test"]]
        if vals:
            lines.append(f"| {s} | " + " | ".join(_ms(col) for col in zip(*vals)) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    mc, tc, tr = c["model"], c["task"], c["train"]
    runs = report["runs"]
    params = runs[0]["num_params"] if runs else 0
    md = [f"# lengen-train report\n",
          f"Measured on {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads), torch {m['torch']}, "
          f"{m['date']}; wall time {report['wall_seconds']:.0f} s.\n",
          f"Model: {mc['n_layers']} layers, d={mc['d_model']}, {mc['n_heads']} heads, {mc['mlp']} MLP, "
          f"{params:,} parameters, positions: {mc['pos_encoding']}"
          + (f" with random offsets in [0, {tr['pos_offset_max']}]" if tr["pos_offset_max"] else "") + ". "
          f"Tasks: {', '.join(tc['tasks'])}; training sizes n in [{tc['train_min_len']}, {tc['train_max_len']}] "
          f"(documents up to {report['derived']['doc_max_tokens']} tokens, rows of {report['derived']['seq_len']}). "
          f"Each strategy: {tr['steps']} steps × {tr['tokens_per_batch']} tokens per batch, seeds {tr['seeds']}. "
          f"Accuracy is exact match on {tc['eval_examples']} fresh test examples per task and length, scored with "
          "the best-OOD checkpoint (selected on separate validation examples).\n",
          "## Strategies: token efficiency, length generalization, overfitting risk\n",
          "Mean ± std over seeds. FLOPs to target: training FLOPs at the first validation where the task's "
          f"in-distribution accuracy reached {tr['target_acc']}. Overfitting risk: the largest relative drop of the "
          "validation OOD score (chance-corrected accuracy beyond the training length, the early-stopping metric) "
          "after its best step. Critical length: the longest evaluated n with accuracy ≥ "
          f"{tr['critical_threshold']}.\n", main_table(report), "",
          "## What the measurements say\n", *verdicts(report), "",
          "## Retrieval vs synthesis\n",
          "Passkey retrieval only needs to find one span; synthesis tasks must integrate the whole input. "
          "A passkey score is not evidence of long-context understanding.\n", retrieval_synthesis(report), "",
          "## Staged context extension\n",
          f"A rope model ({c['extension']['ext_strategy']}) pretrained at n ≤ {tc['train_max_len']}, then: no extension; "
          f"RoPE scaling ×{c['extension']['factor']} at evaluation only; scaling plus a brief fine-tune at "
          f"n ≤ {round(c['extension']['factor'] * tc['train_max_len'])}.\n", extension_table(report), "",
          "## Naive vs masked packing: loss by distance from the document start\n",
          "Mean next-token loss on scored tokens of held-out documents packed into rows, bucketed by the "
          "token's distance from its document's first token.\n", boundary_table(report), ""]
    if report["derived"]["text_edges"]:
        md += ["## Natural text: loss by position\n", text_table(report), ""]
    md += ["## Runs\n", "| strategy | seed | steps | best step | stopped | why |", "|---|---|---|---|---|---|"]
    md += [f"| {r['strategy']} | {r['seed']} | {r['steps']} | {r['best_step']} | {r['early_stopped_at'] or '—'} | "
           f"{r['stop_reason']} |" for r in runs]
    md.append("\nPlots: accuracy_vs_length.png, curves.png, boundary.png.\n")
    return "\n".join(md)


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cfg = report["config"]
    strategies, L = cfg["train"]["strategies"], cfg["task"]["train_max_len"]
    tasks = [t for t in cfg["task"]["tasks"] if t != "text"]
    lens = _lengths(report)
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for i, s in enumerate(strategies):  # small x shifts and distinct markers keep equal curves visible
                acc = [_acc(report, s, task, n) for n in lens]
                ax.errorbar([int(n) * (1 + 0.02 * (i - 1.5)) for n in lens], [np.mean(a) for a in acc],
                            yerr=[np.std(a) for a in acc], marker="osD^v"[i % 5], ls=["-", "--", "-.", ":"][i % 4],
                            capsize=3, label=s)
            ax.axvline(L, color="gray", ls=":", lw=1)
            ax.set(title=task, xlabel="problem size n (dotted: max training size)", ylabel="exact match",
                   ylim=(-0.03, 1.03), xscale="log")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks([int(n) for n in lens], lens)
        axes[0][0].legend(fontsize=8, loc="best")
        fig.tight_layout()
        paths.append(out / "accuracy_vs_length.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    runs = report["runs"]
    fig, axes = plt.subplots(1, len(strategies), figsize=(4 * len(strategies), 3.2), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], strategies):
        for r in (r for r in runs if r["strategy"] == s):
            steps = [h["step"] for h in r["history"]]
            ax.plot(steps, [h["id"] for h in r["history"]], color="C0", label=f"ID s{r['seed']}")
            ax.plot(steps, [h["ood"] for h in r["history"]], color="C3", label=f"OOD s{r['seed']}")
            ax.plot(steps, [h["ood_score"] for h in r["history"]], color="C3", ls=":",
                    label=f"OOD score (stop metric) s{r['seed']}")
            ax.axvline(r["best_step"], color="C2", ls="--", lw=1)
            if r["early_stopped_at"] is not None:
                ax.axvline(r["early_stopped_at"], color="k", lw=1.5)
                ax.annotate("stop", (r["early_stopped_at"], 0.95), fontsize=8)
        ax.set(title=s, xlabel="step", ylabel="validation score (green dashed: best)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if report["boundary"]:
        e, keep, means, _ = _boundary_means(report)
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for s, m in means.items():
            ax.plot([e[i] for i in keep], m, marker="o", label=s)
        ax.set(xscale="symlog", xlabel="distance from document start (bucket start)", ylabel="loss (nats)")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "boundary.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_reports(report: dict, out: Path) -> dict:
    out.mkdir(exist_ok=True)
    for r in report["results"]:
        run = next(x for x in report["runs"] if x["strategy"] == r["strategy"] and x["seed"] == r["seed"])
        r["max_ood_drop_after_best"] = run["max_ood_drop_after_best"]
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    md = markdown(report)
    (out / "report.md").write_text(md)
    return {"json": out / "report.json", "md": out / "report.md", "plots": plots(report, out),
            "table": main_table(report)}
