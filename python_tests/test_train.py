"""lengen-train: tasks, metrics, early stopping, exact resume, bad inputs, and a quick run end to end."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lengen_fast.train import cli
from lengen_fast.train.config import RunConfig, TaskConfig, eval_lengths, load_preset, apply_overrides
from lengen_fast.train.evaluate import (EarlyStopper, critical_length, exact_match, generalization_gap,
                                        greedy_decode, loss_by_boundary_distance, distance_buckets)
from lengen_fast.train.model import Transformer
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
            assert es.tokens.shape == (cfg.eval_examples, T.doc_tokens(task, n, cfg))
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


def test_boundary_distance_masked_packing_ignores_neighbours():
    """Under masked packing a document's losses do not depend on what is packed before it."""
    torch.manual_seed(0)
    model = Transformer(replace(RunConfig().model, pos_encoding="rope"), 120).eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 120, int(n)).astype(np.int32) for n in rng.integers(3, 12, 10)]
    masks = [np.ones(len(d), np.uint8) for d in docs]
    edges = distance_buckets(16)
    a = loss_by_boundary_distance(model, docs, masks, 32, True, edges)
    b = loss_by_boundary_distance(model, docs[::-1], masks[::-1], 32, True, edges)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    c = loss_by_boundary_distance(model, docs, masks, 32, False, edges)
    assert not np.allclose(a, c)


# ------------------------------------------------------------------------------ early stopping
@pytest.mark.parametrize("series,drop,stop_at,best_step", [
    ([0.1, 0.3, 0.5, 0.49, 0.48, 0.46], 0.05, 5, 2),      # 0.46 < 0.5 * 0.95
    ([0.1, 0.3, 0.5, 0.48, 0.6, 0.58], 0.05, None, 4),    # dips < 5% never stop
    ([0.2, 0.4, 0.3], 0.3, None, 1),                      # 25% drop under a 30% limit
    ([0.2, 0.4, 0.2], 0.3, 2, 1),
    ([0.02, 0.0, 0.0], 0.05, None, 0),                    # below min_best: noise around zero
])
def test_early_stopping_on_synthetic_series(series, drop, stop_at, best_step):
    es = EarlyStopper(drop=drop, min_best=0.05)
    stops = [es.update(i, v)[1] for i, v in enumerate(series)]
    assert es.stopped_at == stop_at and es.best_step == best_step
    assert stops.count(True) == (stop_at is not None)
    if stop_at is not None:
        assert "below its best" in es.reason
        assert es.max_drop_after_best() == pytest.approx((max(series) - min(series[best_step + 1:])) / max(series))


def test_early_stopping_patience_needs_consecutive_drops():
    es = EarlyStopper(drop=0.05, patience=2)
    for i, v in enumerate([0.5, 0.4, 0.5, 0.4, 0.45, 0.3]):
        es.update(i, v)
    assert es.stopped_at == 4 and es.best_step == 0 and "2 validations in a row" in es.reason


def test_early_stopping_disabled_still_tracks_best():
    es = EarlyStopper(drop=0.05, enabled=False)
    for i, v in enumerate([0.5, 0.1, 0.1]):
        es.update(i, v)
    assert es.stopped_at is None and es.best_step == 0 and es.max_drop_after_best() == pytest.approx(0.8)


def test_best_checkpoint_breaks_ood_ties_by_id_accuracy():
    """A task learned in distribution but never beyond keeps the OOD metric at 0: the best checkpoint must be the
    one that learned it (parity with a scratchpad reached ID 1.0 at step 400, yet was scored at step 50)."""
    es = EarlyStopper(drop=0.05, min_best=0.05)
    for step, ood, id_acc in ((50, 0.0, 0.05), (100, 0.0, 0.4), (150, 0.0, 1.0), (200, 0.0, 0.9)):
        es.update(step, ood, id_acc)
    assert es.best_step == 150 and es.stopped_at is None
    es.update(250, 0.2, 0.5)                                  # a higher OOD metric still wins over ID accuracy
    assert es.best_step == 250


# ------------------------------------------------------------------------------- exact resume
def tiny_cfg(tmp_path, **train):
    cfg = RunConfig()
    apply_overrides(cfg, load_preset("quick"))
    cfg.out = str(tmp_path / "run")
    cfg.progress = False
    cfg.model.dropout = 0.1
    cfg.extension.extend = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def make_trainer(cfg, run_dir, strategy="pack_masked"):
    p = cli.plan(cfg)
    evals = cli.build_evals(cfg, 0, None)
    return cli.Trainer(cfg, strategy, 0, cli.table_for(cfg, cfg.task, strategy, 0, None), evals,
                       T.text_base(cfg.task), run_dir, max_len=p["seq_len"], train_max_len=cfg.task.train_max_len,
                       text_edges=cli.text_edges(cfg), steps=6)


@pytest.mark.parametrize("strategy", ["pack_masked", "vsl"])
def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, strategy):
    cfg = tiny_cfg(tmp_path, eval_every=3, pos_offset_max=8)
    full = make_trainer(cfg, tmp_path / "a", strategy).fit(progress=False)
    part = make_trainer(cfg, tmp_path / "b", strategy).fit(progress=False, until=3)
    assert part.step == 3
    resumed = make_trainer(cfg, tmp_path / "c", strategy)
    resumed.load(tmp_path / "b" / "last.pt")
    resumed.fit(progress=False)
    assert len(full.losses) == 6
    assert resumed.losses == full.losses  # bit-exact on CPU
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------- bad inputs
def bad(tmp_path, **kw):
    cfg = tiny_cfg(tmp_path)
    for dotted, v in kw.items():
        sec, name = dotted.split("__")
        setattr(getattr(cfg, sec), name, v)
    return cfg


@pytest.mark.parametrize("kw,match", [
    ({"task__tasks": ["copy", "parity"]}, "unknown task 'copy'"),
    ({"train__strategies": ["pack"]}, "unknown strategy 'pack'"),
    ({"train__tokens_per_batch": 8}, "tokens_per_batch=8 is smaller than the maximum training length"),
    ({"model__pos_encoding": "alibi"}, "unknown pos_encoding"),
    ({"extension__extend": True, "extension__scalings": ["longrope2"]}, "unknown rope scaling"),
    ({"task__alphabet": 8}, "copy_unique at eval length 24 needs alphabet"),
    ({"model__pos_encoding": "learned", "model__max_positions": 16}, "max_positions=16 is too small"),
    ({"train__seq_len": 8}, "seq_len=8 is shorter than the longest training document"),
    ({"train__seq_len": 24}, "seq_len=24 must be a power of two for vsl"),
    ({"train__early_stop_drop": 1.5}, "early_stop_drop must be in"),
    ({"train__attn_backend": "flash"}, "unknown attn_backend 'flash'"),
])
def test_bad_config_raises_before_training(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        cli.plan(bad(tmp_path, **kw))


def test_missing_output_parent(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.out = str(tmp_path / "nope" / "run")
    with pytest.raises(ValueError, match="output directory parent .* does not exist"):
        cli.plan(cfg)


def test_short_eval_lengths_warn(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.task.eval_multiples = [0.5, 1.0, 2.0]
    with pytest.warns(UserWarning, match="shorter than the training length"):
        cli.plan(cfg)


def test_resume_with_different_model_config(tmp_path):
    cfg = tiny_cfg(tmp_path, eval_every=2)
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    make_trainer(cfg, tmp_path / "run" / "ckpt" / "pack_masked_s0").fit(progress=False, until=2)
    other = tiny_cfg(tmp_path)
    other.model.d_model = 64
    other.resume = True
    with pytest.raises(ValueError, match=r"cannot resume .* model config differs .*d_model"):
        cli.plan(other)


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    assert cli.main(["--preset", "quick", "--tasks", "copy_unique,sorting", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'sorting'" in capsys.readouterr().err
    assert cli.main(["--preset", "nope"]) == 2
    assert "preset 'nope' not found" in capsys.readouterr().err
    assert cli.main(["--preset", "quick", "--eval-multiples", "0.5,1", "--out", str(tmp_path / "no" / "x")]) == 2
    err = capsys.readouterr().err
    assert "warning: eval_multiples [0.5] are below 1" in err and "parent" in err


@pytest.mark.parametrize("preset", ["quick", "default", "long"])
def test_presets_validate(preset, tmp_path):
    cfg = RunConfig()
    apply_overrides(cfg, load_preset(preset))
    cfg.out = str(tmp_path / "p")
    cli.plan(cfg)


def test_flags_map_onto_the_dataclasses():
    cmd, cfg = cli.config_from_args(["compare", "--task", "parity", "--d-model", "48", "--no-tie-embeddings",
                                     "--seeds", "0,1,2", "--eval-multiples", "1,3", "--preset", "quick"])
    assert cmd == "compare" and cfg.task.tasks == ["parity"] and cfg.model.d_model == 48
    assert cfg.model.tie_embeddings is False and cfg.train.seeds == [0, 1, 2] and cfg.task.eval_multiples == [1.0, 3.0]
    assert cfg.train.strategies == ["concat_chunk", "pack_naive", "pack_masked", "vsl"]
    assert cfg.train.steps == load_preset("quick")["train"]["steps"]


# ------------------------------------------------------------------------------- end to end
def test_quick_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "quick"
    assert cli.main(["--preset", "quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| task | strategy |" in printed and "plots:" in printed
    rep = json.loads((out / "report.json").read_text())
    cfg = rep["config"]
    strategies = cfg["train"]["strategies"]
    assert set(strategies) == {"concat_chunk", "pack_naive", "pack_masked", "vsl"}
    keys = {"strategy", "task", "seed", "train_max_len", "accuracy", "tokens_per_second", "train_flops",
            "best_step", "early_stopped_at"}
    assert len(rep["results"]) == len(strategies) * len(cfg["task"]["tasks"])
    lens = {str(n) for n in eval_lengths(RunConfig.from_dict(cfg).task)}
    for r in rep["results"]:
        assert keys <= set(r) and set(r["accuracy"]) == lens
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert r["tokens_per_second"] > 0 and r["train_flops"] > 0
    for run in rep["runs"]:
        assert run["history"] and run["history"][-1]["step"] == run["steps"]
    assert {a["arm"] for a in rep["extension"]} == {"no extension", "scaling only", "scaling + fine-tune"}
    assert rep["boundary"] and len(rep["boundary"][0]["pack_naive"]) == len(rep["boundary"][0]["edges"]) - 1
    md = (out / "report.md").read_text()
    for section in ("token efficiency", "Retrieval vs synthesis", "Staged context extension", "Naive vs masked"):
        assert section.lower() in md.lower()
    for png in ("accuracy_vs_length.png", "curves.png", "boundary.png"):
        assert (out / png).stat().st_size > 1000


def test_text_from_the_embedded_corpus(tmp_path):
    cfg = TaskConfig(tasks=["text"], train_max_len=8)
    text = T.load_text(cfg)
    base = T.text_base(cfg)
    assert text.vocab == 256 and text.train and text.heldout
    train_ids = {d.tobytes() for d in text.train}
    assert not any(d.tobytes() in train_ids for d in text.heldout)  # held out by document
    L = T.text_train_len(cfg)
    pieces = T.text_pieces(text.train, (5, L), 50, seed=0)
    assert len(pieces) == 50 and all(5 <= len(p) <= L and p.min() >= base for p in pieces)
    ev = T.text_eval(text, 4 * L, 6, "val")
    assert ev.shape == (6, 4 * L) and ev.min() >= base
    assert not np.array_equal(ev, T.text_eval(text, 4 * L, 6, "test"))
    model = Transformer(RunConfig().model, base + text.vocab)
    from lengen_fast.train.evaluate import loss_by_position
    losses = loss_by_position(model, ev, [0, L, 2 * L, 4 * L - 1])
    assert len(losses) == 3 and all(4.0 < x < 7.0 for x in losses)  # untrained: about log(vocab)


def test_ood_score_ignores_unlearned_tasks_and_corrects_for_guessing():
    cfg = TaskConfig(tasks=["majority", "reverse"], eval_examples=8)
    sets = [T.eval_set(t, n, cfg, 0, "val") for t in cfg.tasks for n in (4, 8)]
    # an oracle right everywhere except reverse at n=4 (ID): reverse is not learned and counts 0
    docs = [d for es in sets for d in es.tokens]
    rev4 = T.doc_tokens("reverse", 4, cfg)
    wrong = {i for i, d in enumerate(docs) if d[1] == T.TASK_IDS["reverse"] and len(d) == rev4}
    assert len(wrong) == 8
    from lengen_fast.train.trainer import score
    res = score(Oracle(docs, wrong, 200), sets, None, 4, [], cfg, learned=0.9)
    assert res["acc"]["majority"] == {4: 1.0, 8: 1.0} and res["acc"]["reverse"][4] == 0.0
    assert res["ood_score"] == pytest.approx(0.5)  # (majority 1.0 + reverse 0) / 2
