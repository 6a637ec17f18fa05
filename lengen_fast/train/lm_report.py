"""What did a ``lengen-train lm`` run measure? report.json, report.md and the plots.

The markdown leads with the claims (throughput, time to target, final loss) as paired comparisons
against concat-and-chunk with their 95% intervals over seeds, then per-arm budgets and accounting,
loss by position up to 8x the context, the evaluation-time scaling arms and the staged recipe.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .runinfo import render_header


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _ci(t, digits=3, scale=1.0) -> str:
    """(mean, lo, hi) -> 'm [lo, hi]' (or 'm' without an interval)."""
    if t is None:
        return "-"
    m, lo, hi = t
    if m is None or math.isnan(m):
        return "-"
    if math.isnan(lo):
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def _sci(t) -> str:
    if t is None or t[0] is None or math.isnan(t[0]):
        return "-"
    return f"{t[0]:.3g}"


def _bucket_names(edges, L) -> list[str]:
    return [f"[{a / L:g}L, {b / L:g}L)" for a, b in zip(edges[:-1], edges[1:])]


def markdown(report: dict) -> str:
    cfg, mach = report["config"], report["machine"]
    tr, ev = cfg["train"], cfg["eval"]
    L = tr["context"]
    c = report["corpus"]
    lines = ["# lengen-train lm report", ""]
    if report.get("run"):  # reports written before runinfo have no "run"
        lines.append(render_header(report["run"]))
    lines += [
              f"Machine: {mach['cpu']} ({mach['cores']} cores, {mach['threads']} torch threads, 1-min load "
              f"{_f(mach['load_avg_1min'], 1)} at the end), device {mach['device']}"
              f"{' (' + mach['gpu'] + ')' if mach.get('gpu') else ''}; torch {mach['torch']}; {mach['date']}; "
              f"wall time {report['wall_time_s'] / 60:.1f} min.", "",
              f"Model: d={cfg['model']['d_model']}, {cfg['model']['n_layers']} layers, {cfg['model']['n_heads']} "
              f"heads, RoPE; context L={L}; {tr['tokens_per_batch']} token slots per micro-batch x "
              f"{tr['grad_accum']}; equal budget {tr['budget_tokens']:,} supervised tokens per arm; seeds "
              f"{tr['seeds']}; scored at the final checkpoint.", "",
              f"Corpus: {c['name']}: {c['train_docs']:,} training documents ({c['train_tokens']:,} tokens; length "
              f"percentiles {c['train_length_percentiles']}); held out {c['heldout_docs']} documents "
              f"({c['heldout_tokens']:,} tokens, longest {c['heldout_max_len']:,}): validation {c['val_docs']} docs / "
              f"{c['val_tokens']:,} tokens (cut at L), a disjoint position test set of {c['position_docs']} docs "
              f"({c.get('position_source', 'odd held-out documents')}; lengths {c['position_doc_lens']}).", ""]
    for note in report["notes"]:
        lines.append(f"Note: {note}")
    if report["notes"]:
        lines.append("")
    t = report["target"]
    lines += ["## Claims (paired over seeds against " + (report["comparisons"][0]["baseline"]
                                                          if report["comparisons"] else "-") + ")", "",
              f"Target validation loss {t['loss']:.4f} ({t['rule']}). Ratios are arm / baseline, per seed; "
              "verdicts use the 95% interval of the paired log-ratio (loss: difference).", "",
              "| arm | tokens/s ratio | verdict | time-to-target ratio | verdict | final val loss diff | verdict |",
              "|---|---|---|---|---|---|---|"]
    for cmp in report["comparisons"]:
        tps, ttt, fl = cmp["log_tokens_per_s"], cmp["log_time_to_target"], cmp["final_val_loss"]
        r1 = ", ".join(f"{x:.2f}" for x in cmp["tokens_per_s_ratio"])
        r2 = ", ".join(f"{x:.2f}" for x in cmp["time_to_target_ratio"]) or "-"
        lines.append(f"| {cmp['arm']} | {r1} (geo-mean {math.exp(tps['mean']):.2f}) | {tps['verdict']} | {r2}"
                     f"{' (geo-mean %.2f)' % math.exp(ttt['mean']) if not math.isnan(ttt['mean']) else ''} | "
                     f"{ttt['verdict']} | {_f(fl['mean'], 4)} [{_f(fl['lo'], 4)}, {_f(fl['hi'], 4)}] | "
                     f"{fl['verdict']} |")
    lines += ["", "## Arms (mean [95% interval] over seeds)", "",
              "| arm | packing / attention / positions / curriculum | supervised tok/s | per CPU-s | MFU | "
              "final val loss | time to target (s) | FLOPs to target | reached | train time (s) | epochs |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, s in report["summary"].items():
        k = s["knobs"]
        lines.append(f"| {a} | {k['packing']} / {k['attention']} / {k['positions']} / {k['curriculum']} | "
                     f"{_ci(s['supervised_tokens_per_s'], 0)} | {_ci(s.get('supervised_tokens_per_cpu_s'), 0)} | "
                     f"{_ci(s['mfu'], 3) if s['mfu'] else 'n/a'} | "
                     f"{_ci(s['final_val_loss'], 4)} | {_ci(s['to_target_time_s'], 0)} | {_sci(s['to_target_flops'])} | "
                     f"{s['reached_target']}/{len(s['seeds'])} | {_ci(s['train_time_s'], 0)} | "
                     f"{_ci(s['epochs'], 2)} |")
    lines += ["", "Accounting per run:", "", "| arm | seed | steps | supervised | real tokens | padding | pieces | "
              "FLOPs |", "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['supervised_tokens']:,} | "
                     f"{r['real_tokens']:,} | {r['padding']:,} | {r['pieces']:,} | {r['flops']:.3g} |")
    edges = report["edges"]
    names = _bucket_names(edges, L)
    lines += ["", "## Loss by position (held-out test documents, each scored alone)", "",
              "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a, s in report["summary"].items():
        lines.append(f"| {a} | " + " | ".join(_ci(x, 3) for x in s["loss_by_position"]) + " |")
    if report["runs"]:
        rows = report["runs"][0]["loss_by_position"]
        lines.append("| (docs / tokens) | " + " | ".join(f"{r['docs']} / {r['tokens']:,}" for r in rows) + " |")
    if report["extrapolation"]:
        lines += ["", f"## Extrapolation arms at evaluation ({ev['extrap_arm']}'s final models, factor "
                      f"{ev['extrap_factor']:g}, original context L)", "",
                  "| scaling | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for kind in dict.fromkeys(e["scaling"] for e in report["extrapolation"]):
            es = [e for e in report["extrapolation"] if e["scaling"] == kind]
            cells = []
            for i in range(len(names)):
                vals = [e["loss_by_position"][i]["loss"] for e in es if e["loss_by_position"][i]["loss"] is not None]
                cells.append(_ci(_t(vals), 3))
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    if report["staged"]:
        st = report["staged"]
        lines += ["", f"## Staged recipe: pretrain at L, fine-tune at {st[0]['factor']:g}L with {st[0]['scaling']} "
                      "(on training documents longer than L)", "",
                  "| run | seed | fine-tune supervised | fraction of pretraining FLOPs | of train time | val loss at L | "
                  + " | ".join(names) + " |", "|---|---|---|---|---|---|" + "---|" * len(names)]
        for s in st:
            lines.append(f"| {s['arm']} | {s['seed']} | {s['supervised_tokens']:,} | {s['compute_frac']:.3f} | "
                         f"{s['time_frac']:.3f} | {s['val_loss_at_L']:.4f} | "
                         + " | ".join(_f(r["loss"]) for r in s["loss_by_position"]) + " |")
    lines += ["", "Plots: loss_vs_position.png, val_loss_vs_time.png.", ""]
    return "\n".join(lines)


def _t(vals):
    from .lm_eval import t_interval
    return t_interval(vals)


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = report["config"]["train"]["context"]
    edges = report["edges"]
    mids = [(a + b) / 2 / L for a, b in zip(edges[:-1], edges[1:])]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (a, s) in enumerate(report["summary"].items()):
        y = [x[0] if x and x[0] is not None else np.nan for x in s["loss_by_position"]]
        ax.plot(mids, y, marker="osD^v"[i % 5], label=a)
    for kind in dict.fromkeys(e["scaling"] for e in report["extrapolation"]):
        if kind == "none":
            continue
        es = [e for e in report["extrapolation"] if e["scaling"] == kind]
        y = [np.nanmean([e["loss_by_position"][i]["loss"] if e["loss_by_position"][i]["loss"] is not None
                         else np.nan for e in es]) for i in range(len(mids))]
        ax.plot(mids, y, ls="--", marker="x", label=f"{es[0]['arm']} + {kind} (eval)")
    if report["staged"]:
        st = report["staged"]
        y = [np.nanmean([s["loss_by_position"][i]["loss"] if s["loss_by_position"][i]["loss"] is not None
                         else np.nan for s in st]) for i in range(len(mids))]
        ax.plot(mids, y, ls=":", marker="*", label=st[0]["arm"])
    ax.axvline(1.0, color="gray", ls=":", lw=1)
    ax.set(xscale="log", xlabel="position / L (bucket middle; dotted: training context)", ylabel="loss (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "loss_vs_position.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = list(report["summary"])
    for r in report["runs"]:
        i = names.index(r["arm"])
        ax.plot([h["train_time"] for h in r["history"]], [h["val_loss"] for h in r["history"]], color=f"C{i}",
                marker="o", ms=3, label=r["arm"] if r["seed"] == report["runs"][0]["seed"] else None)
    ax.axhline(report["target"]["loss"], color="k", ls=":", lw=1, label="target")
    ax.set(xlabel="training wall time (s, evaluation excluded)", ylabel="validation loss (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "val_loss_vs_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_reports(report: dict, out: Path) -> dict:
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    md = markdown(report)
    (out / "report.md").write_text(md)
    return {"json": out / "report.json", "md": out / "report.md", "plots": plots(report, out)}
