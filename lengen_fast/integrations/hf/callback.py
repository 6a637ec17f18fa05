"""How is an HF Trainer run evaluated at lengths past its training context, and stopped when that degrades?

    cb = hf.LengthGenCallback(ood_docs, context=2048, every=200)               # loss by position at 1-4x L
    Trainer(..., callbacks=[cb]).train();  cb.stopper.best_step                 # the step to keep

Every ``every`` optimizer steps the model scores the same documents: loss by position in buckets
[0, L), [L, 2L), [2L, 4L) ... (``metric="loss"``) or passkey exact match at those lengths (``metric="passkey"``,
prompts built by lengen_fast.eval.passkey from a tokenizer and the documents as haystack). The OOD score is the
mean over OOD buckets of 1/perplexity (loss) or of the OOD accuracy (passkey): higher is better.

Stopping is our trainer's rule, by the same class (``lengen_fast.train.evaluate.EarlyStopper``): it fires when the
OOD score is below best - max(drop x best, z x noise sd) for ``patience`` evaluations in a row, only after
``min_steps`` and once in-distribution is learned (ID loss <= ``learned_loss`` when given; passkey ID accuracy
>= ``learned_acc``). noise sd: the standard error of a difference of two scores from sampling the documents
(sqrt(2) x sd over documents / sqrt(n); for passkey the binomial worst case). Metrics are logged through Trainer:
into ``state.log_history`` (saved in trainer_state.json), into the ``logs`` of the on_log event that this
callback requests (so the progress bar / printer and every callback after this one see them) and through
transformers' trainer logger. Under torch.distributed rank 0's measurement is broadcast, so all ranks stop together.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ...eval.arms import Arm
from ...eval.runner import bucket_means, passkey_scores, token_losses
from .compat import _transformers
from .engine_model import HFEngineModel

try:
    from transformers import TrainerCallback
except ImportError:  # the package imports without transformers; the callback needs it
    TrainerCallback = object

PREFIX = "lengen/"


class LengthGenCallback(TrainerCallback):
    """Periodic OOD-length evaluation and the noise-guarded "stop when OOD drops" rule (see module doc)."""

    def __init__(self, docs, *, context: int, every: int = 100, multiples=(1, 2, 4), metric: str = "loss",
                 tokenizer=None, passkey_trials: int = 2, passkey_depths=(0.0, 0.5, 1.0), early_stop: bool = True,
                 drop: float = 0.05, z: float = 2.0, min_steps: int = 100, patience: int = 2,
                 learned_loss: float | None = None, learned_acc: float = 0.9, max_tokens: int | None = None,
                 seed: int = 0):
        from ...train.evaluate import EarlyStopper

        _transformers()
        if metric not in ("loss", "passkey"):
            raise ValueError(f"LengthGenCallback: metric must be 'loss' or 'passkey', got {metric!r}")
        if not isinstance(context, int) or context < 1 or not isinstance(every, int) or every < 1:
            raise ValueError(f"LengthGenCallback: context and every must be positive ints, got {context!r}, {every!r}")
        self.edges = [0] + [int(round(m * context)) for m in multiples]
        if sorted(set(self.edges)) != self.edges or len(self.edges) < 3:
            raise ValueError(f"LengthGenCallback: multiples {multiples} must be increasing with at least one beyond 1")
        self.context, self.every, self.metric, self.early_stop = context, every, metric, early_stop
        self.learned_loss, self.learned_acc = learned_loss, learned_acc
        self.docs = self._documents(docs)
        self.max_tokens = max_tokens or self.edges[-1] + 1
        self.prompts = []
        if metric == "passkey":
            from ...eval.documents import bos_id
            from ...eval.passkey import build_prompts
            if tokenizer is None:
                raise ValueError("LengthGenCallback(metric='passkey') needs the tokenizer")
            prompts, _ = build_prompts(tokenizer, np.concatenate(self.docs), bos_id(tokenizer), context,
                                       list(multiples), list(passkey_depths), passkey_trials, seed)
            if not prompts:
                raise ValueError(f"LengthGenCallback: no passkey prompt fits in {context} tokens x {list(multiples)}")
            self.prompts = prompts
        self.stopper = EarlyStopper(drop=drop, z=z, min_steps=min_steps, patience=patience)
        self.arm = Arm("model", "config", 1.0, None, False)      # the model's own RoPE
        self.history: list[dict] = []
        self._pending: dict | None = None

    def _documents(self, docs) -> list[np.ndarray]:
        """Documents reaching past L, cut to the last bucket end + 1 tokens."""
        need, out = self.context + 2, []
        for d in docs:
            a = np.asarray(d.tolist() if isinstance(d, torch.Tensor) else d, dtype=np.int64).reshape(-1)
            if a.size >= need:
                out.append(a[:self.edges[-1] + 1])
        if not out:
            raise ValueError(f"LengthGenCallback: no document holds {need} tokens (context + 2); OOD needs longer ones")
        return out

    # ----------------------------------------------------------------------------------- measuring
    def measure(self, model) -> dict:
        """Scores of ``model`` now: {"id", "ood_score", "noise_sd", "learned", and per-bucket values}."""
        adapter = HFEngineModel(model, patch=False)
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            if self.metric == "loss":
                losses = token_losses(adapter, self.docs, self.arm, max_tokens=self.max_tokens, device=device,
                                      loss_chunk=4096)
                rows = np.asarray(bucket_means(losses, self.edges), dtype=float)        # (docs, buckets)
                per_doc = np.nanmean(np.exp(-rows[:, 1:]), axis=1)                      # OOD 1/perplexity
                out = {"id_loss": float(np.nanmean(rows[:, 0])), "ood_score": float(np.nanmean(per_doc))}
                out.update({f"loss_{a}_{b}": float(np.nanmean(rows[:, i]))
                            for i, (a, b) in enumerate(zip(self.edges[:-1], self.edges[1:]))})
                sd = _sd(per_doc)
                out["noise_sd"] = math.sqrt(2) * sd / math.sqrt(max(1, np.isfinite(per_doc).sum()))
                out["learned"] = self.learned_loss is None or out["id_loss"] <= self.learned_loss
            else:
                sc = passkey_scores(adapter, self.prompts, self.arm, max_tokens=self.max_tokens, device=device)
                ok = np.array([s["correct"] for s in sc], dtype=float)
                mult = np.array([p.multiple for p in self.prompts])
                out = {f"passkey_{m:g}": float(ok[mult == m].mean()) for m in sorted(set(mult))}
                id_ok, ood_ok = ok[mult <= 1], ok[mult > 1]
                out["id_acc"] = float(id_ok.mean()) if id_ok.size else math.nan
                out["ood_score"] = float(ood_ok.mean()) if ood_ok.size else math.nan
                out["noise_sd"] = math.sqrt(2 * 0.25 / max(1, ood_ok.size))
                out["learned"] = bool(id_ok.size == 0 or out["id_acc"] >= self.learned_acc)
        finally:
            model.train(was)
        return out

    # ----------------------------------------------------------------------------------- Trainer events
    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step == 0 or step % self.every or model is None:
            return control
        m = _broadcast(self.measure(model))
        new_best, fired = self.stopper.update(step, m["ood_score"], learned=m["learned"], noise_sd=m["noise_sd"])
        m["best_ood_score"], m["best_step"] = self.stopper.best, self.stopper.best_step
        logs = {PREFIX + k: (float(v) if not isinstance(v, bool) else int(v)) for k, v in m.items()}
        self.history.append({"step": step, **m})
        state.log_history.append({**logs, "step": step})
        self._pending = logs
        control.should_log = True
        from transformers.utils import logging
        log = logging.get_logger("transformers.trainer")
        log.info(f"LengthGenCallback step {step}: OOD score {m['ood_score']:.4f} (best {self.stopper.best:.4f} at "
                 f"step {self.stopper.best_step})")
        if fired and self.early_stop:
            log.warning(f"LengthGenCallback: stopping: {self.stopper.reason}")
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is not None and logs is not None:
            logs.update(self._pending)
            self._pending = None
        return control


def _sd(x: np.ndarray) -> float:
    from ...train.stats import interval

    sd = interval(x.tolist())["sd"]
    return 0.0 if math.isnan(sd) else sd


def _broadcast(m: dict) -> dict:
    """Rank 0's measurement on every rank (so every rank takes the same stop decision)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [m]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return m
