"""What does a lengen-eval run conclude, and how sure is it? Statistics, report.md, report.json and two PNGs.

Every statistic comes from ``train/stats.py``. The unit of evidence is a document (loss) or a prompt (passkey):
  - loss per bucket: each document's mean loss over the positions of the bucket it reaches; ``interval`` over
    documents; arm - none ``compare``d over the same documents (paired), verdict "holds" when the 95% interval of
    the difference lies below zero (lower loss is better); "OOD" is each document's mean over positions >= L;
  - passkey: exact match per prompt; ``interval`` over prompts per length; arm - none paired over the same prompts,
    "holds" when the interval lies above zero. Each comparison states its MDE (80% power).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import platform
from pathlib import Path

import numpy as np

from ..fsio import atomic_write_bytes, atomic_write_text
from ..train.stats import compare, fmt_ci, interval
from .runner import bucket_means


def _ood(x: np.ndarray, L: int) -> float:
    return float(x[L:].mean()) if x.size > L else math.nan


def _curve(losses: list[np.ndarray], max_len: int, bins: int = 48) -> dict:
    """Mean loss over documents in log-spaced position bins (positions 0..max_len-1)."""
    edges = np.unique(np.concatenate([[0], np.geomspace(1, max_len, bins).round().astype(int)]))
    s, c = np.zeros(edges.size - 1), np.zeros(edges.size - 1)
    for x in losses:
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            seg = x[a:b]
            s[i] += seg.sum()
            c[i] += seg.size
    mid = [(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])]
    return {"position": mid, "loss": [float(a / b) if b else math.nan for a, b in zip(s, c)]}


def summarize(result) -> dict:
    """Everything report.json holds (NaN where undefined; written as null)."""
    cfg, lm, edges = result.config, result.model, result.edges
    L = lm.context
    names = [a.name for a in result.arms]
    buckets = {a: bucket_means(result.token_losses[a], edges) for a in names}
    ood = {a: [_ood(x, L) for x in result.token_losses[a]] for a in names}
    labels = [f"[{a}, {b})" for a, b in zip(edges[:-1], edges[1:])]
    loss = {a: {"buckets": [interval([row[i] for row in buckets[a]]) for i in range(len(labels))],
                "ood": interval(ood[a]), "curve": _curve(result.token_losses[a], edges[-1])} for a in names}
    vs = {a: {"buckets": [compare([r[i] for r in buckets[a]], [r[i] for r in buckets["none"]], better="lower")
                          for i in range(len(labels))],
              "ood": compare(ood[a], ood["none"], better="lower")} for a in names if a != "none"}
    out = {"format": "lengen-eval", "version": 1,
           "model": {"path": str(lm.path), "kind": lm.kind, "name": lm.name, "context": L,
                     "context_source": lm.context_source, "rope_base": lm.base, "rotary_dim": lm.rotary_dim,
                     "config_scaling": dataclasses.asdict(lm.config_scaling) if lm.config_scaling else None,
                     "num_params": int(lm.model.num_params()) if hasattr(lm.model, "num_params")
                     else sum(p.numel() for p in lm.model.parameters())},
           "config": dataclasses.asdict(cfg),
           "arms": [{"name": a.name, "kind": a.kind, "factor": a.factor, "hf_rope_parameters": a.hf_rope,
                     "hf_check_max_abs_err": a.hf_max_err,
                     "scaling": dataclasses.asdict(a.scaling) if a.scaling is not None else "checkpoint config"}
                    for a in result.arms],
           "documents": {"source": result.docs.source, "names": result.docs.names,
                         "tokens": [int(d.size) for d in result.docs.docs]},
           "edges": edges, "bucket_labels": labels,
           "docs_per_bucket": [int(sum(1 for r in buckets["none"] if not math.isnan(r[i]))) for i in range(len(labels))],
           "loss": loss, "loss_vs_none": vs, "notes": list(result.notes),
           "environment": {"python": platform.python_version(), **_versions()}}
    if result.prompts:
        mults = sorted({p.multiple for p in result.prompts})
        depths = sorted({p.depth for p in result.prompts})
        pk, pvs = {}, {}
        for a in names:
            sc = result.passkey[a]
            by_len = {f"{m:g}": interval([float(s["correct"]) for p, s in zip(result.prompts, sc) if p.multiple == m])
                      for m in mults}
            grid = [[float(np.mean([s["correct"] for p, s in zip(result.prompts, sc) if p.multiple == m
                                    and p.depth == d])) for d in depths] for m in mults]
            nll = {f"{m:g}": interval([s["nll"] for p, s in zip(result.prompts, sc) if p.multiple == m]) for m in mults}
            pk[a] = {"by_length": by_len, "grid": grid, "key_nll": nll,
                     "ood": interval([float(s["correct"]) for p, s in zip(result.prompts, sc) if p.multiple > 1])}
            if a != "none":
                base = result.passkey["none"]
                pvs[a] = {f"{m:g}": compare([float(s["correct"]) for p, s in zip(result.prompts, sc) if p.multiple == m],
                                            [float(s["correct"]) for p, s in zip(result.prompts, base) if p.multiple == m])
                          for m in mults}
                pvs[a]["ood"] = compare([float(s["correct"]) for p, s in zip(result.prompts, sc) if p.multiple > 1],
                                        [float(s["correct"]) for p, s in zip(result.prompts, base) if p.multiple > 1])
        out["passkey"] = {"multiples": mults, "depths": depths, "prompts_per_cell": cfg.passkey_trials,
                          "scoring": "exact match of greedy decoding (teacher-forced argmax at every key token)",
                          "arms": pk, "vs_none": pvs}
    return out


def _versions() -> dict:
    import torch

    from .. import __version__
    v = {"torch": torch.__version__, "lengen_fast": __version__}
    try:
        import transformers
        v["transformers"] = transformers.__version__
    except ImportError:
        pass
    return v


def _jsonable(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


def markdown(s: dict) -> str:
    m = s["model"]
    L = m["context"]
    lines = [f"# lengen-eval: {m['name']}", "",
             f"- model: `{m['path']}` ({m['kind']}, {m['num_params']:,} parameters); trained context L = {L} "
             f"({m['context_source']}); RoPE base {m['rope_base']:g}",
             f"- device {s['config']['device']}, dtype {s['config']['dtype']}, --max-tokens {s['config']['max_tokens']}",
             f"- documents: {len(s['documents']['names'])} from {s['documents']['source']}; per bucket: "
             + ", ".join(f"{lab} {n}" for lab, n in zip(s["bucket_labels"], s["docs_per_bucket"])),
             "- arms (each checked against transformers' rotary embedding with the same rope config; max |diff|): "
             + ", ".join(f"`{a['name']}` {_fmt_err(a['hf_check_max_abs_err'])}" for a in s["arms"]), "",
             "## Loss by position", "",
             "Mean next-token loss per position bucket, 95% interval over documents (lower is better). "
             "OOD: positions >= L.", "",
             "| arm | " + " | ".join(s["bucket_labels"]) + " | OOD |",
             "|---|" + "---|" * (len(s["bucket_labels"]) + 1)]
    for a, d in s["loss"].items():
        lines.append(f"| {a} | " + " | ".join(fmt_ci(c, 3) for c in d["buckets"]) + f" | {fmt_ci(d['ood'], 3)} |")
    if s["loss_vs_none"]:
        lines += ["", "### Each arm minus none (paired over documents)", "",
                  "| arm | " + " | ".join(s["bucket_labels"]) + " | OOD | verdict (OOD) | MDE (OOD) |",
                  "|---|" + "---|" * (len(s["bucket_labels"]) + 3)]
        for a, d in s["loss_vs_none"].items():
            lines.append(f"| {a} | " + " | ".join(fmt_ci(c, 3, signed=True) for c in d["buckets"])
                         + f" | {fmt_ci(d['ood'], 3, signed=True)} | {d['ood']['verdict']} | {_fmt_mde(d['ood'])} |")
    if "passkey" in s:
        p = s["passkey"]
        hdr = [f"{float(x):g} x L" for x in p["multiples"]]
        lines += ["", "## Passkey retrieval", "",
                  f"{p['scoring']}; {p['prompts_per_cell']} prompt(s) per (length, depth), depths "
                  f"{', '.join(f'{d:g}' for d in p['depths'])}; 95% interval over prompts.", "",
                  "| arm | " + " | ".join(hdr) + " | OOD (> L) |", "|---|" + "---|" * (len(hdr) + 1)]
        for a, d in p["arms"].items():
            lines.append(f"| {a} | " + " | ".join(fmt_ci(c, 2) for c in d["by_length"].values())
                         + f" | {fmt_ci(d['ood'], 2)} |")
        if p["vs_none"]:
            lines += ["", "### Each arm minus none (paired over prompts)", "",
                      "| arm | " + " | ".join(hdr) + " | OOD | verdict (OOD) | MDE (OOD) |",
                      "|---|" + "---|" * (len(hdr) + 3)]
            for a, d in p["vs_none"].items():
                lines.append(f"| {a} | " + " | ".join(fmt_ci(d[f'{float(x):g}'], 2, signed=True) for x in p["multiples"])
                             + f" | {fmt_ci(d['ood'], 2, signed=True)} | {d['ood']['verdict']} | {_fmt_mde(d['ood'])} |")
    lines += ["", "Verdicts: \"holds\" = the arm is better than none with the 95% interval of the paired difference "
              "excluding zero; \"opposite\" = worse; \"inconclusive\" otherwise. MDE: the smallest true difference this "
              "many documents or prompts detect with 80% power.", "",
              "Plots: `loss_by_position.png`, `passkey_heatmap.png`. Everything above: `report.json`."]
    if s["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in s["notes"]]
    return "\n".join(lines) + "\n"


def _fmt_err(e) -> str:
    return "n/a" if e is None or (isinstance(e, float) and math.isnan(e)) else f"{e:.1e}"


def _fmt_mde(ci) -> str:
    m = ci.get("mde")
    return "n/a" if m is None or math.isinf(m) or math.isnan(m) else f"{m:.3f}"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def plots(s: dict) -> dict[str, bytes]:
    """loss_by_position.png and passkey_heatmap.png as PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = s["model"]["context"]
    out = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for a, d in s["loss"].items():
        x = np.asarray(d["curve"]["position"], dtype=float) + 1
        ax.plot(x, d["curve"]["loss"], label=a, lw=1.4)
    for e in s["edges"][1:-1]:
        ax.axvline(e, color="grey", ls=":" if e != L else "--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("position (+1, log scale); dashed: trained context L")
    ax.set_ylabel("next-token loss (mean over documents)")
    ax.set_title(f"{s['model']['name']}: loss by position, L = {L}")
    ax.legend(fontsize=8)
    out["loss_by_position.png"] = _png(fig)
    plt.close(fig)
    if "passkey" in s:
        p = s["passkey"]
        arms = list(p["arms"])
        fig, axes = plt.subplots(1, len(arms), figsize=(2.6 * len(arms) + 1, 3), squeeze=False)
        for ax, a in zip(axes[0], arms):
            g = np.asarray(p["arms"][a]["grid"], dtype=float)
            im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            for (i, j), v in np.ndenumerate(g):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
            ax.set_xticks(range(len(p["depths"])), [f"{d:g}" for d in p["depths"]], fontsize=7)
            ax.set_yticks(range(len(p["multiples"])), [f"{m:g}L" for m in p["multiples"]], fontsize=7)
            ax.set_title(a, fontsize=9)
            ax.set_xlabel("depth", fontsize=8)
        axes[0][0].set_ylabel("length")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact match")
        out["passkey_heatmap.png"] = _png(fig)
        plt.close(fig)
    return out


def write_report(result, out_dir) -> Path:
    """report.json, report.md and the PNGs in ``out_dir`` (created now), each written atomically."""
    s = summarize(result)
    md = markdown(s)
    pngs = plots(s)
    text = json.dumps(_jsonable(s), indent=1) + "\n"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        atomic_write_bytes(out / name, data)
    atomic_write_text(out / "report.json", text)
    atomic_write_text(out / "report.md", md)
    return out
