"""The corpus workload's part of the report: time to target, comparisons, tables and plots.

Headline: every arm against the baseline (paired over seeds) on final validation loss (the primary metric: the
one ``--mde`` and seeds auto refer to), supervised tokens per second (log ratio) and time to the target loss (log
ratio). Loss by position, the evaluation-time scaling arms and the fine-tune are reported with intervals.
"""
from __future__ import annotations

import math

from .stats import compare, fmt_ci, fmt_mde, interval


def time_to_target(history: list[dict], target: float) -> dict:
    """Train time, FLOPs and supervised tokens at which validation loss first reaches ``target``: linear
    interpolation between the eval before the crossing and the first eval at or below it (the first eval's own
    values when it is already there); None when no eval reaches the target."""
    prev = None
    for row in history:
        if row["val_loss"] <= target:
            w = 1.0 if prev is None or prev["val_loss"] <= row["val_loss"] else \
                (prev["val_loss"] - target) / (prev["val_loss"] - row["val_loss"])
            at = (lambda k: row[k] if prev is None else prev[k] + w * (row[k] - prev[k]))
            return {"time_s": at("train_time"), "flops": at("flops"), "supervised": at("supervised")}
        prev = row
    return {"time_s": None, "flops": None, "supervised": None}


def _arms(rep) -> list[str]:
    return [a["name"] for a in rep["arms"]]


def _per_seed(rep, arm, get) -> list:
    by = {r["seed"]: r for r in rep["runs"] if r["arm"] == arm}
    return [get(by[s]) if s in by else None for s in rep["seeds"]["list"]]


def _log(x):
    return math.log(x) if x else None


def prepare(rep) -> None:
    """The target loss and each run's time to it (needed before the comparisons)."""
    given = rep["config"]["corpus"]["target_loss"]
    finals = [r["final_val_loss"] for r in rep["runs"]]
    target = given if given > 0 else (max(finals) if finals else math.nan)
    rep["target"] = {"loss": target, "rule": ("given" if given > 0 else
                     "auto: the highest final validation loss of any (arm, seed), so every run reaches it")
                     + "; time and FLOPs interpolated linearly between the evals around the crossing"}
    for r in rep["runs"]:
        r["to_target"] = time_to_target(r["history"], target)


def comparisons(rep) -> list[dict]:
    prepare(rep)
    base, out = rep["baseline"], []
    metrics = (("final validation loss", "nats", "lower", True, lambda r: r["final_val_loss"]),
               ("log supervised tokens/s", "log ratio", "higher", False, lambda r: _log(r["supervised_per_second"])),
               ("log time to target", "log ratio", "lower", False, lambda r: _log(r["to_target"]["time_s"])))
    for a in _arms(rep):
        if a == base:
            continue
        for name, unit, better, primary, get in metrics:
            xa, xb = _per_seed(rep, a, get), _per_seed(rep, base, get)
            c = compare(xa, xb, better)
            out.append({"key": f"{a} - {base} | {name} | final", "group": "headline", "primary": primary,
                        "metric": name, "unit": unit, "a": a, "b": base, "selection": "final", "better": better,
                        "a_mean": interval(xa), "b_mean": interval(xb), "diff": c, "verdict": c["verdict"],
                        "note": ""})
    return out


def _bucket_names(edges, L) -> list[str]:
    return [f"[{a / L:g}L, {b / L:g}L)" for a, b in zip(edges[:-1], edges[1:])]


def _lbp(rows, i):
    return rows[i]["loss"] if rows[i]["loss"] is not None else None


def sections(rep) -> list[str]:
    cfg = rep["config"]
    L = rep["derived"]["seq_len"]
    c, edges = rep["corpus"], rep["edges"]
    names = _bucket_names(edges, L)
    md = [f"Corpus: {c['name']}: {c['train_docs']:,} training documents ({c['train_tokens']:,} tokens; length "
          f"percentiles {c['train_length_percentiles']}); held out {c['heldout_docs']} documents ({c['heldout_tokens']:,} "
          f"tokens, longest {c['heldout_max_len']:,}): validation {c['val_docs']} docs / {c['val_tokens']:,} tokens "
          f"(cut at L={L}), a disjoint position test set of {c['position_docs']} docs ({c['position_source']}; lengths "
          f"{c['position_doc_lens']}). Target validation loss {rep['target']['loss']:.4f} ({rep['target']['rule']}).\n",
          "## Arms (mean [95% interval] over seeds)\n",
          "| arm | packing / attention / positions / curriculum | supervised tok/s | per CPU-s | MFU | final val loss | "
          "time to target (s) | reached | train time (s) | epochs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in rep["arms"]:
        rs = [r for r in rep["runs"] if r["arm"] == a["name"]]
        iv = (lambda f: interval([f(r) for r in rs]))
        mfu = [r["mfu"] for r in rs if r.get("mfu")]
        md.append(f"| {a['name']} | {a['packing']} / {a['attention']} / {a['positions']} / {a['curriculum']} | "
                  f"{fmt_ci(iv(lambda r: r['supervised_per_second']), 0)} | "
                  f"{fmt_ci(iv(lambda r: r['supervised_per_cpu_second']), 0)} | "
                  f"{fmt_ci(interval(mfu), 3) if mfu else 'n/a'} | {fmt_ci(iv(lambda r: r['final_val_loss']), 4)} | "
                  f"{fmt_ci(iv(lambda r: r['to_target']['time_s']), 0)} | "
                  f"{sum(r['to_target']['time_s'] is not None for r in rs)}/{len(rs)} | "
                  f"{fmt_ci(iv(lambda r: r['train_seconds']), 0)} | {fmt_ci(iv(lambda r: r['accounting']['epochs']), 2)} |")
    md += ["", "## Loss by position (held-out test documents, each scored alone; final checkpoint)\n",
           "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in _arms(rep):
        rs = [r for r in rep["runs"] if r["arm"] == a]
        md.append(f"| {a} | " + " | ".join(fmt_ci(interval([_lbp(r["test"]["final"]["loss_by_position"], i)
                                                             for r in rs]), 3) for i in range(len(names))) + " |")
    if rep["runs"]:
        rows = rep["runs"][0]["test"]["final"]["loss_by_position"]
        md.append("| (docs / tokens) | " + " | ".join(f"{r['docs']} / {r['tokens']:,}" for r in rows) + " |")
    ext = rep["extension"]
    if ext:
        md += ["", f"## Context extension ({cfg['extension']['ext_arm'] or 'dd_natural'}'s final models; original context "
                   "L)\n", "| stage | scaling | factor | " + " | ".join(names) + " |",
               "|---|---|---|" + "---|" * len(names)]
        for stage, kind in dict.fromkeys((e["stage"], e["scaling"]) for e in ext):
            es = [e for e in ext if e["stage"] == stage and e["scaling"] == kind]
            md.append(f"| {stage} | {kind} | {es[0]['factor']:g} | " + " | ".join(
                fmt_ci(interval([_lbp(e["test"]["loss_by_position"], i) for e in es]), 3)
                for i in range(len(names))) + " |")
        ft = [e for e in ext if e["stage"] == "fine-tune"]
        if ft:
            md.append("\nFine-tune cost: " + "; ".join(
                f"{e['arm']} seed {e['seed']}: {e['supervised']:,} supervised tokens at {e['seq_len']}, "
                f"{e['compute_frac']:.3f} of pretraining FLOPs" for e in ft) + ".")
    md += ["", "Accounting per run:\n", "| arm | seed | steps | supervised | real tokens | padding | pieces | FLOPs |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rep["runs"]:
        a = r["accounting"]
        md.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {a['supervised']:,} | {a['tokens']:,} | "
                  f"{a['padding']:,} | {a['pieces']:,} | {a['flops']:.3g} |")
    return md + [""]


def summary_rows(rep) -> list[str]:
    lines = ["| arm | supervised tok/s | final val loss | time to target (s) |", "|---|---|---|---|"]
    for a in _arms(rep):
        rs = [r for r in rep["runs"] if r["arm"] == a]
        lines.append(f"| {a} | {fmt_ci(interval([r['supervised_per_second'] for r in rs]), 0)} | "
                     f"{fmt_ci(interval([r['final_val_loss'] for r in rs]), 4)} | "
                     f"{fmt_ci(interval([r['to_target']['time_s'] for r in rs]), 0)} |")
    return lines


def plots(rep: dict, out, save) -> list:
    import matplotlib.pyplot as plt
    L, edges = rep["derived"]["seq_len"], rep["edges"]
    mids = [(a + b) / 2 / L for a, b in zip(edges[:-1], edges[1:])]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, a in enumerate(_arms(rep)):
        rs = [r for r in rep["runs"] if r["arm"] == a]
        y = [interval([_lbp(r["test"]["final"]["loss_by_position"], j) for r in rs])["mean"] for j in range(len(mids))]
        ax.plot(mids, y, marker="osD^v"[i % 5], label=a)
    for stage, kind in dict.fromkeys((e["stage"], e["scaling"]) for e in rep["extension"]):
        if kind == "none":
            continue
        es = [e for e in rep["extension"] if e["stage"] == stage and e["scaling"] == kind]
        y = [interval([_lbp(e["test"]["loss_by_position"], j) for e in es])["mean"] for j in range(len(mids))]
        ax.plot(mids, y, ls="--" if stage == "evaluation" else ":", marker="x", label=f"{es[0]['arm']} {kind} ({stage})")
    ax.axvline(1.0, color="gray", ls=":", lw=1)
    ax.set(xscale="log", xlabel="position / L (bucket middle; dotted: training context)", ylabel="loss (nats/token)")
    ax.legend(fontsize=7)
    paths = [save(fig, out / "loss_vs_position.png")]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = _arms(rep)
    for r in rep["runs"]:
        ax.plot([h["train_time"] for h in r["history"]], [h["val_loss"] for h in r["history"]],
                color=f"C{names.index(r['arm'])}", marker="o", ms=3,
                label=r["arm"] if r["seed"] == rep["runs"][0]["seed"] else None)
    ax.axhline(rep["target"]["loss"], color="k", ls=":", lw=1, label="target")
    ax.set(xlabel="training wall time (s, evaluation excluded)", ylabel="validation loss (nats/token)")
    ax.legend(fontsize=7)
    paths.append(save(fig, out / "val_loss_vs_time.png"))
    return paths
