"""The one engine (issue 20): worker-count independence, seeds auto, power, replication, every flag explained,
atomic writes, and both workloads through --resume and --nproc 2."""
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lengen_fast.fsio import atomic_write, atomic_write_text
from lengen_fast.train import cli, stats
from lengen_fast.train.replicate import compare_reports, main as replicate_main
from helpers.subproc import pkg_env  # noqa: E402

TINY = ["--preset", "quick", "--tasks", "passkey,majority", "--arms", "pack_naive,pack_masked", "--no-extend",
        "--no-progress", "--steps", "12", "--evals", "2", "--d-model", "16", "--n-heads", "2", "--threads", "1"]
LM_TINY = ["lm", "--preset", "quick", "--arms", "concat,dd_natural", "--no-extend", "--no-progress",
           "--budget-tokens", "2048", "--multiples", "1,2"]


def results(out: Path) -> dict:
    """Every per-run figure that must not depend on how the run was scheduled (timings excluded)."""
    rep = json.loads((out / "report.json").read_text())
    keep = {}
    for r in rep["runs"]:
        hist = [{k: v for k, v in h.items() if k != "train_time"} for h in r["history"]]
        keep[(r["arm"], r["seed"])] = {"history": hist, "test": r["test"], "accounting": r["accounting"],
                                       "boundary": r.get("boundary")}
    return keep


# ------------------------------------------------------------------------------------------ workers
def test_results_do_not_depend_on_the_worker_count(tmp_path, capsys):
    a, b = tmp_path / "w1", tmp_path / "w2"
    assert cli.main(TINY + ["--seeds", "0,1", "--workers", "1", "--out", str(a)]) == 0
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the parent's count, which the workers (--threads 1) do not use
    try:
        assert cli.main(TINY + ["--seeds", "0,1", "--workers", "2", "--out", str(b)]) == 0
    finally:
        torch.set_num_threads(before)
    assert "2 seeds on 2 worker processes" in capsys.readouterr().out
    ra, rb = results(a), results(b)
    assert set(ra) == {(arm, s) for arm in ("pack_naive", "pack_masked") for s in (0, 1)}
    assert ra == rb                                          # bit for bit: each (arm, seed) depends on the seed alone
    assert json.loads((b / "report.json").read_text())["derived"]["workers"] == 2
    for d in (a, b):  # the header names the threads each training process used (--threads 1), not the parent's
        md = (d / "report.md").read_text()
        assert "(1 torch threads)" in md and "1 torch threads per worker" in md   # header and "Measured on" agree


# ------------------------------------------------------------------------------------------ power
def test_mde_and_seeds_needed_on_fixed_inputs():
    d = stats.compare([0.31, 0.35, 0.29, 0.33], [0.20, 0.22, 0.25, 0.21])
    sd = float(np.std([0.11, 0.13, 0.04, 0.12], ddof=1))
    assert d["mde"] == pytest.approx((3.182 + 0.978) * sd / 2)                # (t_.975 + t_.80) sd / sqrt(n), df=3
    assert d["verdict"] == "holds" and d["mde"] < d["mean"]
    assert stats.mde(0.1, 1) == math.inf and stats.mde(0.0, 3) == 0.0
    n = stats.seeds_for_mde(0.1, 0.05)
    assert stats.mde(0.1, n) <= 0.05 < stats.mde(0.1, n - 1)
    assert stats.seeds_for_mde(0.1, 1e-9) is None
    with pytest.raises(ValueError, match="not tabulated"):
        stats.t_quantile(0.9, 3)


def test_seeds_auto_adds_seeds_and_says_why_it_stopped(tmp_path, capsys):
    out = tmp_path / "auto"
    assert cli.main(TINY + ["--seeds", "auto", "--mde", "1e-9", "--max-seeds", "4", "--workers", "2",
                            "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    s = rep["seeds"]
    assert s["auto"] and s["list"][:2] == [0, 1] and 2 <= len(s["list"]) <= 4
    assert "out of reach" in s["stopped"] or "max_seeds=4" in s["stopped"] or "identical" in s["stopped"] \
        or "at or below" in s["stopped"]
    md = (out / "report.md").read_text()
    assert "Seeds auto: target MDE 1e-09" in md and "stopped because" in md
    for c in (c for c in rep["comparisons"] if c["group"] == "headline"):
        assert "mde" in c["diff"] and "MDE" in md


def test_seeds_auto_stops_at_a_reached_target(tmp_path):
    out = tmp_path / "reach"
    assert cli.main(TINY + ["--seeds", "auto", "--mde", "10", "--workers", "1", "--out", str(out)]) == 0
    s = json.loads((out / "report.json").read_text())["seeds"]
    assert s["list"] == [0, 1] and "at or below the target 10" in s["stopped"] and len(s["rounds"]) == 1


# ------------------------------------------------------------------------------------------ replicate
def test_replicate_reruns_with_disjoint_seeds_and_counts_moves(tmp_path, capsys):
    out = tmp_path / "orig"
    assert cli.main(TINY + ["--seeds", "0,1", "--workers", "2", "--out", str(out)]) == 0
    assert replicate_main([str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "replicate" / "replication.json").read_text())
    again = json.loads((out / "replicate" / "report.json").read_text())
    assert again["seeds"]["list"] == [2, 3] and res["changed"] == ["seeds [0, 1] -> [2, 3]"]
    assert res["compared"] == len(again["comparisons"]) > 0
    assert set(res["moved"]) == {"holds <-> inconclusive", "holds <-> opposite", "inconclusive <-> opposite"}
    assert "verdicts moved holds <-> opposite" in printed and "# Replication of" in printed
    table = [ln for ln in (out / "replicate" / "replication.md").read_text().splitlines() if ln.startswith("|")]
    assert len(table) == 2 + res["compared"]
    assert len({ln.count("|") for ln in table}) == 1    # header, rule and rows have the same number of columns


def test_compare_reports_counts_each_kind_of_move():
    def c(key, v, lo, hi, group="headline"):
        return {"key": key, "group": group, "verdict": v, "diff": {"mean": (lo + hi) / 2, "lo": lo, "hi": hi, "n": 3}}
    a = {"comparisons": [c("x", "holds", 0.1, 0.3), c("y", "holds", 0.1, 0.2), c("z", "inconclusive", -1, 1)]}
    b = {"comparisons": [c("x", "inconclusive", -0.1, 0.2), c("y", "opposite", -0.3, -0.1), c("z", "opposite",
                                                                                               -2, -1.5)]}
    res = compare_reports(a, b)
    assert res["moved"] == {"holds <-> inconclusive": 1, "holds <-> opposite": 1, "inconclusive <-> opposite": 1}
    assert res["headline"] == {"compared": 3, "moved": 3, "holds_a": 2, "holds_survived": 0, "holds_to_opposite": 1}
    assert res["outside_other_interval"] == 5     # x: b's mean outside a's interval; y and z: both means


@pytest.mark.parametrize("setup,match", [
    (lambda d: None, "report.json' does not exist"),
    (lambda d: (d / "report.json").write_text('{"version": 1, "config": {}}'), "version 1"),
    (lambda d: (d / "report.json").write_text("{not json"), "is not readable JSON"),
])
def test_replicate_bad_directories(tmp_path, capsys, setup, match):
    d = tmp_path / "r"
    d.mkdir()
    setup(d)
    assert replicate_main([str(d)]) == 2
    err = capsys.readouterr().err
    assert "lengen-train replicate: error:" in err and match in err


# ------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("cmd", [[], ["lm"]])
def test_every_flag_has_one_sentence_of_help_with_its_default(cmd):
    ap = cli.build_parser(cmd[0] if cmd else "run")
    for action in ap._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 12, action.option_strings
        assert "(default:" in action.help, action.option_strings


# ------------------------------------------------------------------------------------------ atomic writes
def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "report.json"
    atomic_write_text(p, "old")

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=r"no space left on the device while writing .*report.json") as e:
        atomic_write(p, full_disk)
    assert str(e.value).count(str(p)) == 1, str(e.value)  # the path once, not again as OSError's filename
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["report.json"]


# ------------------------------------------------------------------------------------------ both workloads
def test_lm_resume_continues_and_refuses_a_changed_arm_set(tmp_path, capsys):
    out = tmp_path / "lm"
    argv = LM_TINY + ["--seeds", "1", "--workers", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    (out / "seeds" / "seed_0.json").unlink()                   # as if killed after the last checkpoint
    assert cli.main(argv + ["--resume"]) == 0
    assert "resumed concat seed 0 at step" in capsys.readouterr().out
    assert cli.main(argv + ["--resume", "--arms", "concat"]) == 2
    assert "train.arms: ['concat', 'dd_natural'] (run) != ['concat'] (now)" in capsys.readouterr().err


def test_lm_nproc_2_end_to_end(tmp_path):
    out = tmp_path / "lm2"
    env = pkg_env()
    cmd = [sys.executable, "-m", "lengen_fast.train", *LM_TINY, "--seeds", "1", "--nproc", "2", "--workers", "1",
           "--threads", "1", "--out", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["run"]["processes"]["world_size"] == 2 and rep["workload"] == "corpus"
    assert all(r["accounting"]["supervised"] >= 2048 for r in rep["runs"])


# ------------------------------------------------------------------------------------------ HF models (issue 21)
@pytest.mark.parametrize("model", ["hf", "lengen"])
def test_hf_architecture_or_our_model_trains_exports_and_lengen_eval_reads_it(tmp_path, model):
    """`lengen-train lm --model hf:PATH --out X` then `lengen-eval X/ckpt/<arm>_s0/hf` (and our swiglu model)."""
    from lengen_fast.eval.cli import main as eval_main
    argv = LM_TINY + ["--seeds", "1", "--workers", "1", "--out", str(tmp_path / "run")]
    if model == "hf":
        from transformers import LlamaConfig
        LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=512).save_pretrained(tmp_path / "cfg")
        argv += ["--model", f"hf:{tmp_path / 'cfg'}"]
    else:
        argv += ["--mlp", "swiglu"]
    assert cli.main(argv) == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["config"]["model"]["arch"] == ("hf:" + str(tmp_path / "cfg") if model == "hf" else "lengen")
    assert all(math.isfinite(r["final_val_loss"]) for r in rep["runs"])
    assert not any("not exported" in n for n in rep["notes"])
    exported = tmp_path / "run" / "ckpt" / "dd_natural_s0" / "hf"
    assert json.loads((exported / "lengen_export.json").read_text())["context"] == 128
    assert eval_main([str(exported), "--out", str(tmp_path / "ev"), "--docs", "2", "--passkey-trials", "1",
                      "--scaling", "none,yarn", "--no-progress"]) == 0
    assert "trained context L = 128 (lengen_export.json" in (tmp_path / "ev" / "report.md").read_text()


def test_gelu_model_is_not_exported_and_the_report_says_why(tmp_path):
    out = tmp_path / "run"
    assert cli.main(LM_TINY + ["--seeds", "1", "--workers", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert any("not exported as a Llama checkpoint: Llama needs mlp=swiglu" in n for n in rep["notes"])
    assert not (out / "ckpt" / "concat_s0" / "hf").exists()


def test_hf_model_that_cannot_be_built_is_named(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"model_type": "no_such_model"}')
    assert cli.main(LM_TINY + ["--model", f"hf:{tmp_path / 'cfg'}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "model.arch='hf:" in err and "cannot build that model" in err
