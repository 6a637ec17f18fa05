"""What does one lengen-eval run do, start to end? Validate everything, then measure, then write.

    result = evaluate(EvalConfig(model="path/to/checkpoint", context=4096))   # nothing written yet
    out = write_report(result)                                               # report.md/json + 2 PNGs

Order matters for "nothing half-written": the config, the checkpoint, the tokenizer, the corpus, every arm's
RoPE check and the memory estimate all run before the first forward, and files are written only at the end,
each atomically (lengen_fast.fsio), into a directory created then.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..progress import progress
from .arms import Arm, check_arms, parse_arms
from .checkpoint import LoadedModel, load_model
from .config import EvalConfig, EvalError, check_config
from .documents import Documents, load_documents
from .passkey import Prompt, build_prompts
from .runner import check_memory, passkey_scores, token_losses


@dataclass
class EvalResult:
    config: EvalConfig
    model: LoadedModel
    arms: list[Arm]
    docs: Documents
    edges: list[int]                                   # position bucket edges [0, m1 L, m2 L, ...]
    token_losses: dict[str, list[np.ndarray]]          # arm -> per document, loss at positions 0..len-2
    prompts: list[Prompt] = field(default_factory=list)
    passkey: dict[str, list[dict]] = field(default_factory=dict)   # arm -> per prompt {"correct", "nll"}
    notes: list[str] = field(default_factory=list)


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise EvalError(f"--device {name!r} is not a torch device: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name!r}: this torch has no CUDA device")
    return dev


def prepare(cfg: EvalConfig):
    """Everything that can refuse the run, before any forward: (model, arms, docs, prompts, edges, device, notes)."""
    check_config(cfg)
    device = _device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    lm = load_model(cfg.model, tokenizer=cfg.tokenizer or None, context=cfg.context, dtype=dtype, device=device)
    L = lm.context
    edges = [0] + [int(round(m * L)) for m in cfg.multiples]
    if len(set(edges)) != len(edges):
        raise EvalError(f"--multiples {cfg.multiples} x L = {L} give empty buckets {edges}")
    max_len = edges[-1]
    if lm.hard_max_positions is not None and max_len >= lm.hard_max_positions:  # inputs sit at 0..max_len
        raise EvalError(f"--multiples: positions up to {max_len} exceed this model's learned position table "
                        f"(max_positions = {lm.hard_max_positions}); lower --multiples or --context")
    factor = cfg.factor if cfg.factor is not None else float(max(max(cfg.multiples), 1.0))
    arms = parse_arms(cfg.scaling, factor, L, lm.config_scaling, lm.has_rope)
    check_arms(arms, lm, max_len)
    longest = max_len + 1
    check_memory(lm.shape, cfg.max_tokens, longest, dtype, device, cfg.loss_chunk)
    hay_len = 2 * longest if cfg.passkey_trials else 0
    docs = load_documents(lm.tokenizer, data=cfg.data, n_docs=cfg.docs, context=L, max_len=max_len,
                          last_start=edges[-2], haystack_len=hay_len, seed=cfg.seed)
    notes = list(docs.notes)
    prompts: list[Prompt] = []
    if cfg.passkey_trials:
        if docs.haystack.size < hay_len:
            notes.append(f"the passkey haystack holds only {docs.haystack.size} tokens; prompts overlap more")
        prompts, pnotes = build_prompts(lm.tokenizer, docs.haystack, docs.bos, L, [1.0 * m for m in cfg.multiples],
                                        cfg.passkey_depths, cfg.passkey_trials, cfg.seed)
        notes += pnotes
    return lm, arms, docs, prompts, edges, device, notes


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Run every arm on the same documents and prompts (see module doc). Writes nothing."""
    lm, arms, docs, prompts, edges, device, notes = prepare(cfg)
    torch.manual_seed(cfg.seed)
    per_arm = sum(d.size for d in docs.docs) + sum(p.tokens.size for p in prompts)
    bar = progress(total=per_arm * len(arms), desc=f"lengen-eval {lm.name}", enabled=cfg.progress, unit="tok")
    losses: dict[str, list[np.ndarray]] = {}
    passkey: dict[str, list[dict]] = {}
    try:
        for arm in arms:
            bar.set_postfix(arm=arm.name)
            losses[arm.name] = token_losses(lm.model, docs.docs, arm, max_tokens=cfg.max_tokens, device=device,
                                            loss_chunk=cfg.loss_chunk, bar=bar)
            if prompts:
                passkey[arm.name] = passkey_scores(lm.model, prompts, arm, max_tokens=cfg.max_tokens, device=device,
                                                   bar=bar)
            ood = [x[edges[1]:].mean() for x in losses[arm.name] if x.size > edges[1]]
            bar.event(arm.name, ood_loss=f"{np.mean(ood):.3f}" if ood else "n/a")
    finally:
        bar.close()
    return EvalResult(cfg, lm, arms, docs, edges, losses, prompts, passkey, notes)


def default_out(cfg: EvalConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(f"lengen-eval-{Path(cfg.model).stem or 'model'}")


def run(cfg: EvalConfig) -> Path:
    """evaluate + write_report; returns the report directory."""
    from .report import write_report

    return write_report(evaluate(cfg), default_out(cfg))
