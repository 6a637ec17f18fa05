"""Multi-process data parallelism: CPU, gloo, 2 processes over loopback (127.0.0.1, a free port).

One spawned 2-process group runs every scenario (loader sharding, DDP and FSDP2 training, resume)
to pay the process start-up once; the 1-process references run in the test process.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import warnings

from lengen_fast.train import cli, distributed
from lengen_fast.train.config import RunConfig
from lengen_fast.train.model import Transformer
from lengen_fast.train.plan import make_plan
from lengen_fast.train.trainer import Budget, Run
from lengen_fast.train.workload import TaskWorkload
from helpers.subproc import pkg_env  # noqa: E402

WORLD = 2
STEPS = 20


def tiny_cfg(out: Path) -> RunConfig:
    cfg = RunConfig()
    m, t, tr = cfg.model, cfg.task, cfg.train
    m.d_model, m.n_layers, m.n_heads, m.max_positions, m.dropout = 16, 1, 2, 64, 0.0
    t.tasks, t.train_min_len, t.train_max_len, t.eval_multiples = ["copy_unique", "parity"], 2, 6, [1.0, 2.0]
    t.train_examples, t.eval_examples, t.alphabet = 150, 9, 16   # 9: uneven eval shards (5 + 4 padded)
    tr.arms, tr.tokens_per_batch, tr.steps, tr.evals, tr.warmup_frac = ["vsl"], 128, STEPS, 2, 0.15
    tr.seeds = [0]
    tr.pos_offset_max, tr.threads, tr.early_stop = 8, 1, False   # offsets: one draw sliced by rank
    cfg.extension.extend = False
    cfg.progress = False
    cfg.out = str(out)
    return cfg


def plan_of(cfg: RunConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one seed: no interval
        return make_plan(cfg)


def make_run(cfg: RunConfig, name: str, arm: str = "vsl"):
    plan = plan_of(cfg)
    W = TaskWorkload(plan)
    a = plan.arm(arm)
    return Run(plan, a, 0, W.source(0, a), Path(cfg.out) / "ckpt" / name, budget=Budget("steps", STEPS, STEPS),
               seq_len=plan.seq_len, lr=cfg.train.lr, validate=W.validator(0))


def fit(run, until: int = STEPS):
    """Train to ``until`` with a validation every 10 steps (as the engine does, at budget fractions)."""
    for goal in (STEPS // 2, STEPS):
        if goal <= until and run.step < goal:
            run.train_until(goal)
            run.evaluate()
    return run


def run_summary(t) -> dict:
    """Rank 0 gets the full weights (a collective under FSDP); every rank its own metrics."""
    return {"params": t.ctx.model_state(t.model), "tokens": t.acct["tokens"], "flops": t.flops,
            "train_loss": [h["train_loss"] for h in t.history],
            "history": [(h["step"], h["id"], h["ood"], h["acc"]) for h in t.history]}


# ------------------------------------------------------------------------------ the 2-process group
def scenarios(ctx, out: Path) -> dict:
    cfg = tiny_cfg(out)
    res = {}
    # (1)/(2): the trainer's loader over one epoch
    t = make_run(cfg, "loader")
    loader = t.loader
    steps = []
    for s in range(len(loader)):
        b, seq_len, doc, start, length, _ = loader.pieces(0, s)
        steps.append((b, seq_len, list(zip(doc.tolist(), start.tolist(), length.tolist()))))
    res["loader"] = {"steps": steps, "config": (loader.config.rank, loader.config.world_size),
                     "batch_shapes": [tuple(next(iter(loader)).input_ids.shape)]}
    # (3) DDP and FSDP2 loss curves; (4) resume: 10 steps, checkpoint, a fresh trainer continues
    res["ddp"] = run_summary(fit(make_run(cfg, "ddp")))
    fit(make_run(cfg, "part"), until=STEPS // 2)
    resumed = make_run(cfg, "resumed")
    resumed.load(out / "ckpt" / "part" / "last.pt")
    res["resumed"] = run_summary(fit(resumed))
    if distributed.has_fsdp2():
        distributed._CTX = dataclasses.replace(ctx, parallel="fsdp")
        res["fsdp"] = run_summary(fit(make_run(cfg, "fsdp")))
        part = fit(make_run(cfg, "fsdp_part"), until=STEPS // 2)
        fres = make_run(cfg, "fsdp_resumed")
        fres.load(out / "ckpt" / "fsdp_part" / "last.pt")
        res["fsdp_resumed"] = run_summary(fit(fres))
        part.restore("best_id")  # the best weights go back into the sharded model; a plain copy (the
        # extension study's starting point) gathers them on every rank
        best = torch.load(out / "ckpt" / "fsdp_part" / "best_id.pt", weights_only=False)["model"]
        full = distributed.context().plain_copy(part.model, lambda: Transformer(part.model.cfg, part.model.vocab_size))
        full = full.state_dict()
        res["fsdp_best_restored"] = set(full) == set(best) and all(torch.equal(full[k], best[k]) for k in best)
        distributed._CTX = ctx
    return res


def _worker(rank: int, port: int, out: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = distributed.init_distributed("gloo", "ddp")
    try:
        res = scenarios(ctx, Path(out))
    finally:
        distributed.shutdown()
    torch.save(res, Path(out) / f"result_rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"result_rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config in one process: batch 2B where each of the 2 ranks has B."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    t = fit(make_run(tiny_cfg(tmp_path_factory.mktemp("ref")), "one"))
    torch.set_num_threads(n)
    return run_summary(t), t.loader


# ------------------------------------------------------------------------------------------ tests
def test_ranks_see_the_same_bucket_sequence(group):
    _, res = group
    assert [r["loader"]["config"] for r in res] == [(0, WORLD), (1, WORLD)]
    seqs = [[(b, s) for b, s, _ in r["loader"]["steps"]] for r in res]
    assert seqs[0] == seqs[1]
    assert len({b for b, _ in seqs[0]}) > 1, "the curriculum should visit several buckets"
    for b, s, pieces in res[0]["loader"]["steps"]:
        assert all(length == s for _, _, length in pieces)   # vsl: one piece of length seq_len per row
    assert res[0]["loader"]["batch_shapes"] == res[1]["loader"]["batch_shapes"] == [(64,)]  # 128 / 2 ranks


def test_no_document_piece_twice_per_epoch_and_union_is_the_one_process_epoch(group, reference):
    _, res = group
    _, loader1 = reference
    seen = [p for r in res for _, _, pieces in r["loader"]["steps"] for p in pieces]
    assert len(seen) == len(set(seen))
    mine = {(d, s, n) for st in range(len(loader1)) for d, s, n in zip(*(a.tolist() for a in
                                                                      loader1.pieces(0, st)[2:5]))}
    assert set(seen) == mine                                 # the ranks split exactly the 1-process epoch
    for st in range(len(loader1)):                           # ... step by step
        one = set(zip(*(a.tolist() for a in loader1.pieces(0, st)[2:5])))
        assert one == {p for r in res for p in r["loader"]["steps"][st][2]}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_batch_b_match_one_process_batch_2b(group, reference, mode):
    _, res = group
    if mode not in res[0]:
        pytest.skip("this torch has no FSDP2")
    ref, _ = reference
    got = res[0][mode]
    # the same token set and gradient each step: only the fp32 summation order differs, so after 20 AdamW steps the
    # weights agree to a few fp32 ulps of the update
    assert set(got["params"]) == set(ref["params"])
    for k, v in ref["params"].items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-6)
    assert got["tokens"] == ref["tokens"]                                       # summed over ranks
    np.testing.assert_allclose(got["flops"], ref["flops"], rtol=1e-12)
    # sharded evaluation + gather gives the 1-process metrics (9 examples: uneven shards), on every rank
    for r in res:
        assert [h[0] for h in r[mode]["history"]] == [h[0] for h in ref["history"]] == [10, 20]
        for (_, gi, go, ga), (_, ri, ro, ra) in zip(r[mode]["history"], ref["history"]):
            assert ga == ra and gi == pytest.approx(ri) and go == pytest.approx(ro)


def test_resume_under_two_processes_equals_the_uninterrupted_run(group):
    out, res = group
    for r in res:
        assert r["resumed"]["train_loss"] == r["ddp"]["train_loss"]             # bit-exact on CPU
        assert r["resumed"]["history"] == r["ddp"]["history"]
        if "fsdp" in r:
            assert r["fsdp_resumed"]["train_loss"] == r["fsdp"]["train_loss"]
    for k, v in res[0]["ddp"]["params"].items():
        assert torch.equal(res[0]["resumed"]["params"][k], v)
        if "fsdp" in res[0]:
            assert torch.equal(res[0]["fsdp_resumed"]["params"][k], res[0]["fsdp"]["params"][k])
    assert all(r["fsdp_best_restored"] for r in res if "fsdp" in r)
    ck = torch.load(out / "ckpt" / "part" / "last.pt", weights_only=False)
    assert ck["world_size"] == WORLD and ck["step"] == STEPS // 2 and len(ck["rank_rng"]) == WORLD
    assert not list(out.glob("ckpt/*/.tmp-*"))                                 # atomic writes leave no temp file


# ------------------------------------------------------------------------------------- bad input
def test_resume_with_a_different_world_size_is_refused(group, tmp_path):
    out, _ = group
    t = make_run(tiny_cfg(tmp_path), "one")
    with pytest.raises(ValueError, match="written by a run with world size 2, this run has world size 1"):
        t.load(out / "ckpt" / "part" / "last.pt")
    cfg = tiny_cfg(out)
    cfg.resume = True
    from lengen_fast.train.plan import CONFIG_FILE, result_config
    (out / CONFIG_FILE).write_text(json.dumps({"result_config": result_config(cfg)}))
    with pytest.raises(ValueError, match="exact continuation is impossible"):
        plan_of(cfg)                                         # caught before any training (1 process)
    cfg.dist.nproc = 4
    with pytest.raises(ValueError, match="world size 2, this run has world size 4"):
        plan_of(cfg)


@pytest.mark.parametrize("tpb,nproc,match", [
    (128, 16, r"world size 16 does not divide tokens_per_batch / seq_len = 128 / 16 = 8 rows"),
    (96, 4, r"world size 4 does not divide tokens_per_batch / seq_len = 96 / 16 = 6 rows"),
    (112, 2, r"world size 2 does not divide tokens_per_batch / seq_len = 112 / 16 = 7 rows"),
])
def test_world_size_must_divide_the_rows_per_step(tmp_path, tpb, nproc, match):
    cfg = tiny_cfg(tmp_path / "x")
    cfg.train.tokens_per_batch, cfg.dist.nproc = tpb, nproc
    with pytest.raises(ValueError, match=match):
        plan_of(cfg)


@pytest.mark.parametrize("call,match", [
    (lambda: distributed.resolve_backend("nccl", cuda_available=False),
     "dist_backend 'nccl' is unavailable on this device: CUDA is not available"),
    (lambda: distributed.resolve_backend("mpi"), r"dist_backend must be one of \('auto', 'gloo', 'nccl'\)"),
    (lambda: distributed.check_parallel("zero3", 2), "parallel must be one of"),
    (lambda: distributed.check_world_size(128, [16], 0), "world size must be >= 1"),
])
def test_bad_backend_and_mode(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_auto_backend_follows_the_device():
    assert distributed.resolve_backend("auto", cuda_available=False) == "gloo"
    assert distributed.resolve_backend("gloo", cuda_available=False) == "gloo"
    assert distributed.resolve_device("auto", cuda_available=False) == "cpu"
    assert distributed.resolve_device("auto", cuda_available=True) == "cuda"
    assert distributed.resolve_device("cuda", cuda_available=True) == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="placement on a CPU-only machine")
def test_placement_on_cpu():
    assert distributed.placement("auto", "auto", 1) == ("", "cpu")
    assert distributed.placement("auto", "auto", 2) == ("gloo", "cpu")
    assert distributed.placement("gloo", "cpu", 2) == ("gloo", "cpu")
    ctx = distributed.init_distributed("auto", "ddp", "cpu")
    assert ctx.device == torch.device("cpu") and not ctx.enabled


@pytest.mark.parametrize("args,match", [
    (("auto", "tpu", 1), r"device must be one of \('auto', 'cpu', 'cuda'\), got 'tpu'"),
    (("auto", "tpu", 2), r"device must be one of"),
    (("auto", "cuda", 1), "device 'cuda' is unavailable: torch.cuda.is_available"),
    (("auto", "cuda", 2), "dist_backend 'nccl' is unavailable on this device"),
    (("gloo", "cuda", 2), "device 'cuda' is unavailable"),
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="errors of a CPU-only machine")
def test_bad_device(args, match):
    with pytest.raises(ValueError, match=match):
        distributed.placement(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="errors of a CPU-only machine")
def test_cli_reports_an_unavailable_device(tmp_path, capsys):
    assert cli.main(["--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "device 'cuda' is unavailable" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl is available with CUDA")
def test_cli_reports_an_unavailable_backend(tmp_path, capsys):
    argv = ["--nproc", "2", "--dist-backend", "nccl", "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    assert "'nccl' is unavailable on this device" in capsys.readouterr().err


def test_half_set_launcher_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 is set but .*RANK"):
        distributed.init_distributed("gloo")


def test_single_process_context_is_a_no_op():
    ctx = distributed.context()
    assert (ctx.world_size, ctx.rank, ctx.is_main, ctx.enabled) == (1, 0, True, False)
    m = torch.nn.Linear(3, 3)
    assert ctx.wrap(m) is m and ctx.eval_model(m) is m


# ------------------------------------------------------------------------------- the launcher
def test_lengen_train_nproc_2_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = pkg_env()
    flags = ("--nproc 2 --tasks copy_unique --arms vsl --seeds 1 --no-extend --steps 4 --evals 2 "
             "--train-examples 80 --eval-examples 4 --train-max-len 6 --eval-multiples 1,2 --alphabet 16 "
             "--d-model 16 --n-layers 1 --n-heads 2 --max-positions 128 --tokens-per-batch 128 "
             "--threads 1 --no-progress")
    cmd = [sys.executable, "-m", "lengen_fast.train", *flags.split(), "--out", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("| arm | supervised tokens |") == 1   # rank 0 alone prints the table
    rep = (out / "report.json").read_text()
    assert '"nproc": 2' in rep
    procs = json.loads(rep)["run"]["processes"]    # the report says how it ran (issue 16)
    assert (procs["world_size"], procs["parallel"], procs["process_group"], procs["launcher"]) == \
        (2, "ddp", "gloo", "torchrun")
    assert "- processes: 2 processes (ddp, gloo, launched by torchrun)" in (out / "report.md").read_text()
    assert (out / "ckpt" / "vsl_s0" / "last.pt").exists()
    assert torch.load(out / "ckpt" / "vsl_s0" / "last.pt", weights_only=False)["world_size"] == 2
