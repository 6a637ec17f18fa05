"""What did the run measure, which claims hold, and how small an effect could it have seen? report.json,
report.md and PNG plots, with one section per workload (report_tasks.py, report_corpus.py).

Every comparison is paired over seeds. A verdict says "holds" only when the 95% interval of the paired difference
excludes zero in the claimed direction, "opposite" when it excludes zero the other way, and "inconclusive"
otherwise, always with the numbers and the minimum detectable effect (MDE, 80% power, from the observed seed
variance): an inconclusive verdict with an MDE larger than any plausible effect says the run was too small, not
that the arms are equal. Headline comparisons are few and fixed in advance; per-cell ones are secondary.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..fsio import atomic_write, atomic_write_text
from . import report_corpus, report_tasks
from .runinfo import render_header
from .stats import fmt_ci, fmt_mde, seeds_for_mde

SECTIONS = {"tasks": report_tasks, "corpus": report_corpus}


def finish(rep: dict) -> dict:
    """Add the comparisons (headline and secondary) and the power summary to a report dict; returns it."""
    mod = SECTIONS[rep["workload"]]
    rep["comparisons"] = mod.comparisons(rep)
    target = rep["config"]["train"]["mde"]
    prim = [c for c in headline(rep) if c["primary"]]
    needed = [seeds_for_mde(c["diff"]["sd"], target) for c in prim] if target > 0 else []
    rep["power"] = {"target_mde": target or None, "unit": mod.__name__, "seeds": len(rep["seeds"]["list"]),
                    "largest_primary_mde": max((c["diff"]["mde"] for c in prim), default=math.inf),
                    "seeds_needed": (None if any(n is None for n in needed) else max(needed)) if needed else None}
    return rep


def headline(rep: dict) -> list[dict]:
    return [c for c in rep["comparisons"] if c["group"] == "headline"]


def _fmt_diff(c) -> str:
    d = c["diff"]
    if c["unit"] == "log ratio" and d["n"]:
        ratio = f"×{math.exp(d['mean']):.2f}"
        if not math.isnan(d["lo"]):
            ratio += f" [×{math.exp(d['lo']):.2f}, ×{math.exp(d['hi']):.2f}]"
        return ratio
    return fmt_ci(d, 3 if c["unit"] == "nats" else 2, signed=True)


def _fmt_mde(c) -> str:
    m = c["diff"]["mde"]
    if c["unit"] == "log ratio" and not (math.isinf(m) or math.isnan(m)):
        return f"×{math.exp(m):.2f}"
    return fmt_mde(c["diff"], 3 if c["unit"] == "nats" else 2)


def headline_table(rep: dict) -> str:
    rows = headline(rep)
    if not rows:
        return "(no comparison: a single arm)"
    lines = ["| a vs b | metric | selection | a | b | a − b [95% CI] | MDE (80% power) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        am, bm = c["a_mean"]["mean"], c["b_mean"]["mean"]
        fmt = (lambda x: f"{math.exp(x):,.3g}" if c["unit"] == "log ratio" else f"{x:.3f}")
        lines.append(f"| {c['a']} vs {c['b']} | {c['metric']} ({c['better']} is better) | {c['selection']} | "
                     f"{fmt(am) if not math.isnan(am) else 'n/a'} | {fmt(bm) if not math.isnan(bm) else 'n/a'} | "
                     f"{_fmt_diff(c)} | {_fmt_mde(c)} | **{c['verdict']}** |")
    return "\n".join(lines)


def power_lines(rep: dict) -> list[str]:
    p, s = rep["power"], rep["seeds"]
    out = [f"- {p['seeds']} seeds {s['list']}; the MDE is the smallest true difference this many seeds detect with "
           "80% power at the 5% level, from the observed spread of the per-seed differences (paired t: "
           "(t_0.975 + t_0.80) × sd / √n)."]
    if s.get("auto"):
        out.append(f"- Seeds auto: target MDE {p['target_mde']:g}; {len(s['rounds'])} round(s); stopped because "
                   f"{s['stopped']}.")
    elif p["target_mde"]:
        out.append(f"- Target MDE {p['target_mde']:g}: the primary comparisons need "
                   f"{p['seeds_needed'] or 'more than 1000'} seeds at the observed spread.")
    return out


def markdown(rep: dict) -> str:
    c, m = rep["config"], rep["machine"]
    mc, tr = c["model"], c["train"]
    params = rep["runs"][0]["num_params"] if rep["runs"] else 0
    load = f"{m['load_avg_1min_start']:.1f} at the start, " if m.get("load_avg_1min_start") is not None else ""
    md = ["# lengen-train report\n", render_header(rep["run"]),
          f"Measured on {m['cpu']} ({m['cores']} cores, ISA {m.get('cpu_isa')}, {m['threads']} torch threads per "
          f"worker, {rep['derived']['workers']} worker(s), 1-min load average {load}{m['load_avg_1min']:.1f} at the "
          f"end), torch {m['torch']}, finished {m['date']}; wall time {rep['wall_seconds']:.0f} s. Command: "
          f"`{rep['command']}`.\n",
          f"Workload: **{rep['workload']}**. Model: {mc['arch']}, {mc['n_layers']} layers, d={mc['d_model']}, "
          f"{mc['n_heads']} heads, {mc['mlp']} MLP, {params:,} parameters, positions {mc['pos_encoding']}"
          + (f" with random offsets in [0, {tr['pos_offset_max']}]" if tr["pos_offset_max"] else "") + f"; rows of "
          f"{rep['derived']['seq_len']} tokens, {tr['tokens_per_batch']} token slots per micro-batch x "
          f"{tr['grad_accum']}. Budget: {rep['derived']['budget']:.4g} {rep['derived']['budget_kind']} per arm and "
          f"seed (step cap {rep['derived']['max_steps']}). Every number is a mean with its 95% t-interval over "
          "seeds; scored at the final checkpoint" + (" and at the best in-distribution validation checkpoint."
                                                     if rep["workload"] == "tasks" else ".") + "\n"]
    if rep["warnings"] or rep.get("notes"):
        md += ["Warnings and notes:\n"] + [f"- {w}" for w in rep["warnings"] + rep.get("notes", [])] + [""]
    md += ["## Headline comparisons\n", headline_table(rep), "", *power_lines(rep), "", "## Budgets\n", budget_table(rep),
           ""]
    md += SECTIONS[rep["workload"]].sections(rep)
    md += ["## Runs\n", "| arm | seed | steps | budget met | best-ID step | tokens/s | CPU s |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['accounting']['budget_met']} | {r['best_id_step']} | "
           f"{r['tokens_per_second']:,.0f} | {r['cpu_seconds']:.0f} |" for r in rep["runs"]]
    return "\n".join(md) + "\n"


def budget_table(rep) -> str:
    lines = ["| arm | budget met | steps | supervised tokens | tokens seen | padding | FLOPs | epochs | "
             "documents seen | document pieces cut | documents cut |", "|---|" + "---|" * 10]
    for a in rep["arms"]:
        acc = [r["accounting"] for r in rep["runs"] if r["arm"] == a["name"]]
        if not acc:
            continue
        met = sum(x["budget_met"] for x in acc)

        def mean(key, f="{:,.0f}"):
            return f.format(sum(x[key] for x in acc) / len(acc))
        lines.append(f"| {a['name']} | {met}/{len(acc)}{'' if met == len(acc) else ' **NOT MET**'} | {mean('steps')} | "
                     f"{mean('supervised')} | {mean('tokens')} | {mean('padding')} "
                     f"({100 * sum(x['padding_frac'] for x in acc) / len(acc):.1f}%) | {mean('flops', '{:.3g}')} | "
                     f"{mean('epochs', '{:.2f}')} | {mean('documents_seen')} of {mean('documents')} | "
                     f"{mean('pieces_cut')} of {mean('pieces')} | {mean('documents_cut')} |")
    lines.append("\nMeans over seeds. Padding = empty slots at row ends plus PAD tokens of fit=pad; it counts against "
                 "the budget (a padded arm needs more steps for the same supervised tokens).")
    return "\n".join(lines)


def summary_table(rep) -> str:
    """The short table printed at the end of a run: the arms, then the headline verdicts."""
    lines = SECTIONS[rep["workload"]].summary_rows(rep)
    lines += ["", *[f"{c['a']} vs {c['b']}, {c['metric']} ({c['selection']}): {_fmt_diff(c)}, MDE {_fmt_mde(c)} -> "
                    f"{c['verdict']}" for c in headline(rep)]]
    return "\n".join(lines)


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def plots(rep: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    return SECTIONS[rep["workload"]].plots(rep, out, _save_fig)


def write_reports(rep: dict, out: Path) -> dict:
    """report.json, report.md and the plots, each written atomically (a reader never sees half a file)."""
    out.mkdir(exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(rep, indent=1, default=float))
    atomic_write_text(out / "report.md", markdown(rep))
    return {"json": out / "report.json", "md": out / "report.md", "plots": plots(rep, out),
            "table": summary_table(rep)}
