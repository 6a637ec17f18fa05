"""What does a run train on, and how is a model scored? The two workloads behind one interface.

- ``tasks``: synthetic length-generalization tasks (tasks.py) plus natural text, scored by exact match at
  multiples of the training length (validation selects checkpoints and drives the OOD rule; test is reported),
  with the boundary diagnostic on held-out text.
- ``corpus``: a text corpus (corpus.py), scored by validation loss (time to a target loss) and loss by position
  up to 8x the context on held-out documents, each scored alone.

A workload is built once per process from the frozen plan. ``source(seed, arm)`` gives a run's training
documents (a TokenSource), ``validator(seed, phase)`` the function a Run calls at each evaluation,
``test(model, seed, scaling)`` the reported scores, and ``finetune_source(seed)`` the documents of the extension
fine-tune. ``plan(cfg, arms, notes)`` sizes the workload's part of the plan (lengths, vocabulary, budget).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import distributed
from .config import eval_lengths
from .evaluate import (choose_position_docs, distance_buckets, loss_by_boundary_distance, loss_by_position,
                       position_edges, score, validation_loss)
from .tasks import (EVAL_MOD, auto_train_examples, eval_set, load_text, max_train_doc_tokens, text_base,
                    text_eval, text_pieces, text_train_len, train_documents, train_table)

PLAN_SAMPLE = 20000     # examples per task that the plan sizes budgets on
BOUNDARY_NEAR = (1, 4)  # distances [1, 4) from the document start: context that a boundary can disturb
BOUNDARY_FAR = 8        # distances >= 8


def next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def open_table(table):
    from ..data import open_tokens
    return open_tokens(table, column="input_ids", loss_mask_column="loss_mask")


def budget_amount(cfg, sup_share: float, num_params: int) -> float:
    tr = cfg.train
    if tr.budget == "supervised":
        return float(tr.budget_tokens or round(tr.steps * tr.tokens_per_batch * tr.grad_accum * sup_share))
    if tr.budget == "flops":
        return float(tr.budget_flops or tr.steps * 6.0 * num_params * tr.tokens_per_batch * tr.grad_accum)
    return float(tr.steps)


def epoch_use(loader, kind: str, num_params: int, m, arm) -> float:
    """Supervised tokens (or FLOPs, or 1 step) an arm spends per step, averaged over one epoch of ``loader``.
    A piece's labels are its tokens 1..length-1 (where the loss mask, if any, is 1)."""
    import torch

    from .trainer import attention_flops, dense_flops
    if kind == "steps":
        return 1.0
    src = loader.source
    if kind == "supervised" and src.has_loss_mask:
        cs = np.concatenate([[0], np.cumsum(np.concatenate([src.loss_mask(i) for i in range(len(src))]),
                                            dtype=np.int64)])
        offs = np.concatenate([[0], np.cumsum(src.lengths)])[:-1]
    total = 0.0
    for s in range(len(loader)):
        _, _, doc, start, length, fill = loader.pieces(0, s)
        if kind == "supervised" and src.has_loss_mask:
            a, b = offs[doc] + start + 1, offs[doc] + start + length
            total += float((cs[np.maximum(a, b)] - cs[a]).sum())
        elif kind == "supervised":
            total += float(np.maximum(length - 1, 0).sum())
        else:
            seg = fill if arm.attention == "row" else length
            total += dense_flops(num_params, loader.config.tokens_per_batch) + attention_flops(
                torch.as_tensor(np.concatenate([[0], np.cumsum(seg)])), m.n_layers, m.d_model)
    return total / max(1, len(loader))


# ========================================================================================= tasks
class TaskWorkload:
    name = "tasks"
    headline_unit = "OOD exact match (mean over tasks and lengths beyond the training length)"

    def __init__(self, plan):
        self.plan, self.cfg = plan, plan.cfg
        tc = self.cfg.task
        self.text = load_text(tc) if "text" in tc.tasks else None
        self.tc = dataclasses.replace(tc, train_examples=plan.derived["train_examples"])
        self._seed = None

    # ---------------------------------------------------------------- planning
    @staticmethod
    def plan(cfg, arms, notes, num_params_of) -> dict:
        from .trainer import make_loader
        tc, tr = cfg.task, cfg.train
        lens = eval_lengths(tc)
        tasks = [t for t in tc.tasks if t != "text"]
        if "copy_unique" in tasks and max(lens) > tc.alphabet:
            raise ValueError(f"task.alphabet={tc.alphabet}: copy_unique at eval length {max(lens)} needs alphabet >= "
                             "that")
        if tasks and not any(n > tc.train_max_len for n in lens):
            notes.append("no evaluation length is beyond train_max_len: nothing out of distribution is measured")
        distinct = {f"{t}@{n}": {s: eval_set(t, n, tc, 0, s).distinct for s in ("val", "test")}
                    for t in tasks for n in lens}
        small = {k: v for k, v in distinct.items() if min(v.values()) < tc.eval_examples}
        if small:
            notes.append("small prompt spaces (distinct val/test prompts below eval_examples="
                         f"{tc.eval_examples}; every one is used, none shared): "
                         + ", ".join(f"{k} {v['val']}/{v['test']}" for k, v in small.items()))
        doc_max = max_train_doc_tokens(tc)
        seq_len = tr.seq_len or next_pow2(doc_max)
        if tr.seq_len and tr.seq_len < doc_max and any(a.packing == "bfd" for a in arms):
            raise ValueError(f"train.seq_len={tr.seq_len} is shorter than the longest training document ({doc_max} "
                             "tokens): packing=bfd keeps documents whole (concat and decompose may cut them)")
        if any(a.packing == "decompose" for a in arms) and seq_len & (seq_len - 1):
            raise ValueError(f"train.seq_len={seq_len} must be a power of two for packing=decompose (its largest "
                             "bucket)")
        if tr.tokens_per_batch < seq_len:
            raise ValueError(f"train.tokens_per_batch={tr.tokens_per_batch} is smaller than the row length {seq_len} "
                             "(the longest training document rounded up to a power of two, or train.seq_len)")
        if any(a.packing == "decompose" and a.fit == "pad" for a in arms) and seq_len < next_pow2(doc_max):
            raise ValueError(f"train.seq_len={seq_len} is shorter than the padded longest document "
                             f"({next_pow2(doc_max)}): fit=pad would still cut documents")
        text = load_text(tc) if "text" in tc.tasks else None
        vocab = text_base(tc) + (text.vocab if text is not None else 0)
        num_params = num_params_of(vocab)
        L = text_train_len(tc)
        edges = [0, L] + [round(m * L) for m in sorted(tc.eval_multiples) if m > 1]
        tcx = tc if tc.train_examples else dataclasses.replace(
            tc, train_examples=auto_train_examples(tc, tr.steps, tr.tokens_per_batch * tr.grad_accum))
        # budgets sized on seed 0's documents (at most PLAN_SAMPLE examples per task: a share and a per-step rate
        # need no more), the same for every arm and seed
        tps = dataclasses.replace(tcx, train_examples=min(tcx.train_examples, PLAN_SAMPLE))
        docs = task_docs(cfg, tps, 0, text, tr.steps)
        sup_share = sum(int(mk[1:].sum()) for mk in docs[1]) / sum(len(t) for t in docs[0])
        budget = budget_amount(cfg, sup_share, num_params)
        per_step = {}
        for arm in arms:
            src = open_table(train_table(tps, 0, pad_pow2=arm.fit == "pad", docs=docs))
            try:
                loader = make_loader(src, arm, seq_len, tr.tokens_per_batch * tr.grad_accum, 0, min_len=tr.min_len,
                                     shard=(0, 1))
            except ValueError as e:
                raise ValueError(f"arm {arm.name!r}: {e}") from None
            per_step[arm.name] = (epoch_use(loader, tr.budget, num_params, cfg.model, arm), len(loader))
        return {"seq_len": seq_len, "vocab": vocab, "budget": budget, "num_params": num_params,
                "per_step": per_step, "derived": {
                    "doc_max_tokens": doc_max, "eval_lengths": lens, "text_edges": edges if text else None,
                    "supervised_share": sup_share, "train_examples": tcx.train_examples,
                    "eval_distinct_seed0": distinct, "eval_mod": EVAL_MOD},
                "extension_len": lambda f: _ext_len(tc, f, seq_len), "learned_positions_need":
                max([len_of(t, n, tc) for t in tasks for n in lens] + ([max(edges)] if text else []) + [seq_len])}

    # ---------------------------------------------------------------- per seed
    def _seed_state(self, seed: int) -> dict:
        if self._seed is None or self._seed["seed"] != seed:
            tc, plan = self.cfg.task, self.plan
            tasks = [t for t in tc.tasks if t != "text"]
            sets = {s: [eval_set(t, n, tc, seed, s) for t in tasks for n in plan.derived["eval_lengths"]]
                    for s in ("val", "test")}
            text = {s: None for s in ("val", "test")}
            if self.text is not None:
                n = plan.derived["text_edges"][-1] + 1
                text = {s: list(text_eval(self.text, n, tc.eval_examples, s)) for s in ("val", "test")}
            self._seed = {"seed": seed, "sets": sets, "text": text, "tables": {},
                          "docs": task_docs(self.cfg, self.tc, seed, self.text, self.cfg.train.steps)}
        return self._seed

    def source(self, seed: int, arm):
        st = self._seed_state(seed)
        if arm.fit not in st["tables"]:
            st["tables"][arm.fit] = open_table(train_table(self.tc, seed, pad_pow2=arm.fit == "pad", docs=st["docs"]))
        return st["tables"][arm.fit]

    def finetune_source(self, seed: int, arm):
        ext = self.plan.extension
        docs = task_docs(self.cfg, dataclasses.replace(ext.task, train_examples=0), seed, None, self.cfg.train.steps)
        return open_table(train_table(ext.task, seed, pad_pow2=arm.fit == "pad", docs=docs))

    def _score(self, model, seed: int, split: str, scaling=None, phase: str = "pretrain") -> dict:
        st, tr = self._seed_state(seed), self.cfg.train
        tc = self.plan.extension.task if phase == "finetune" else self.cfg.task
        text = st["text"][split] if phase == "pretrain" else None
        return score(model, st["sets"][split], text, tc.train_max_len, self.plan.derived["text_edges"] or [0, 1],
                     tc, tr.critical_threshold, scaling=scaling)

    def validator(self, seed: int, phase: str = "pretrain"):
        def validate(run) -> dict:
            s = self._score(run.model, seed, "val", run.rope_scaling, phase)
            return {k: s[k] for k in ("id", "ood", "ood_score", "noise_sd", "learned")} | {
                "acc": _str_keys(s["acc"]), **({"text_loss": s["text_loss"]} if "text_loss" in s else {})}
        return validate

    def test(self, model, seed: int, scaling=None) -> dict:
        s = self._score(model, seed, "test", scaling)
        return {"id": s["id"], "ood": s["ood"], "acc": _str_keys(s["acc"]), "distinct": _str_keys(s["distinct"]),
                **({"text_loss": s["text_loss"]} if "text_loss" in s else {})}

    def extras(self, run, seed: int) -> dict:
        """Per-run figures beyond the test scores: FLOPs to the target accuracy, and the boundary diagnostic."""
        out = {"flops_to_target": flops_to_target(run.history, self.cfg.task.train_max_len, self.cfg.train.target_acc)}
        if self.text is not None:
            edges = distance_buckets(self.plan.seq_len)
            res = loss_by_boundary_distance(distributed.context().eval_model(run.model),
                                            boundary_pieces(self.plan, self.text, seed), self.plan.seq_len, run.arm,
                                            edges)
            out["boundary"] = boundary_summary(res, edges)
        return out


def len_of(task, n, tc):
    from .tasks import doc_tokens
    return doc_tokens(task, n, tc)


def _ext_len(tc, factor: float, seq_len: int) -> tuple:
    ext_tc = dataclasses.replace(tc, train_max_len=round(factor * tc.train_max_len))
    return ext_tc, next_pow2(max(max_train_doc_tokens(ext_tc), seq_len))


def _str_keys(d: dict) -> dict:
    return {t: {str(n): v for n, v in byn.items()} for t, byn in d.items()}


def task_docs(cfg, tc, seed: int, text, steps: int):
    """The seed's training documents (tokens, masks, task names), shared by every arm of the seed."""
    if not tc.train_examples:
        tc = dataclasses.replace(tc, train_examples=auto_train_examples(tc, steps, cfg.train.tokens_per_batch))
    docs = None
    if text is not None:
        L = text_train_len(tc)
        docs = text_pieces(text.train, (min(L, 2 * tc.train_min_len + 4), L), tc.text_docs, seed)
    return train_documents(tc, seed, docs)


def flops_to_target(history: list[dict], train_max_len: int, target: float) -> dict:
    """FLOPs at the first validation where a task's accuracy reached ``target`` at every ID length (None: never)."""
    reached = {}
    for h in history:
        for task, d in h["acc"].items():
            ids = [a for n, a in d.items() if int(n) <= train_max_len]
            if task not in reached and ids and min(ids) >= target:
                reached[task] = h["flops"]
    return {t: reached.get(t) for t in sorted({t for h in history for t in h["acc"]})}


def boundary_pieces(plan, text, seed: int) -> list[np.ndarray]:
    """Held-out natural text (the test windows, never used for selection) cut into pieces whose lengths are
    uniform in [BOUNDARY_FAR + 4, seq_len]: the same mix of distances for every arm, whatever the tasks."""
    L = plan.seq_len
    stream = text_eval(text, L, plan.cfg.task.eval_examples, "test").reshape(-1)
    rng = np.random.default_rng([seed, 77])
    out, at = [], 0
    lo = min(BOUNDARY_FAR + 4, L)
    while at < len(stream):
        n = int(rng.integers(lo, L + 1))
        if at + n > len(stream):
            break
        out.append(stream[at:at + n].astype(np.int32))
        at += n
    return out


def boundary_summary(res: dict, edges: list[int]) -> dict:
    """near / far / near - far / overall loss from a loss_by_boundary_distance result."""
    b = res["buckets"]
    near = [v for i, v in enumerate(b) if BOUNDARY_NEAR[0] <= edges[i] and edges[i + 1] <= BOUNDARY_NEAR[1]
            and not math.isnan(v)]
    far = [v for i, v in enumerate(b) if edges[i] >= BOUNDARY_FAR and not math.isnan(v)]
    n, f = (float(np.mean(near)) if near else math.nan), (float(np.mean(far)) if far else math.nan)
    return {"near": n, "far": f, "near_minus_far": n - f, "all": res["all"], "buckets": b, "edges": edges}


# ========================================================================================= corpus
class CorpusWorkload:
    name = "corpus"
    headline_unit = "final validation loss (nats per token)"

    def __init__(self, plan):
        from .corpus import load_corpus
        self.plan, self.cfg = plan, plan.cfg
        cc, L = self.cfg.corpus, plan.seq_len
        self.corpus = load_corpus(cc.corpus, column=cc.column, heldout_frac=cc.heldout_frac, files=cc.corpus_files,
                                  vocab_size=cc.vocab_size)
        held = self.corpus.heldout
        val, n = [], 0                                     # validation: even held-out documents, cut at L
        for d in held[0::2]:
            if n >= cc.val_tokens:
                break
            if len(d) > 1:
                val.append(np.asarray(d[:L]))
                n += len(val[-1])
        self.val = val
        # position test set: the long held-out documents (embedded: whole held-out files, which share no text with
        # training), else the odd held-out documents (disjoint from validation)
        test_held = [d for d in (self.corpus.long_heldout or held[1::2]) if len(d) > 1]
        self.edges = position_edges(L, cc.multiples)
        self.pos_docs, self.notes = choose_position_docs(test_held, self.edges, cc.pos_docs)

    @staticmethod
    def plan(cfg, arms, notes, num_params_of) -> dict:
        from .corpus import load_corpus, training_subset
        from .trainer import make_loader
        tr, cc = cfg.train, cfg.corpus
        L = tr.seq_len
        if L < 2 or L & (L - 1):
            raise ValueError(f"train.seq_len={L} must be a power of two >= 2 for a corpus (the context L and the "
                             "largest decomposition bucket)")
        if tr.min_len and (tr.min_len & (tr.min_len - 1) or tr.min_len > L):
            raise ValueError(f"train.min_len={tr.min_len} must be a power of two in [1, seq_len={L}]")
        if tr.tokens_per_batch % L:
            raise ValueError(f"train.tokens_per_batch={tr.tokens_per_batch} must be a multiple of seq_len={L} "
                             "(whole rows)")
        bad = [a.name for a in arms if a.fit == "pad"]
        if bad:
            raise ValueError(f"arms {bad}: fit=pad pads task documents to a power of two; corpus documents are not "
                             "padded (use dd_grow_p2 / dd_natural, or fit=none)")
        if tr.budget == "supervised" and not tr.budget_tokens:
            raise ValueError("train.budget_tokens must be > 0 for a corpus (the supervised tokens per arm)")
        corpus = load_corpus(cc.corpus, column=cc.column, heldout_frac=cc.heldout_frac, files=cc.corpus_files,
                             vocab_size=cc.vocab_size)
        num_params = num_params_of(corpus.vocab_size)
        sub = training_subset(corpus.train, max(tr.budget_tokens, tr.tokens_per_batch) * cc.subset_factor, 0)
        lens = sub.lengths
        budget = budget_amount(cfg, 1.0 - len(lens) / max(1, int(lens.sum())), num_params)
        per_step = {}
        for arm in arms:
            loader = make_loader(sub, arm, L, tr.tokens_per_batch * tr.grad_accum, 0, min_len=tr.min_len,
                                 cycles=cc.subset_factor, shard=(0, 1))
            per_step[arm.name] = (epoch_use(loader, tr.budget, num_params, cfg.model, arm), len(loader))
        return {"seq_len": L, "vocab": corpus.vocab_size, "budget": budget, "num_params": num_params,
                "per_step": per_step, "derived": {"corpus": corpus.name, "edges": position_edges(L, cc.multiples),
                                                   "supervised_share": 1.0 - len(lens) / max(1, int(lens.sum()))},
                "extension_len": lambda f: (None, int(round(L * f))), "learned_positions_need":
                max(position_edges(L, cc.multiples))}

    def source(self, seed: int, arm):
        from .corpus import training_subset
        tr = self.cfg.train
        return training_subset(self.corpus.train, max(tr.budget_tokens, tr.tokens_per_batch)
                               * self.cfg.corpus.subset_factor, seed)

    def finetune_source(self, seed: int, arm):
        """Long documents (> L) carry what a longer context can learn (the Llama-3 recipe upweights them): enough
        for the loader to fill whole batches in every bucket it uses, even for a tiny budget."""
        from .corpus import training_subset
        ext, tr = self.plan.extension, self.cfg.train
        tpb = max(tr.tokens_per_batch, ext.seq_len)
        return training_subset(self.corpus.train, max(int(ext.budget.amount) * self.cfg.corpus.subset_factor,
                                                      16 * tpb), seed + 100_003, min_doc_len=self.plan.seq_len + 1)

    def _kw(self, run_or_none=None) -> dict:
        cuda = distributed.context().device.type == "cuda"
        import torch
        return {"autocast": (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None,
                "loss_chunk": self.cfg.train.loss_chunk}

    def validator(self, seed: int, phase: str = "pretrain"):
        def validate(run) -> dict:
            vl = validation_loss(run.model, self.val, rope_scaling=run.rope_scaling, **self._kw())
            return {"val_loss": vl, "id": -vl}
        return validate

    def test(self, model, seed: int, scaling=None) -> dict:
        return {"loss_by_position": loss_by_position(model, self.pos_docs, self.edges, rope_scaling=scaling,
                                                     **self._kw())}

    def extras(self, run, seed: int) -> dict:
        return {}

    def tokenizer(self):
        """The tokenizer of the corpus, for an exported checkpoint: the byte tokenizer of the embedded corpus, a
        prepared directory's tokenizer.json, else None (exported without one)."""
        if not self.cfg.corpus.corpus:
            return "bytes"
        d = getattr(self.corpus.train, "prepared_dir", None)
        if d is not None and (d / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast
            return PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
        return None


WORKLOADS = {"tasks": TaskWorkload, "corpus": CorpusWorkload}
