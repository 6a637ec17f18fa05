"""HF Trainer glue and HF models in the engine: vsl_dataset + PackedCollator under Trainer (1 and 2 processes),
LengthGenCallback's OOD evaluation and early stop, and HFEngineModel's packed forward against transformers' own.

Tiny random models and short synthetic documents; the 2-process run uses torchrun with gloo on the CPU.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from helpers.hf_models import config  # noqa: E402
from lengen_fast.data import open_tokens, synthetic_table  # noqa: E402
from lengen_fast.integrations import hf  # noqa: E402
from helpers.subproc import pkg_env  # noqa: E402

V = 97


def source(n=300, seed=0):
    return open_tokens(synthetic_table(np.random.default_rng(seed).integers(5, 200, n), vocab_size=V, seed=seed + 1),
                       vocab_size=V)


def tiny_model(kind="llama", attn="lengen_varlen", seed=0, **kw):
    hf.register()
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(kind, V, **kw), attn_implementation=attn)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def docs_layout(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs])
    return docs, torch.cat(docs), cu, pos, labels


# ------------------------------------------------------------------------------------------- engine model
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_engine_model_matches_transformers_per_document(kind, one_thread):
    model = tiny_model(kind)
    ref = tiny_model(kind, attn="eager")
    ref.load_state_dict(model.state_dict())
    eng = hf.HFEngineModel(model)
    docs, tokens, cu, pos, labels = docs_layout([5, 40, 1, 17])
    with torch.no_grad():
        got = eng(tokens, cu, 40, pos, labels=labels, reduction="none")
        want = torch.cat([torch.cat([torch.nn.functional.cross_entropy(ref(d[None]).logits[0, :-1], d[1:],
                                                                       reduction="none"), torch.zeros(1)])
                          for d in docs])
        assert (got - want).abs().max() < 1e-5                 # each document alone, as transformers runs it
        assert torch.allclose(eng(tokens, cu, 40, pos, labels=labels), want.sum(), rtol=1e-5)
        assert eng(tokens, cu, 40, pos).shape == (tokens.numel(), V)
    loss = eng(tokens, cu, 40, pos, labels=labels)              # trains: gradients reach every parameter
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in eng.parameters() if p.requires_grad)
    assert eng.vocab_size == V and eng.cfg.n_layers == 2 and eng.cfg.d_model == 64
    assert eng.num_params() == sum(p.numel() for p in model.parameters())


def test_engine_model_from_config_json_other_attention_and_scaling(tmp_path, one_thread):
    from lengen_fast import RopeScaling

    cfg = config("llama", V)
    cfg.save_pretrained(str(tmp_path))
    torch.manual_seed(3)
    eng = hf.load_hf_model(tmp_path / "config.json")            # random init from a config.json
    assert eng.packed and eng.rope_patched
    eager = hf.HFEngineModel(tiny_model("llama", attn="eager"))  # not ours: one document per forward
    eager.hf.load_state_dict(eng.hf.state_dict())
    _, tokens, cu, pos, labels = docs_layout([7, 30, 12], seed=1)
    with torch.no_grad():
        a = eng(tokens, cu, 30, pos, labels=labels, reduction="none")
        b = eager(tokens, cu, 30, pos, labels=labels, reduction="none")
        assert not eager.packed and (a - b).abs().max() < 1e-5
        c = eng(tokens, cu, 30, pos, RopeScaling("linear", 4.0), labels=labels, reduction="none")
        assert (a - c).abs().max() > 1e-3                       # rope_scaling changes this call only ...
        assert torch.equal(eng(tokens, cu, 30, pos, labels=labels, reduction="none"), a)   # ... not the model


# ------------------------------------------------------------------------------------------ vsl_dataset
def test_vsl_dataset_ranks_disjoint_same_bucket_full_coverage():
    from accelerate.data_loader import IterableDatasetShard

    src = source()
    kw = dict(tokens_per_batch=512, max_len=64, min_len=8, curriculum="grow_p2")
    ds = hf.vsl_dataset(src, world_size=2, **kw)
    one = hf.vsl_dataset(src, world_size=1, **kw)
    assert len(ds) == 2 * ds.steps and ds.steps == one.steps
    ds.set_epoch(0)
    refs = list(ds)
    assert [(r.step, r.rank) for r in refs[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for p in range(2):  # dispatch_batches=False: accelerate's shard keeps items p, p+2, ... on rank p
        ds.set_epoch(0)
        assert [r.rank for r in IterableDatasetShard(ds, batch_size=1, num_processes=2, process_index=p)] == \
            [p] * ds.steps
    for step in range(ds.steps):
        pieces = []
        for rank in range(2):
            _, seq_len, doc, start, length, _ = ds.loader(rank).pieces(0, step)
            assert seq_len == one.loader(0).pieces(0, step)[1]    # every rank in the same bucket
            pieces.append(set(zip(doc.tolist(), start.tolist(), length.tolist())))
        assert not pieces[0] & pieces[1]                                        # disjoint
        _, _, doc, start, length, _ = one.loader(0).pieces(0, step)
        assert pieces[0] | pieces[1] == set(zip(doc.tolist(), start.tolist(), length.tolist()))   # full coverage


def test_collator_turns_step_refs_into_fixed_size_rows():
    from transformers import DataCollatorWithFlattening

    ds = hf.vsl_dataset(source(), world_size=1, tokens_per_batch=256, max_len=64, min_len=8)
    ref = next(iter(ds))
    b = ref.batch()
    out = hf.PackedCollator()([ref])
    assert set(out) == {"input_ids", "labels", "position_ids"}
    assert all(v.shape == (1, b.input_ids.numel()) for v in out.values())   # padding kept: same T on every rank
    n = int(b.cu_seqlens[-1])
    cu = b.cu_seqlens.tolist()
    docs = [{"input_ids": b.input_ids[a:c].tolist()} for a, c in zip(cu[:-1], cu[1:]) if c > a]
    want = DataCollatorWithFlattening(return_tensors="pt")(docs)
    assert torch.equal(out["input_ids"][0, :n], want["input_ids"][0])
    assert torch.equal(out["position_ids"][0, :n], want["position_ids"][0])
    assert torch.equal(out["labels"][0, :n], want["labels"][0])
    assert (out["labels"][0, n:] == -100).all() and (out["position_ids"][0, n:] == torch.arange(out["labels"].shape[1] - n)).all()
    with pytest.warns(UserWarning, match="per_device_train_batch_size=2"):
        two = hf.PackedCollator()([ref, ref])
    assert two["input_ids"].shape == (1, 2 * b.input_ids.numel())


def _args(tmp_path, steps, **kw):
    return TrainingArguments(str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=1, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True, learning_rate=3e-3, **kw)


def test_trainer_runs_vsl_dataset_and_logs_ood_evaluation(tmp_path, one_thread, capsys):
    model = tiny_model("llama", num_hidden_layers=1)
    ds = hf.vsl_dataset(source(), tokens_per_batch=512, max_len=64, min_len=8, curriculum="grow_p2")
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    docs = [np.random.default_rng(i).integers(0, V, 200) for i in range(3)]
    cb = hf.LengthGenCallback(docs, context=32, every=2, multiples=(1, 2, 4), min_steps=0)
    tr = Trainer(model=model, args=_args(tmp_path, 4, logging_steps=2), train_dataset=ds,
                 data_collator=hf.PackedCollator(), callbacks=[cb])
    tr.train()
    assert seen == [(1, 512)] * 4               # one loader step per optimizer step (the callback runs the decoder)
    evals = [h for h in tr.state.log_history if "lengen/ood_score" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all(np.isfinite(h["lengen/loss_64_128"]) and 0 < h["lengen/ood_score"] < 1 for h in evals)
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 2 and all("'lengen/ood_score'" in line for line in printed)   # in Trainer's logs event


class Scripted(hf.LengthGenCallback):
    """OOD scores follow a script instead of being measured (the rule is what is tested)."""

    def __init__(self, scores, **kw):
        super().__init__([np.zeros(100, dtype=np.int64)], context=32, **kw)
        self.scores = list(scores)

    def measure(self, model):
        return {"ood_score": self.scores.pop(0), "noise_sd": 0.01, "learned": True}


def test_callback_stops_when_ood_drops_beyond_noise(tmp_path, one_thread):
    ds = hf.vsl_dataset(source(), tokens_per_batch=512, max_len=64, min_len=8)
    # best 0.60 at step 3; 0.585 is within max(5% of best, 2 x 0.01): not a drop; 0.50 and 0.45 are, twice in a row
    cb = Scripted([0.40, 0.50, 0.60, 0.585, 0.50, 0.45, 0.7, 0.7], every=1, min_steps=2, patience=2)
    tr = Trainer(model=tiny_model(num_hidden_layers=1), args=_args(tmp_path, 8), train_dataset=ds,
                 data_collator=hf.PackedCollator(), callbacks=[cb])
    tr.train()
    assert cb.stopper.stopped_at == 6 and tr.state.global_step == 6
    assert cb.stopper.best_step == 3 and "best 0.600 at step 3" in cb.stopper.reason
    # the same script with early_stop=False only records the rule
    cb2 = Scripted([0.40, 0.50, 0.60, 0.585, 0.50, 0.45, 0.7, 0.7], every=1, min_steps=2, patience=2,
                   early_stop=False)
    tr2 = Trainer(model=tiny_model(num_hidden_layers=1), args=_args(tmp_path, 8), train_dataset=ds,
                  data_collator=hf.PackedCollator(), callbacks=[cb2])
    tr2.train()
    assert tr2.state.global_step == 8 and cb2.stopper.stopped_at == 6


SCRIPT = r'''
import os, sys, numpy as np, torch
from transformers import LlamaConfig, AutoModelForCausalLM, Trainer, TrainingArguments
from lengen_fast.integrations import hf
from lengen_fast.data import synthetic_table, open_tokens
hf.register(); torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="lengen_varlen")
src = open_tokens(synthetic_table(np.random.default_rng(0).integers(5, 200, 300), vocab_size=97, seed=1), vocab_size=97)
ds = hf.vsl_dataset(src, tokens_per_batch=512, max_len=64, min_len=8, curriculum="grow_p2")
seen = []
model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"][0].clone()), with_kwargs=True)
args = TrainingArguments(sys.argv[1], max_steps=4, per_device_train_batch_size=1, report_to=[], save_strategy="no",
                         disable_tqdm=True, use_cpu=True)
Trainer(model=model, args=args, train_dataset=ds, data_collator=hf.PackedCollator()).train()
torch.save({"world": ds.world, "seen": seen}, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
# A gloo group left to interpreter exit can abort a rank ("terminate called without an active exception", SIGABRT;
# seen once in CI on 2026-12-05): end it as a torchrun script should.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


def test_two_process_trainer_gives_each_rank_its_own_shard(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = pkg_env(OMP_NUM_THREADS="1")
    with socket.socket() as sock:   # a free port (torchrun's static rendezvous does not take port 0)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={port}", str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    ds = hf.vsl_dataset(source(), world_size=2, tokens_per_batch=512, max_len=64, min_len=8, curriculum="grow_p2")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["world"] == 2 and len(got["seen"]) == 4
        for step, ids in enumerate(got["seen"]):   # default accelerate settings (dispatch): rank i gets its own slice
            assert torch.equal(ids, ds.loader(rank).make_batch(0, step).input_ids)
