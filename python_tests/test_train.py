"""lengen-train: tasks, knobs, budgets, metrics, early stopping, statistics, exact resume, bad inputs, and a quick
``ablate`` end to end."""
import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lengen_fast.reference import positions_from_cu_seqlens
from lengen_fast.train import cli
from lengen_fast.train.arms import ARM_PRESETS, ArmConfig, ablation_arms, parse_arm
from lengen_fast.train.config import RunConfig, TaskConfig, apply_overrides, eval_lengths, load_preset
from lengen_fast.train.evaluate import (EarlyStopper, critical_length, distance_buckets, exact_match,
                                        generalization_gap, greedy_decode, loss_by_boundary_distance, score)
from lengen_fast.train.model import Transformer
from lengen_fast.train.plan import make_plan
from lengen_fast.train.stats import interval, paired, verdict
from lengen_fast.train.trainer import Budget, Run, make_loader, model_inputs
from lengen_fast.train.workload import TaskWorkload, open_table
from lengen_fast.train import tasks as T



pytestmark = pytest.mark.usefixtures("one_thread")


SYNTH = ("copy_unique", "copy_repeat", "reverse", "parity", "majority", "addition", "passkey")


def decode_digits(toks):
    return [t - T.DIGIT0 for t in toks if T.DIGIT0 <= t < T.DIGIT0 + 10]


def split(doc, mask):
    """(prompt tokens between TASK and SEP, answer tokens before EOS)."""
    first = int(np.argmax(mask))
    return doc[2:first - 1].tolist(), doc[first:-1].tolist()


# ------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("scratchpad,hints", [(False, False), (True, True)])
@pytest.mark.parametrize("task", SYNTH)
def test_task_answers_and_exact_length(task, scratchpad, hints):
    cfg = TaskConfig(alphabet=64, scratchpad=scratchpad, index_hints=hints, passkey_digits=1 + 4 * hints)
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 13, 40):
        for _ in range(5):
            doc, mask = T.make_example(task, n, rng, cfg, "train")
            assert len(doc) == len(mask) == T.doc_tokens(task, n, cfg)
            assert doc[0] == T.BOS and doc[1] == T.TASK_IDS[task] and doc[-1] == T.EOS and mask[-1] == 1
            assert doc[int(np.argmax(mask)) - 1] == T.SEP and mask[:int(np.argmax(mask))].sum() == 0
            p, a = split(doc, mask)
            if task == "copy_unique":
                assert a == p and len(set(p)) == n
            elif task == "copy_repeat":
                assert a == p and max(p) < T.SYM0 + T.REPEAT_ALPHABET
            elif task == "reverse":
                assert a == p[::-1]
            elif task == "parity":
                bits = decode_digits(p)
                want = list(np.cumsum(bits) % 2) if scratchpad else [sum(bits) % 2]
                assert len(bits) == n and decode_digits(a) == want
            elif task == "majority":
                bits = decode_digits(p)
                assert decode_digits(a) == [int(2 * sum(bits) > n)] and 2 * sum(bits) != n
            elif task == "addition":
                plus = p.index(T.PLUS)
                x, y = decode_digits(p[:plus]), decode_digits(p[plus + 1:])
                digits = decode_digits(a)
                if scratchpad:  # (digit, carry) pairs
                    digits = digits[0::2]
                num = lambda ds: sum(d * 10 ** i for i, d in enumerate(ds))  # little-endian
                assert len(x) == len(y) == n and num(digits) == num(x) + num(y) and len(digits) == n + 1
                if hints:
                    assert p[0] == T.hint(0, cfg) and a[0] == T.hint(0, cfg)
            elif task == "passkey":
                k = p.index(T.KEY)
                assert p[k + 1:k + 1 + cfg.passkey_digits] == a and p[k + 1 + cfg.passkey_digits] == T.KEY
                assert sum(T.FILL0 <= t < T.FILL0 + T.N_FILL for t in p) == n


@settings(max_examples=60, deadline=None)
@given(task=st.sampled_from(SYNTH), n=st.integers(1, 60), seed=st.integers(0, 2**31), scratch=st.booleans(),
       hints=st.booleans(), split=st.sampled_from(["train", "eval"]))
def test_task_lengths_and_splits_fuzzed(task, n, seed, scratch, hints, split):
    cfg = TaskConfig(alphabet=64, scratchpad=scratch, index_hints=hints, passkey_digits=1 + seed % 5)
    try:
        doc, mask = T.make_example(task, n, np.random.default_rng(seed), cfg, split)
    except ValueError as e:  # e.g. parity n=2 has 4 prompts, none of them in the eval hash class
        assert "prompt space is too small" in str(e) and n <= 2 and split == "eval"
        return
    assert len(doc) == T.doc_tokens(task, n, cfg) and doc.dtype == np.int32 and mask.dtype == np.uint8
    assert T.is_eval_prompt(task, split_doc := doc[2:int(np.argmax(mask)) - 1].tolist()) == (split == "eval")
    assert max(split_doc) < T.text_base(cfg) and mask.sum() == len(doc) - int(np.argmax(mask))


def test_no_leakage_between_train_and_eval():
    cfg = TaskConfig(tasks=["copy_repeat", "parity", "addition", "passkey"], train_min_len=3, train_max_len=8,
                     train_examples=300, eval_examples=40)
    docs, masks, names = T.train_documents(cfg, seed=0)
    train_prompts = {(nm, tuple(split(d, m)[0])) for d, m, nm in zip(docs, masks, names)}
    assert all(not T.is_eval_prompt(nm, list(p)) for nm, p in train_prompts)
    for task in cfg.tasks:
        for n in eval_lengths(cfg):  # 1x is inside the training range: still disjoint
            es = T.eval_set(task, n, cfg, seed=0, split="test")
            assert es.tokens.shape[1] == T.doc_tokens(task, n, cfg) and 1 <= es.distinct <= cfg.eval_examples
            for d, m in zip(es.tokens, es.loss_mask):
                assert (task, tuple(split(d, m)[0])) not in train_prompts
                assert T.is_eval_prompt(task, split(d, m)[0])
    assert sorted({len(d) for d in docs}) != []  # sizes vary over the training range
    assert {T.doc_tokens("parity", n, cfg) for n in range(3, 9)} >= {len(d) for d, nm in zip(docs, names)
                                                                        if nm == "parity"}


def test_vsl_padding_keeps_examples_whole():
    cfg = TaskConfig(tasks=["copy_unique"], train_max_len=9, train_examples=50)
    table = T.train_table(cfg, 0, pad_pow2=True)
    for ids, m in zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()):
        assert len(ids) & (len(ids) - 1) == 0
        end = ids.index(T.EOS) + 1
        assert set(ids[end:]) <= {T.PAD} and sum(m[end:]) == 0


# ----------------------------------------------------------------------------------- metrics
class Oracle(torch.nn.Module):
    """Predicts the true next token of known documents, except for a chosen set of wrong ones."""

    def __init__(self, docs, wrong, vocab):
        super().__init__()
        self.docs = {tuple(int(t) for t in d): i for i, d in enumerate(docs)}
        self.wrong, self.vocab = wrong, vocab

    def forward(self, tokens, cu, max_seqlen, positions):
        out = torch.zeros(tokens.shape[0], self.vocab)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            seg = tokens[a:b].tolist()
            i = next(i for d, i in self.docs.items() if d[:len(seg)] == tuple(seg))
            full = list(next(d for d, j in self.docs.items() if j == i))
            for t in range(b - a):
                nxt = full[t + 1] if t + 1 < len(full) else 0
                out[a + t, (nxt + 1) % self.vocab if (i in self.wrong and t == len(full) - 2) else nxt] = 1.0
        return out


def test_exact_match_counts_whole_answers():
    cfg = TaskConfig(eval_examples=10)
    es = T.eval_set("reverse", 5, cfg, 0, "val")
    acc, tok = exact_match(Oracle(es.tokens, wrong={1, 4, 7}, vocab=200), es)
    assert acc == pytest.approx(0.7)
    n_ans = int(es.loss_mask[0, 1:].sum())
    assert tok == pytest.approx(1 - 3 / (10 * n_ans))


def test_teacher_forced_exact_match_equals_greedy_decoding():
    torch.manual_seed(0)
    cfg = TaskConfig(eval_examples=24, alphabet=8)
    model = Transformer(RunConfig().model, 200)
    es = T.eval_set("copy_repeat", 4, cfg, 0, "val")
    first = int(np.argmax(es.loss_mask[0]))
    out = greedy_decode(model, es.tokens[:, :first], es.tokens.shape[1] - first)
    want = float((out == es.tokens[:, first:]).all(1).mean())
    assert exact_match(model, es)[0] == want
    # a model that learned nothing scores 0; the oracle scores 1 through the same decoding loop
    oracle = Oracle(es.tokens, wrong=set(), vocab=200)
    assert (greedy_decode(oracle, es.tokens[:, :first], es.tokens.shape[1] - first) == es.tokens[:, first:]).all()


def test_gap_and_critical_length():
    acc = {8: 1.0, 16: 0.6, 32: 0.1}
    assert generalization_gap(acc, 8) == pytest.approx(1.0 - 0.35)
    assert critical_length(acc, 0.5) == 16 and critical_length(acc, 0.95) == 8 and critical_length(acc, 1.1) == 0
    assert math.isnan(generalization_gap({8: 1.0}, 8))


def test_val_and_test_prompts_are_disjoint_at_every_length():
    """Including lengths whose prompt space is small (majority/parity at n=8: about a dozen per split)."""
    cfg = TaskConfig(tasks=["majority", "parity", "passkey", "copy_repeat"], eval_examples=64)
    for task in cfg.tasks:
        for n in (3, 5, 8, 16):
            try:
                val, test = (T.eval_set(task, n, cfg, seed=1, split=s) for s in ("val", "test"))
            except ValueError as e:
                assert "no val prompts" in str(e) or "no test prompts" in str(e)
                continue
            pv = {tuple(split(d, m)[0]) for d, m in zip(val.tokens, val.loss_mask)}
            pt = {tuple(split(d, m)[0]) for d, m in zip(test.tokens, test.loss_mask)}
            assert len(pv) == val.distinct and len(pt) == test.distinct       # no prompt twice within a set
            assert not pv & pt
            assert all(T.prompt_split(task, list(p)) == "val" for p in pv)
            assert all(T.prompt_split(task, list(p)) == "test" for p in pt)
    small = T.eval_set("majority", 8, cfg, 0, "test")
    assert 0 < small.distinct < cfg.eval_examples  # 186 majority prompts at n=8, ~1/16 of them per split


# ----------------------------------------------------------------------------- tiny runs and plans
def tiny_cfg(tmp_path, **train) -> RunConfig:
    cfg = RunConfig()
    m, t, tr = cfg.model, cfg.task, cfg.train
    m.d_model, m.n_layers, m.n_heads, m.max_positions = 16, 1, 2, 128
    t.tasks, t.train_min_len, t.train_max_len, t.eval_multiples = ["passkey", "majority"], 2, 6, [1.0, 2.0]
    t.eval_examples = 12
    tr.steps, tr.evals, tr.tokens_per_batch, tr.warmup_frac, tr.seeds = 8, 2, 256, 0.25, [0, 1]
    tr.arms = ["pack_naive", "pack_masked"]
    cfg.extension.extend = False
    cfg.progress = False
    cfg.out = str(tmp_path / "run")
    for k, v in train.items():
        setattr(tr, k, v)
    return cfg


def quiet_plan(cfg, mode="run"):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_plan(cfg, "test", mode)


def tiny_table(cfg, seed=0, fit="none"):
    plan = quiet_plan(cfg)
    tc = replace(cfg.task, train_examples=plan.derived["train_examples"])
    return plan, T.train_table(tc, seed, pad_pow2=fit == "pad")


def first_batch(table, arm, plan, seed=0):
    loader = make_loader(open_table(table), arm, plan.seq_len, plan.cfg.train.tokens_per_batch, seed)
    return loader, next(iter(loader))


# ------------------------------------------------------------------------------------------ knobs
def test_attention_and_position_knobs_change_exactly_what_they_name(tmp_path):
    plan, table = tiny_table(tiny_cfg(tmp_path))
    _, batch = first_batch(table, ARM_PRESETS["pack_masked"], plan)
    real = int(batch.num_tokens)
    outs = {}
    for att in ("row", "document"):
        for pos in ("row", "document"):
            arm = ArmConfig(f"{att}-{pos}", packing="bfd", attention=att, positions=pos)
            outs[att, pos] = model_inputs(batch, arm)
    for (att, pos), (tokens, cu, _, positions, labels) in outs.items():
        assert torch.equal(tokens, outs["row", "row"][0]) and torch.equal(labels, outs["row", "row"][4])
        want_cu = batch.row_cu_seqlens if att == "row" else batch.cu_seqlens
        assert torch.equal(cu, want_cu.to(torch.int32))
        want_pos = (positions_from_cu_seqlens(batch.row_cu_seqlens, tokens.shape[0]) if pos == "row"
                    else torch.as_tensor(batch.position_ids))
        assert torch.equal(positions[:real], want_pos[:real]) and (positions[real:] == 0).all()
    # the example: row-spanning segments with per-document positions
    _, cu, _, positions, _ = outs["row", "document"]
    assert cu.numel() < batch.cu_seqlens.numel()                    # rows hold several documents
    starts = batch.cu_seqlens[:-1].long()
    assert (positions[starts] == 0).all() and not (positions[cu[:-1].long()] != 0).any()


def test_packing_and_fit_knobs(tmp_path):
    cfg = tiny_cfg(tmp_path)
    plan, table = tiny_table(cfg)
    _, padded = tiny_table(cfg, fit="pad")
    lens = np.asarray([len(x) for x in table.column("input_ids").to_pylist()])
    plens = np.asarray([len(x) for x in padded.column("input_ids").to_pylist()])
    assert (plens & (plens - 1) == 0).all() and (plens >= lens).all() and (plens > lens).any()
    # fit=pad appends loss-masked PAD only: the supervised tokens of every document are unchanged
    assert [sum(m) for m in table.column("loss_mask").to_pylist()] == [sum(m) for m in padded.column("loss_mask").to_pylist()]
    cut = {}
    for packing in ("concat", "bfd", "decompose"):
        arm = ArmConfig(packing, packing=packing)
        loader, _ = first_batch(padded if packing == "decompose" else table, arm, plan)
        src_len = np.asarray(loader.source.lengths)
        n_cut = 0
        for s in range(len(loader)):
            _, _, doc, start, length, _ = loader.pieces(0, s)
            n_cut += int(((start != 0) | (length != src_len[doc])).sum())
        cut[packing] = n_cut
    assert cut["concat"] > 0 and cut["bfd"] == 0 and cut["decompose"] == 0  # pad + decompose keeps documents whole
    # without padding, decomposition cuts documents into power-of-two pieces
    loader, _ = first_batch(table, ArmConfig("d", packing="decompose"), plan)
    src_len = np.asarray(loader.source.lengths)
    assert any(((loader.pieces(0, s)[3] != 0) | (loader.pieces(0, s)[4] != src_len[loader.pieces(0, s)[2]])).any()
               for s in range(len(loader)))


def test_curriculum_knob_reorders_buckets_only(tmp_path):
    cfg = tiny_cfg(tmp_path)
    plan, padded = tiny_table(cfg, fit="pad")
    seqs, pieces = {}, {}
    for cur in ("natural", "grow_p2"):
        arm = ArmConfig(cur, packing="decompose", curriculum=cur, fit="pad")
        loader, _ = first_batch(padded, arm, plan)
        seqs[cur] = [loader.pieces(0, s)[1] for s in range(len(loader))]
        pieces[cur] = sorted((int(d), int(a)) for s in range(len(loader)) for d, a in zip(*loader.pieces(0, s)[2:4]))
    assert sorted(seqs["natural"]) == sorted(seqs["grow_p2"]) and pieces["natural"] == pieces["grow_p2"]
    assert seqs["natural"] != seqs["grow_p2"]
    g = seqs["grow_p2"][1:]  # grow_p2: short buckets first (step 0 holds the longest bucket, to surface OOM early)
    assert np.mean(g[:len(g) // 2]) < np.mean(g[len(g) // 2:])


@pytest.mark.parametrize("spec,match", [
    ("x:packing=bfd,curriculum=grow_p2", "cannot run with packing=bfd"),
    ("x:packing=concat,cycles=2", "cannot run with packing=concat"),
    ("x:packing=zip", "packing='zip' is not one of"),
    ("x:attention=doc", "attention='doc' is not one of"),
    ("x:speed=fast", "unknown knob 'speed'"),
    ("vsl:packing=bfd", "must be a new, plain name"),
    ("nope", "unknown arm 'nope'"),
    ("x:base=fancy", "base='fancy' is not a preset"),
])
def test_bad_arm_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_arm(spec)


def test_arm_specs_and_presets():
    a = parse_arm("mine:base=vsl,curriculum=natural,cycles=2")
    assert a.knobs() == {**ARM_PRESETS["vsl"].knobs(), "curriculum": "natural", "cycles": 2} and a.name == "mine"
    assert ARM_PRESETS["pack_naive"].knobs() == {**ARM_PRESETS["pack_masked"].knobs(), "attention": "row",
                                                 "positions": "row"}


def test_ablation_arms_change_one_knob_each():
    arms = ablation_arms(ARM_PRESETS["vsl"])
    base = arms[0][1]
    assert arms[0][0] == "base" and base == ARM_PRESETS["vsl"]
    for factor, arm, note in arms[1:]:
        diff = {k for k in arm.knobs() if arm.knobs()[k] != base.knobs()[k]}
        if note:  # packing away from decompose takes curriculum natural with it, and says so
            assert factor == "packing" and diff == {"packing", "curriculum"} and "natural" in note
        else:
            assert diff == {factor}
    assert {f for f, _, _ in arms} == {"base", "packing", "attention", "positions", "curriculum", "fit"}


# ----------------------------------------------------------------------------------------- budgets
def make_run(plan, run_dir, arm="pack_masked", seed=0, budget=None):
    W = TaskWorkload(plan)
    a = plan.arm(arm)
    return Run(plan, a, seed, W.source(seed, a), run_dir, budget=budget or plan.budget, seq_len=plan.seq_len,
               lr=plan.cfg.train.lr, validate=W.validator(seed))


def test_arms_spend_equal_supervised_tokens_within_one_batch(tmp_path):
    cfg = tiny_cfg(tmp_path, arms=["concat_chunk", "pack_masked", "vsl"], seeds=[0])
    plan = quiet_plan(cfg)
    budget = plan.budget.amount
    spent, steps = {}, {}
    for arm in plan.arms:
        t = make_run(plan, tmp_path / arm.name, arm.name)
        t.train_until(budget)
        acct = t.accounting()
        assert acct["budget_met"] and acct["supervised"] >= budget
        assert acct["slots"] == t.step * cfg.train.tokens_per_batch
        tail = acct["slots"] - acct["tokens"]                      # empty slots after the last piece of a batch
        if arm.fit == "pad":                                         # + the PAD tokens inside padded documents
            assert acct["padding"] > tail
        else:
            assert acct["padding"] == tail
        spent[arm.name], steps[arm.name] = acct, t.step
    # every arm stopped at the first step that reached the budget: less than one batch of supervised tokens over
    per_batch = max(a["supervised"] / a["steps"] for a in spent.values())
    for a in spent.values():
        assert a["supervised"] - budget < 2 * per_batch
    assert max(a["supervised"] for a in spent.values()) - min(a["supervised"] for a in spent.values()) < 2 * per_batch
    # the padded arm pays for its padding with more steps; concat cuts documents, the others do not
    assert spent["vsl"]["padding"] > spent["pack_masked"]["padding"] - 1 and steps["vsl"] >= steps["pack_masked"]
    assert spent["concat_chunk"]["pieces_cut"] > 0 and spent["pack_masked"]["pieces_cut"] == 0
    assert spent["vsl"]["pieces_cut"] == 0 and spent["concat_chunk"]["documents_cut"] > 0


def test_lr_follows_the_budget_not_the_step(tmp_path):
    """Warmup then cosine by the fraction of the budget spent: arms that need different step counts follow the
    same schedule per supervised token."""
    plan = quiet_plan(tiny_cfg(tmp_path))
    t = make_run(plan, tmp_path / "lr")
    tr = plan.cfg.train
    t.acct["supervised"] = int(plan.budget.amount * tr.warmup_frac / 2)
    assert t.lr_at() == pytest.approx(tr.lr / 2, rel=1e-2)          # (the token count is rounded)
    t.acct["supervised"] = int(plan.budget.amount * tr.warmup_frac)
    assert t.lr_at() == pytest.approx(tr.lr, rel=1e-2)
    t.acct["supervised"] = int(plan.budget.amount)
    assert t.lr_at() == pytest.approx(tr.lr * tr.min_lr_frac)


# ---------------------------------------------------------------------------------- early stopping
def fire(series, learned=True, noise=0.0, **kw):
    es = EarlyStopper(**{"drop": 0.05, "z": 2.0, "min_steps": 0, "patience": 1, **kw})
    for i, v in enumerate(series):
        es.update(100 * (i + 1), v, learned, noise)
    return es


def test_early_stopping_fires_on_a_real_drop_and_keeps_the_best():
    es = fire([0.2, 0.5, 0.6, 0.3])
    assert es.stopped_at == 400 and es.best_step == 300 and "below" in es.reason


def test_early_stopping_never_fires_before_the_task_is_learned():
    es = fire([0.2, 0.5, 0.6, 0.3, 0.1], learned=False)
    assert es.stopped_at is None and es.best_step == 300


def test_early_stopping_ignores_dips_within_the_noise():
    # a 0.10 dip from 0.60 is 17% (> drop 5%) but within 2 x noise sd 0.06
    assert fire([0.2, 0.6, 0.5, 0.5], noise=0.06).stopped_at is None
    assert fire([0.2, 0.6, 0.45], noise=0.06).stopped_at == 300


def test_early_stopping_respects_min_steps_and_patience():
    assert fire([0.6, 0.1, 0.6], min_steps=250).stopped_at is None
    assert fire([0.6, 0.1, 0.6, 0.1, 0.1], patience=2).stopped_at == 500
    es = fire([0.6, 0.1, 0.9, 0.95])  # frozen once fired: the recipe keeps its best from before the stop
    assert es.stopped_at == 200 and es.best_step == 100


def test_score_noise_sd_follows_the_validation_size():
    cfg = TaskConfig(tasks=["majority"], eval_examples=24)
    sets = [T.eval_set("majority", n, cfg, 0, "val") for n in (4, 9)]
    docs = [d for es in sets for d in es.tokens]
    res = score(Oracle(docs, set(), 200), sets, None, 4, [], cfg, learned=0.9)
    n = sets[1].distinct
    assert res["learned"] and res["ood_score"] == 1.0
    assert res["noise_sd"] == pytest.approx(math.sqrt(2 * 0.25 / n) / 0.5)  # chance 0.5 doubles the corrected sd
    res = score(Oracle(docs, set(range(len(docs))), 200), sets, None, 4, [], cfg, learned=0.9)
    assert not res["learned"] and res["ood_score"] == 0.0


# ------------------------------------------------------------------------------------- statistics
def test_interval_and_verdict_on_fixed_inputs():
    ci = interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["n"] == 3
    assert ci["hi"] - 2.0 == pytest.approx(4.303 * 1.0 / math.sqrt(3))         # t(0.975, 2) * s / sqrt(n)
    one = interval([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["lo"]) and verdict(one) == "inconclusive"
    d = paired([0.9, 0.8, 0.95], [0.3, 0.35, 0.2])                           # clearly above zero
    assert d["lo"] > 0 and verdict(d) == "holds"
    assert verdict(paired([0.3, 0.35, 0.2], [0.9, 0.8, 0.95])) == "opposite"
    mixed = paired([0.9, 0.2, 0.6], [0.5, 0.6, 0.5])                          # interval contains zero
    assert mixed["lo"] < 0 < mixed["hi"] and verdict(mixed) == "inconclusive"
    assert paired([1.0, None, 0.5], [0.0, 0.3, 0.5])["n"] == 2              # a missing seed drops its pair
    with pytest.raises(ValueError, match="paired"):
        paired([1.0], [1.0, 2.0])


def test_boundary_loss_layout_follows_the_arm():
    """Under document attention and positions a piece's losses do not depend on what is packed before it."""
    torch.manual_seed(0)
    model = Transformer(RunConfig().model, 120).eval()
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 120, int(n)).astype(np.int32) for n in rng.integers(6, 14, 10)]
    edges = distance_buckets(16)
    masked, naive = ARM_PRESETS["pack_masked"], ARM_PRESETS["pack_naive"]
    a = loss_by_boundary_distance(model, pieces, 32, masked, edges)
    b = loss_by_boundary_distance(model, pieces[::-1], 32, masked, edges)
    np.testing.assert_allclose(a["buckets"], b["buckets"], rtol=1e-5)
    c = loss_by_boundary_distance(model, pieces, 32, naive, edges)
    assert not np.allclose(a["buckets"], c["buckets"]) and all(x > 0 for x in c["buckets"] if not math.isnan(x))


# ------------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("arm", ["pack_masked", "vsl"])
def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, arm):
    cfg = tiny_cfg(tmp_path, pos_offset_max=8, arms=[arm])
    cfg.model.dropout = 0.1
    plan = quiet_plan(cfg)
    budget = Budget("steps", 6, 6)

    def go(run, upto):
        for goal in (3, 6):
            if goal <= upto and run.step < goal:
                run.train_until(goal)
                run.evaluate()
        return run
    full = go(make_run(plan, tmp_path / "a", arm, budget=budget), 6)
    part = go(make_run(plan, tmp_path / "b", arm, budget=budget), 3)
    assert part.step == 3
    resumed = make_run(plan, tmp_path / "c", arm, budget=budget)
    resumed.load(tmp_path / "b" / "last.pt")
    go(resumed, 6)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]  # bit-exact on CPU
    assert len(full.history) == 2 and resumed.acct == full.acct
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- bad inputs
def bad(tmp_path, **kw):
    cfg = tiny_cfg(tmp_path)
    for dotted, v in kw.items():
        sec, name = dotted.split("__")
        setattr(getattr(cfg, sec), name, v)
    return cfg


@pytest.mark.parametrize("kw,match", [
    ({"task__tasks": ["copy", "parity"]}, r"task.tasks must be one of"),
    ({"train__arms": ["pack"]}, "unknown arm 'pack'"),
    ({"train__arms": ["x:packing=bfd,curriculum=grow_p2"]}, "cannot run with packing=bfd"),
    ({"train__arms": ["vsl", "vsl"]}, "must be unique"),
    ({"train__max_steps_factor": 1.0, "train__arms": ["vsl"]}, r"arm 'vsl' cannot reach the budget"),
    ({"train__tokens_per_batch": 8}, "tokens_per_batch=8 is smaller than the row length"),
    ({"model__pos_encoding": "alibi"}, r"model.pos_encoding must be one of"),
    ({"extension__extend": True, "extension__scalings": ["longrope2"]}, r"extension.scalings must be one of"),
    ({"task__tasks": ["copy_unique"], "task__alphabet": 8}, "copy_unique at eval length 12 needs alphabet"),
    ({"model__pos_encoding": "learned", "model__max_positions": 16}, "max_positions=16 is too small"),
    ({"train__seq_len": 8}, "seq_len=8 is shorter than the longest training document"),
    ({"train__seq_len": 24, "train__arms": ["vsl"]}, "seq_len=24 must be a power of two"),
    ({"train__baseline": "vsl"}, "train.baseline='vsl' is not an arm"),
    ({"train__seeds_auto": True}, "needs a target --mde > 0"),
    ({"train__workers": 2, "dist__nproc": 2}, "parallel seed workers and data parallelism"),
    ({"task__tasks": ["parity"], "task__train_max_len": 2, "task__eval_multiples": [1.0, 2.0]},
     "has no (val|test) prompts at n=2"),
    ({"extension__extend": True, "extension__ext_arm": "fancy"}, "ext_arm='fancy' is neither"),
])
def test_bad_config_raises_before_training(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        quiet_plan(bad(tmp_path, **kw))


@pytest.mark.parametrize("flag,value,field", [
    ("--lr", "0", "train.lr"), ("--lr", "nan", "train.lr"), ("--lr", "inf", "train.lr"),
    ("--weight-decay", "-0.1", "train.weight_decay"), ("--dropout", "1.0", "model.dropout"),
    ("--dropout", "-0.5", "model.dropout"), ("--n-heads", "0", "model.n_heads"),
    ("--d-model", "33", "model.d_model=33 must be divisible by model.n_heads"),
    ("--d-model", "30", "must be even (RoPE rotates pairs)"),
    ("--n-layers", "0", "model.n_layers"), ("--rope-base", "1", "model.rope_base"),
    ("--steps", "0", "train.steps"), ("--evals", "0", "train.evals"), ("--mde", "-1", "train.mde"),
    ("--workers", "-1", "train.workers"), ("--warmup-frac", "1", "train.warmup_frac"),
    ("--model", "gpt9", "model.arch"),
    ("--grad-clip", "inf", "train.grad_clip"), ("--early-stop-drop", "1.5", "train.early_stop_drop"),
    ("--early-stop-z", "-1", "train.early_stop_z"), ("--min-lr-frac", "2", "train.min_lr_frac"),
    ("--target-acc", "1.5", "train.target_acc"), ("--max-steps-factor", "0.5", "train.max_steps_factor"),
    ("--eval-examples", "0", "task.eval_examples"), ("--eval-multiples", "1,-2", "task.eval_multiples"),
    ("--train-min-len", "9", "task.train_min_len=9 must be <= task.train_max_len"),
    ("--seeds", "1,1", "train.seeds has repeats"), ("--budget", "slots", "train.budget"),
    ("--factor", "0.5", "extension.factor"), ("--attn-backend", "flash", "train.attn_backend"),
    ("--nproc", "0", "dist.nproc"),
])
def test_cli_names_each_bad_field(tmp_path, capsys, flag, value, field):
    assert cli.main(["--preset", "quick", "--out", str(tmp_path / "x"), flag, value]) == 2
    err = capsys.readouterr().err
    assert "lengen-train: error:" in err and field in err


def test_bad_preset_files_are_named(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"train": {"steps": 3,}')
    listy = tmp_path / "listy.json"
    listy.write_text('[1, 2]')
    secs = tmp_path / "secs.json"
    secs.write_text('{"train": 5}')
    for path, what in ((broken, "is not valid JSON"), (listy, "must be a JSON object"), (secs, "must be a JSON object")):
        assert cli.main(["--preset", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and what in err
    assert cli.main(["--preset", "nope"]) == 2
    assert "preset 'nope' not found" in capsys.readouterr().err


def test_too_few_seeds_warns(tmp_path):
    # The tiny config also warns about its small prompt spaces (a property of the config, not of the seeds):
    # every warning is accounted for, so none leaks into the test summary.
    for seeds, match in (([0], "needs at least 2 seeds"), ([0, 1], "very wide")):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            make_plan(tiny_cfg(tmp_path, seeds=seeds))
        msgs = [str(w.message) for w in got]
        assert any(match in m for m in msgs), msgs
        assert all(match in m or m.startswith("small prompt spaces") for m in msgs), msgs


def test_short_eval_lengths_warn_and_missing_output_parent(tmp_path, capsys):
    assert cli.main(["--preset", "quick", "--tasks", "passkey", "--eval-multiples", "0.5,1,2",
                     "--out", str(tmp_path / "no" / "x")]) == 2
    err = capsys.readouterr().err
    assert "warning: eval_multiples [0.5] are below 1" in err and "does not exist" in err


def test_resume_needs_the_run_and_the_same_config(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["--preset", "quick", "--out", str(out), "--no-progress", "--seeds", "1", "--tasks", "passkey",
            "--no-extend", "--arms", "pack_masked", "--workers", "1"]
    assert cli.main(argv + ["--resume"]) == 2
    assert "config.json' does not exist, so there is no run to resume" in capsys.readouterr().err
    assert cli.main(argv) == 0
    first = json.loads((out / "report.json").read_text())
    assert cli.main(argv + ["--resume"]) == 0                        # a finished seed is read back, not re-run
    assert "seed 0: finished earlier" in capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())
    assert again["runs"][0]["history"] == first["runs"][0]["history"]
    # a changed result-affecting field is refused, naming it and both values; progress is free to change
    assert cli.main(argv + ["--resume", "--d-model", "64", "--lr", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "model.d_model: 32 (run) != 64 (now)" in err and "train.lr: 0.003 (run) != 0.001 (now)" in err
    for flags, says in ((["--seeds", "0,1"], "train.seeds: [0] (run) != [0, 1] (now)"),
                        (["--budget-tokens", "5000"], "train.budget_tokens: 0 (run) != 5000 (now)"),
                        (["--arms", "pack_naive"], "train.arms: ['pack_masked'] (run) != ['pack_naive'] (now)")):
        assert cli.main(argv + ["--resume", *flags]) == 2
        assert says in capsys.readouterr().err
    assert cli.main(argv + ["--resume", "--progress", "--workers", "2"]) == 0   # settings that change no result
    (out / "seeds" / "seed_0.json").unlink()                        # not finished: continue from the checkpoint
    (out / "ckpt" / "pack_masked_s0" / "last.pt").write_bytes(b"\x00garbage")
    assert cli.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "last.pt" in err and "best_id.pt exists" in err


@pytest.mark.parametrize("preset,workload", [("quick", "tasks"), ("default", "tasks"), ("long", "tasks"),
                                             ("quick", "corpus")])
def test_presets_validate(preset, workload, tmp_path):
    cfg = RunConfig()
    apply_overrides(cfg, load_preset(preset, workload))
    assert cfg.workload == workload
    cfg.out = str(tmp_path / "p")
    quiet_plan(cfg)


def test_flags_map_onto_the_dataclasses():
    cmd, cfg = cli.config_from_args(["compare", "--task", "parity", "--d-model", "48", "--no-tie-embeddings",
                                     "--seeds", "0,1,2", "--eval-multiples", "1,3", "--preset", "quick",
                                     "--arm", "mine:packing=bfd,attention=row,positions=document"])
    assert cmd == "compare" and cfg.task.tasks == ["parity"] and cfg.model.d_model == 48
    assert cfg.model.tie_embeddings is False and cfg.train.seeds == [0, 1, 2] and cfg.task.eval_multiples == [1.0, 3.0]
    assert cfg.train.arms == ["concat_chunk", "pack_naive", "pack_masked", "vsl",
                              "mine:packing=bfd,attention=row,positions=document"]
    assert cfg.train.steps == load_preset("quick")["train"]["steps"]
    cmd, cfg = cli.config_from_args(["ablate", "--base", "pack_masked"])
    assert cmd == "ablate" and cfg.train.arms[0] == "pack_masked" and len(cfg.train.arms) == 6
    with pytest.raises(ValueError, match="--task belongs to"):
        cli.config_from_args(["--task", "parity"])
    assert cli.config_from_args(["--seeds", "4"])[1].train.seeds == [0, 1, 2, 3]       # a count
    assert cli.config_from_args(["--seeds", "5,"])[1].train.seeds == [5]               # one explicit seed
    assert cli.config_from_args(["--seeds", "auto", "--mde", "0.1"])[1].train.seeds_auto


def test_seeds_zero_is_refused_with_the_rule(capsys):
    with pytest.raises(SystemExit):
        cli.config_from_args(["--seeds", "0"])
    assert "a bare number is a count of seeds" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- end to end
def test_ablate_end_to_end(tmp_path, capsys):
    out = tmp_path / "ab"
    argv = ["ablate", "--base", "pack_masked", "--out", str(out), "--no-progress", "--d-model", "16", "--n-layers", "1",
            "--n-heads", "2", "--tasks", "passkey,text", "--train-max-len", "6", "--eval-multiples", "1,2",
            "--eval-examples", "8", "--text-docs", "40", "--steps", "6", "--evals", "2",
            "--tokens-per-batch", "256", "--warmup-frac", "0.2", "--seeds", "0,1", "--no-extend"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| factor | change |" in printed
    rep = json.loads((out / "report.json").read_text())
    names = [a["name"] for a in rep["arms"]]
    assert names[0] == "pack_masked" and len(names) == 6
    assert rep["ablation"]["base"] == "pack_masked"
    assert {v["factor"] for v in rep["ablation"]["variants"]} == {"packing", "attention", "positions", "fit"}
    assert len(rep["runs"]) == 6 * 2
    for r in rep["runs"]:
        a = r["accounting"]
        assert a["budget_met"] and a["supervised"] >= rep["derived"]["budget"]
        for k in ("tokens", "supervised", "padding", "documents_seen", "documents_cut", "epochs", "pieces_cut"):
            assert k in a
        assert set(r["test"]) == {"final", "best_id", "best_ood"} and r["test"]["final"]["acc"]["passkey"]
        assert r["boundary"] and {"near", "far", "near_minus_far", "all"} <= set(r["boundary"])
        assert set(r["knobs"]) == {"packing", "attention", "positions", "curriculum", "cycles", "fit"}
    run = rep["run"]                                                     # how it ran (issue 16)
    assert run["processes"]["world_size"] == 1 and run["processes"]["parallel"] == "none"
    assert run["dtype"] == "float32" and run["device"]["type"] == "cpu" and run["command"]
    assert set(run["backends"]) >= {"attention", "rope", "data"}
    md = (out / "report.md").read_text()
    assert md.startswith("# lengen-train report\n\n## How this ran\n")
    assert "- processes: 1 process\n" in md and "- dtype: float32\n" in md
    assert "| pack_masked-attention-row vs pack_masked | final | passkey exact match at n=12 (2×) |" in md  # cells
    for section in ("Arms: the knobs", "Budgets", "Ablation: one factor at a time", "final checkpoint",
                    "Headline comparisons", "MDE (80% power)",
                    "best in-distribution validation checkpoint", "Best-OOD selection", "FLOPs to target",
                    "seeds that reached it", "distance from the document start"):
        assert section in md
    assert "very wide" in md  # the two-seed warning is in the report
    assert (out / "accuracy_vs_length.png").stat().st_size > 1000


def test_progress_in_a_log_is_a_few_lines_per_run_not_one_per_step(tmp_path, capsys, monkeypatch):
    """Off a terminal (captured stderr is not a tty) each (arm, seed) run prints a start line, one line per
    evaluation and a done line, plus one status line per LENGEN_PROGRESS_INTERVAL seconds: set here beyond
    the run's length, so the count is exact and does not depend on the machine's speed."""
    monkeypatch.setenv("LENGEN_PROGRESS_INTERVAL", "3600")
    out = tmp_path / "p"
    argv = ["--out", str(out), "--arms", "pack_masked,vsl", "--seeds", "1", "--no-extend", "--tasks", "copy_unique",
            "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--train-max-len", "6", "--eval-multiples", "1,2",
            "--eval-examples", "8", "--steps", "24", "--evals", "3", "--tokens-per-batch", "128",
            "--warmup-frac", "0.05", "--threads", "1"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["runs"]) == 2
    for r in rep["runs"]:
        mine = [line for line in err.splitlines() if line.startswith(f"[{r['arm']} seed 0] ")]
        evals = len(r["history"])
        assert len(mine) == 2 + evals, mine                     # start, the evaluations, done: not one per step
        assert evals >= 2 and r["steps"] >= 3 * len(mine)
        assert mine[0].startswith(f"[{r['arm']} seed 0] start at 0 tok of ")   # progress in budget units
        assert sum(": eval loss=" in line for line in mine) == evals
        assert mine[-1].startswith(f"[{r['arm']} seed 0] done: ")
    assert "\r" not in err                                      # no tqdm redraws in a log


def test_text_from_the_embedded_corpus(tmp_path):
    cfg = TaskConfig(tasks=["text"], train_max_len=8)
    text = T.load_text(cfg)
    base = T.text_base(cfg)
    assert text.vocab == 257 and text.train and text.heldout          # bytes and the end-of-document token
    train_ids = {d.tobytes() for d in text.train}
    assert not any(d.tobytes() in train_ids for d in text.heldout)  # held out by file (corpus.heldout_mask)
    L = T.text_train_len(cfg)
    pieces = T.text_pieces(text.train, (5, L), 50, seed=0)
    assert len(pieces) == 50 and all(5 <= len(p) <= L and p.min() >= base for p in pieces)
    ev = T.text_eval(text, 4 * L, 6, "val")
    assert ev.shape == (6, 4 * L) and ev.min() >= base
    assert not np.array_equal(ev, T.text_eval(text, 4 * L, 6, "test"))


def test_ood_score_ignores_unlearned_tasks_and_corrects_for_guessing():
    cfg = TaskConfig(tasks=["majority", "reverse"], eval_examples=8)
    sets = [T.eval_set(t, n, cfg, 0, "val") for t in cfg.tasks for n in (5, 9)]
    # an oracle right everywhere except reverse at n=5 (ID): reverse is not learned and counts 0
    docs = [d for es in sets for d in es.tokens]
    rev5 = T.doc_tokens("reverse", 5, cfg)
    wrong = {i for i, d in enumerate(docs) if d[1] == T.TASK_IDS["reverse"] and len(d) == rev5}
    assert len(wrong) == sets[2].distinct
    res = score(Oracle(docs, wrong, 200), sets, None, 5, [], cfg, learned=0.9)
    assert res["acc"]["majority"] == {5: 1.0, 9: 1.0} and res["acc"]["reverse"][5] == 0.0
    assert res["ood_score"] == pytest.approx(0.5)  # (majority 1.0 + reverse 0) / 2


def test_quick_run_prints_no_warning(tmp_path):
    """Issue 22: `lengen-train` printed torch's "non-writable NumPy array" UserWarning (the cached, read-only
    evaluation arrays were wrapped without a copy). In a fresh process (torch warns once per process), every
    warning is an error here."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-W", "error", "-m", "lengen_fast.train", "--preset", "quick", "--out",
                          str(tmp_path / "q"), "--no-progress", "--seeds", "1", "--tasks", "passkey,text",
                          "--no-extend", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Warning" not in res.stderr, res.stderr[-3000:]
