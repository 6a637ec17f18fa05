"""lengen-train lm (the corpus workload of the one engine): the chunked loss, the arms' knobs, the embedded corpus
and its one hold-out rule, an end-to-end tiny run, bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lengen_fast.train.arms import ARM_PRESETS, parse_arm
from lengen_fast.train.cli import main as train_main
from lengen_fast.train.config import ModelConfig
from lengen_fast.train.corpus import EOD, heldout_mask, split_units, training_subset
from lengen_fast.train.evaluate import choose_position_docs, loss_by_position, position_edges
from lengen_fast.train.model import Transformer, chunked_cross_entropy
from lengen_fast.train.report_corpus import time_to_target
from lengen_fast.train.stats import compare
from lengen_fast.train.trainer import make_loader, model_inputs


def lm_main(argv):
    return train_main(["lm", *argv])


# ---------------------------------------------------------------------------------- chunked loss
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_full_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    N, d, V = 97, 16, 41
    h = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100                                                                  # ignored rows
    full = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    gh, gw = torch.autograd.grad(full, (h, w))
    ours = chunked_cross_entropy(h, w, y, chunk=chunk)
    ch, cw = torch.autograd.grad(ours * 1.0, (h, w))
    torch.testing.assert_close(ours, full, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ch, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cw, gw, rtol=1e-10, atol=1e-12)
    # a non-unit upstream gradient scales both gradients
    ch2, cw2 = torch.autograd.grad(chunked_cross_entropy(h, w, y, chunk=chunk) * 2.5, (h, w))
    torch.testing.assert_close(ch2, 2.5 * gh)
    torch.testing.assert_close(cw2, 2.5 * gw)
    mean = chunked_cross_entropy(h, w, y, chunk=chunk, reduction="mean")
    torch.testing.assert_close(mean, F.cross_entropy(h @ w.t(), y, ignore_index=-100))
    none = chunked_cross_entropy(h.detach(), w.detach(), y, chunk=chunk, reduction="none")
    ref = F.cross_entropy(h.detach() @ w.detach().t(), y, ignore_index=-100, reduction="none")
    torch.testing.assert_close(none, ref)


def test_model_forward_with_labels_matches_logits_path():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=2), 50)
    tok = torch.randint(0, 50, (40,))
    lab = torch.randint(0, 50, (40,))
    lab[-3:] = -100
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    pos = torch.cat([torch.arange(17), torch.arange(23)])
    full = F.cross_entropy(m(tok, cu, 23, pos), lab, ignore_index=-100, reduction="sum")
    g_full = torch.autograd.grad(full, m.embed.weight)[0]
    ours = m(tok, cu, 23, pos, labels=lab, loss_chunk=8)
    g_ours = torch.autograd.grad(ours, m.embed.weight)[0]
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, g_full, rtol=1e-4, atol=1e-6)


def test_chunked_loss_bad_input():
    h, w = torch.zeros(4, 3), torch.zeros(5, 3)
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(h, w, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(h, w, torch.zeros(4, dtype=torch.int64), chunk=0)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(h, w, torch.zeros(4, dtype=torch.int64), reduction="max")


def test_rope_scaling_is_a_call_argument_not_a_mutation():
    from lengen_fast import RopeScaling
    torch.manual_seed(0)
    m = Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=2), 50)
    tok = torch.randint(0, 50, (64,))
    cu = torch.tensor([0, 64], dtype=torch.int32)
    pos = torch.arange(64)
    plain = m(tok, cu, 64, pos)
    scaled = m(tok, cu, 64, pos, rope_scaling=RopeScaling(kind="linear", factor=4.0))
    assert getattr(m, "rope_scaling", None) is None        # nothing stored on the model
    assert not torch.allclose(plain, scaled)
    torch.testing.assert_close(m(tok, cu, 64, pos), plain)


# ---------------------------------------------------------------------------------- corpus and knobs
def test_split_units_cuts_top_level_definitions():
    src = b'"""Module doc."""\nimport os\nX = 1\n\n@dec\ndef f():\n    return 1\n\nclass C:\n    pass\nY = 2\n'
    docs = split_units(src)
    assert docs == [b'"""Module doc."""\n', b"import os\nX = 1\n", b"@dec\ndef f():\n    return 1\n",
                    b"class C:\n    pass\n", b"Y = 2\n"]
    assert split_units(b"def broken(:\n") == []


def test_split_units_cuts_classes_into_header_and_methods():
    src = (b'class A(B):\n    """Doc."""\n    x = 1\n\n    @property\n    def f(self):\n        return 1\n\n'
           b'    y = 2\n    class Inner:\n        def g(self):\n            pass\n\nZ = 3\n')
    assert split_units(src) == [b'class A(B):\n    """Doc."""\n    x = 1\n\n',
                                b"    @property\n    def f(self):\n        return 1\n",
                                b"    y = 2\n", b"    class Inner:\n", b"        def g(self):\n            pass\n",
                                b"Z = 3\n"]
    # every byte of a definition lands in exactly one document (blank lines between documents aside)
    assert b"".join(split_units(src)).replace(b"\n", b"") == src.replace(b"\n", b"")


def test_embedded_corpus_is_short_documents_with_disjoint_heldout_files():
    from lengen_fast.train.corpus import stdlib_corpus
    c = stdlib_corpus(0.2, 40)
    for tab in (c.train, c.heldout):
        col = tab.column("input_ids").combine_chunks()
        offs = col.offsets.to_numpy()
        vals = col.values.to_numpy()
        assert (vals[offs[1:] - 1] == EOD).all()                                   # every document ends in EOD
        assert vals.max() <= EOD
    lens = np.diff(c.train.column("input_ids").combine_chunks().offsets.to_numpy())
    lens_held = np.diff(c.heldout.column("input_ids").combine_chunks().offsets.to_numpy())
    assert np.median(lens) < 2048                                               # much shorter than the context
    long_lens = np.diff(c.long_heldout.column("input_ids").combine_chunks().offsets.to_numpy())
    assert long_lens.sum() >= lens_held.sum() and long_lens.max() > lens_held.max()  # whole held-out files
    train_docs = {tuple(x.as_py()) for x in c.train.column("input_ids")}
    held_docs = {tuple(x.as_py()) for x in c.heldout.column("input_ids")}
    assert len(held_docs) > 0 and not train_docs & held_docs                  # no held-out definition is trained on


def test_one_holdout_rule_is_deterministic_and_independent_of_the_other_keys():
    keys = [f"doc{i}" for i in range(2000)]
    m = heldout_mask(keys, 0.1)
    assert 0.07 < m.mean() < 0.13 and (heldout_mask(keys[::-1], 0.1)[::-1] == m).all()
    assert (heldout_mask(keys[:500], 0.1) == m[:500]).all()                   # a key's fate is its own
    with pytest.raises(ValueError, match="heldout_frac"):
        heldout_mask(keys, 1.0)


def _loader_batch(arm_name, context=64, tpb=256):
    from lengen_fast.data import open_tokens, synthetic_table
    lengths = np.array([5, 40, 90, 17, 64, 33, 8, 120, 3, 70, 11, 50] * 4)
    src = open_tokens(synthetic_table(lengths, vocab_size=30, seed=1))
    arm = parse_arm(arm_name)
    loader = make_loader(src, arm, context, tpb, 0, min_len=8)
    batch = next(iter(loader))
    return batch, model_inputs(batch, arm)


def test_arm_knobs_change_exactly_what_they_name():
    batch, (tok, cu, ms, pos, lab) = _loader_batch("concat")
    assert torch.equal(cu, batch.row_cu_seqlens) and ms == 64                   # attention spans the row
    real = int(batch.row_cu_seqlens[-1])
    assert torch.equal(pos[:real], torch.arange(real) % 64)                     # positions along the row
    batch, (tok, cu, ms, pos, lab) = _loader_batch("concat_docmask")
    assert torch.equal(cu, batch.cu_seqlens) and torch.equal(pos, batch.position_ids)
    assert cu.numel() > batch.row_cu_seqlens.numel()                           # documents inside rows
    batch, (tok, cu, ms, pos, lab) = _loader_batch("x:base=concat,positions=document")  # row attention, doc positions
    assert torch.equal(cu, batch.row_cu_seqlens) and torch.equal(pos, batch.position_ids)
    batch, (tok, cu, ms, pos, lab) = _loader_batch("dd_natural")
    lens = (cu[1:] - cu[:-1]).tolist()
    assert all(n & (n - 1) == 0 or n < 8 for n in lens)                       # power-of-two pieces (+ leftovers)


def test_subset_factor_scales_the_subset_and_the_curriculum_cycles():
    from lengen_fast.data import open_tokens, synthetic_table
    src = open_tokens(synthetic_table(np.arange(1, 400), vocab_size=30, seed=1))
    sub = training_subset(src, 5000, seed=3)
    assert 5000 <= sub.num_tokens < 5000 + 400 and len(set(sub.lengths.tolist())) == len(sub)
    assert training_subset(src, 5000, seed=3).lengths.tolist() == sub.lengths.tolist()   # deterministic
    loader = make_loader(sub, parse_arm("dd_grow_p2"), 64, 256, 0, min_len=8, cycles=4)
    assert loader.config.num_cycles == 4 and loader.config.curriculum == "grow_p2"


def test_one_arm_grammar_and_aliases():
    assert parse_arm("concat").knobs() == ARM_PRESETS["concat_chunk"].knobs() and parse_arm("concat").name == "concat"
    assert parse_arm("bfd_docmask").knobs() == ARM_PRESETS["pack_masked"].knobs()
    assert parse_arm("x:base=dd_natural,cycles=2").cycles == 2
    with pytest.raises(ValueError, match="is not name:knob=value"):
        parse_arm("x:decompose:document")                                   # the old LM colon grammar is gone
    with pytest.raises(ValueError, match="unknown arm"):
        parse_arm("nonsense")


def test_position_buckets_and_unreachable_multiples():
    edges = position_edges(16, [1, 2, 4, 8])
    assert edges == [0, 16, 32, 64, 128]
    held = [np.arange(n) % 7 for n in (5, 20, 40, 50)]                          # longest 50: reaches 2-4x only
    docs, notes = choose_position_docs(held, edges, per_bucket=1)
    assert len(notes) == 2
    assert any("[64, 128) is skipped" in n for n in notes)                      # nothing reaches 64
    assert any("[32, 64) is scored only up to" in n for n in notes)             # partly reached
    torch.manual_seed(0)
    m = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2), 7)
    rows = loss_by_position(m, docs, edges, device=torch.device("cpu"))
    assert [r["lo"] for r in rows] == [0, 16, 32, 64]
    assert rows[-1]["loss"] is None and rows[-1]["tokens"] == 0
    # target positions a..b-1 per document (position 0 is never a target)
    assert rows[0]["tokens"] == sum(min(len(d), 16) - 1 for d in docs)
    assert rows[2]["tokens"] == sum(max(0, min(len(d), 64) - 32) for d in docs)


def test_time_to_target_interpolates_between_evals():
    hist = [{"val_loss": 3.0, "train_time": 10.0, "flops": 100.0, "supervised": 1000},
            {"val_loss": 2.0, "train_time": 20.0, "flops": 200.0, "supervised": 2000},
            {"val_loss": 1.5, "train_time": 30.0, "flops": 300.0, "supervised": 3000}]
    assert time_to_target(hist, 2.5) == {"time_s": 15.0, "flops": 150.0, "supervised": 1500.0}
    assert time_to_target(hist, 3.5)["time_s"] == 10.0                         # the first eval is there
    assert time_to_target(hist, 1.0)["time_s"] is None


def test_verdict_logic():
    zero = [0.0, 0.0, 0.0]
    assert compare([0.5, 0.6, 0.55], zero, "higher")["verdict"] == "holds"
    assert compare([0.5, 0.6, 0.55], zero, "lower")["verdict"] == "opposite"
    assert compare([0.5, -0.6, 0.55], zero, "higher")["verdict"] == "inconclusive"
    assert compare([0.5], [0.0], "higher")["verdict"] == "inconclusive"        # one seed: no interval


# ---------------------------------------------------------------------------------- end to end
def test_lm_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "lm"
    assert lm_main(["--preset", "quick", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    arms = ["concat", "concat_docmask", "dd_natural", "dd_grow_p2"]
    assert rep["workload"] == "corpus" and [a["name"] for a in rep["arms"]] == arms
    assert {(r["arm"], r["seed"]) for r in rep["runs"]} == {(a, s) for a in arms for s in (0, 1)}
    budget = rep["config"]["train"]["budget_tokens"]
    for r in rep["runs"]:
        assert budget <= r["accounting"]["supervised"] < budget + 512          # equal budgets, within one batch
        assert r["supervised_per_second"] > 0 and r["train_seconds"] > 0 and r["accounting"]["flops"] > 0
        assert len(r["history"]) == 2 and math.isfinite(r["final_val_loss"])
        assert r["to_target"]["time_s"] is not None                             # auto target: every run reaches it
        lbp = r["test"]["final"]["loss_by_position"]
        assert [b["lo"] for b in lbp] == [0, 128, 256, 512] and lbp[0]["tokens"] > 0
        assert r["knobs"] == parse_arm(r["arm"]).knobs()
    assert rep["edges"] == [0, 128, 256, 512, 1024]
    c = rep["corpus"]                                                           # positions: whole held-out files
    assert c["position_source"] == "whole held-out files" and max(c["position_doc_lens"]) == 1024
    ev = [e for e in rep["extension"] if e["stage"] == "evaluation"]
    assert [e["scaling"] for e in ev] == ["none", "linear", "ntk", "yarn"] * 2
    none = next(e for e in ev if e["scaling"] == "none" and e["seed"] == 0)
    dd = next(r for r in rep["runs"] if r["arm"] == "dd_natural" and r["seed"] == 0)
    assert none["test"] == dd["test"]["final"]                                  # scaling none = the arm's own eval
    lin = next(e for e in ev if e["scaling"] == "linear" and e["seed"] == 0)
    assert lin["test"]["loss_by_position"][0]["loss"] != none["test"]["loss_by_position"][0]["loss"]
    ft = [e for e in rep["extension"] if e["stage"] == "fine-tune"]
    assert len(ft) == 2
    for s in ft:
        assert s["seq_len"] == 256 and 0 < s["compute_frac"] < 1 and s["test"]["loss_by_position"][0]["loss"] > 0
    head = [c for c in rep["comparisons"] if c["group"] == "headline"]
    assert {c["a"] for c in head} == set(arms[1:]) and all(c["b"] == "concat" for c in head)
    assert {c["metric"] for c in head} == {"final validation loss", "log supervised tokens/s", "log time to target"}
    for c in head:
        assert c["verdict"] in ("holds", "opposite", "inconclusive") and c["diff"]["n"] == 2
        assert c["diff"]["mde"] > 0                                               # power is stated
    run = rep["run"]                                                            # how it ran (issue 16)
    assert run["processes"]["world_size"] == 1 and run["dtype"] == "float32" and run["device"]["type"] == "cpu"
    md = (out / "report.md").read_text()
    assert md.startswith("# lengen-train report\n\n## How this ran\n")
    for heading in ("## Headline comparisons", "MDE (80% power)", "## Arms", "## Loss by position",
                    "## Context extension"):
        assert heading in md
    assert (out / "loss_vs_position.png").stat().st_size > 0
    assert (out / "val_loss_vs_time.png").stat().st_size > 0


def test_lm_unreachable_multiple_is_reported_and_skipped(tmp_path, capsys):
    out = tmp_path / "lm"
    assert lm_main(["--preset", "quick", "--out", str(out), "--arms", "concat,dd_natural", "--seeds", "1",
                    "--multiples", "1,2,1000,2000", "--no-extend"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["edges"] == [0, 128, 256, 128000, 256000]
    assert any("[128000, 256000) is skipped" in n for n in rep["notes"])         # nothing reaches it
    assert any("[256, 128000) is scored only up to" in n for n in rep["notes"])  # partly reached
    lbp = rep["runs"][0]["test"]["final"]["loss_by_position"]
    assert lbp[-1]["loss"] is None and lbp[-2]["loss"] is not None
    assert "skipped" in (out / "report.md").read_text()


def test_lm_finetune_with_a_tiny_budget_still_fills_batches(tmp_path):
    """Regression: a fine-tune budget below one batch once left the long-document subset unable to fill one."""
    out = tmp_path / "lm"
    assert lm_main(["--preset", "quick", "--out", str(out), "--arms", "dd_natural", "--seeds", "1",
                    "--finetune-frac", "0.01", "--scalings", "linear", "--multiples", "1,2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    ft = [e for e in rep["extension"] if e["stage"] == "fine-tune"]
    assert len(ft) == 1 and ft[0]["supervised"] > 0
    assert (out / "seeds" / "seed_0.json").exists()                              # each finished seed is kept


def test_lm_cli_and_bad_input(tmp_path, capsys):
    assert lm_main(["--preset", "quick", "--context", "100", "--out", str(tmp_path / "x")]) == 2
    assert "power of two" in capsys.readouterr().err
    assert lm_main(["--preset", "quick", "--arms", "concat:row", "--out", str(tmp_path / "x")]) == 2
    assert "is not name:knob=value" in capsys.readouterr().err
    assert lm_main(["--preset", "nope"]) == 2
    assert "preset 'nope' not found" in capsys.readouterr().err
    assert lm_main(["--preset", "long"]) == 2                                    # a tasks preset
    assert "is a tasks preset" in capsys.readouterr().err
    assert lm_main(["--preset", "quick", "--arms", "vsl", "--out", str(tmp_path / "x")]) == 2
    assert "fit=pad pads task documents" in capsys.readouterr().err
    assert lm_main(["--preset", "quick", "--corpus", str(tmp_path / "missing.arrow"),
                    "--out", str(tmp_path / "y")]) == 2
    assert "missing.arrow" in capsys.readouterr().err
    bad = tmp_path / "bad.json"                                 # a preset file whose section is not an object
    bad.write_text('{"workload": "corpus", "model": 5}')
    assert lm_main(["--preset", str(bad), "--out", str(tmp_path / "z")]) == 2
    assert "bad.json" in (err := capsys.readouterr().err) and "must be a JSON object mapping sections" in err
    bad.write_text('{"workload": "corpus", "train": {"contxt": 64}}')
    assert lm_main(["--preset", str(bad), "--out", str(tmp_path / "z")]) == 2
    assert "unknown config field train.contxt" in capsys.readouterr().err


def test_lm_on_a_prepared_corpus(tmp_path):
    """The two-command path: lengen-data prepare (text Parquet -> token shards), then lengen-train lm --corpus."""
    pytest.importorskip("tokenizers")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lengen_fast.data.corpus import stdlib_files
    from lengen_fast.data.prepare import main as prepare_main
    texts = [d.decode("utf-8", "replace") for f in stdlib_files(30) for d in split_units(f.read_bytes())]
    (tmp_path / "text").mkdir()
    pq.write_table(pa.table({"text": texts[: len(texts) // 2]}), tmp_path / "text" / "a.parquet")
    pq.write_table(pa.table({"text": texts[len(texts) // 2:]}), tmp_path / "text" / "b.parquet")
    assert prepare_main([str(tmp_path / "text"), "--out", str(tmp_path / "tok"), "--train-tokenizer", "320",
                         "--workers", "1", "--no-progress"]) == 0
    out = tmp_path / "lm"
    assert lm_main(["--preset", "quick", "--corpus", str(tmp_path / "tok"), "--out", str(out), "--seeds", "1",
                    "--arms", "concat,dd_natural", "--heldout-frac", "0.1", "--no-finetune", "--scalings", "yarn",
                    "--multiples", "1,2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["corpus"]["vocab_size"] == 320 and rep["corpus"]["name"] == str(tmp_path / "tok")
    assert rep["corpus"]["train_docs"] + rep["corpus"]["heldout_docs"] == len(texts)
    assert all(math.isfinite(r["final_val_loss"]) for r in rep["runs"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine error")
def test_device_cuda_fails_clearly_on_cpu(tmp_path, capsys):
    assert lm_main(["--preset", "quick", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cuda" in err and "is_available() is False" in err


@pytest.mark.gpu
def test_gpu_preset_tiny(tmp_path):
    """The GPU preset's settings (bf16 autocast, fp32 master weights, chunked loss, grad accumulation)
    on a tiny model and budget."""
    out = tmp_path / "lm"
    rc = lm_main(["--preset", "lm_gpt2", "--out", str(out), "--d-model", "64", "--n-layers", "2", "--n-heads", "2",
                  "--context", "512", "--min-len", "32", "--tokens-per-batch", "4096", "--grad-accum", "2",
                  "--budget-tokens", "32768", "--lr", "0.003", "--evals", "2", "--seeds", "1", "--corpus-files", "80",
                  "--val-tokens", "4096", "--pos-docs", "1", "--finetune-frac", "0.2"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["machine"]["device"].startswith("cuda") and rep["machine"]["gpu"]
    for r in rep["runs"]:
        assert r["mfu"] is None or 0 < r["mfu"] < 1
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < 5.0    # uniform over 257: 5.55
    m = torch.load(out / "ckpt" / "concat_s0" / "last.pt", weights_only=False)["model"]
    assert all(v.dtype == torch.float32 for v in m.values() if v.is_floating_point())  # fp32 master weights
