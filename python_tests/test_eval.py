"""lengen-eval: loss by position equals transformers' own forward for every scaling arm, the report, bad input.

Tiny random-initialised Llama (BPE tokenizer with a BOS), Mistral (sliding window shorter than the documents) and
Qwen2 (q/k/v biases) saved with save_pretrained, L = max_position_embeddings = 32, so documents of 8L + 1 tokens.
Parity follows flash-attn's rule: |ours - fp64 eager| <= 2 x |fp32 eager - fp64 eager| + 1e-6, per position.
The transformers reference is built with each arm's rope dict in its config at load time (from_pretrained kwargs):
setting config.rope_scaling afterwards would change nothing in transformers 5.
"""
from __future__ import annotations

import dataclasses
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from helpers.hf_models import L, save_tiny  # noqa: E402
from lengen_fast import RopeScaling  # noqa: E402
from lengen_fast.eval import EvalConfig, EvalError, evaluate  # noqa: E402
from lengen_fast.eval.cli import main  # noqa: E402
from lengen_fast.fsio import atomic_torch_save  # noqa: E402
from lengen_fast.integrations.hf import rope_check  # noqa: E402

ARMS = ["none", "linear:2", "ntk:2", "dynamic:2", "yarn:2", "llama3:2"]


def hf_dicts(head_dim: int = 16) -> dict:
    """The transformers rope dicts each arm means, written out here (not taken from lengen_fast's mapping)."""
    t = 10000.0
    return {"none": {"rope_type": "default", "rope_theta": t},
            "linear:2": {"rope_type": "linear", "factor": 2.0, "rope_theta": t},
            # static NTK has no rope_type in transformers: plain RoPE at base * factor ** (d / (d - 2))
            "ntk:2": {"rope_type": "default", "rope_theta": t * 2.0 ** (head_dim / (head_dim - 2))},
            "dynamic:2": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": t},
            "yarn:2": {"rope_type": "yarn", "factor": 2.0, "rope_theta": t, "original_max_position_embeddings": L},
            "llama3:2": {"rope_type": "llama3", "factor": 2.0, "rope_theta": t, "original_max_position_embeddings": L,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_eval")
    return {k: save_tiny(k, root / k) for k in ("llama", "mistral", "qwen2")}


def _hf_losses(path, rope: dict, docs, dtype):
    ref = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", rope_parameters=dict(rope))
    ref = ref.to(dtype).eval()
    out = []
    with torch.no_grad():
        for d in docs:
            x = torch.from_numpy(d)[None]
            out.append(torch.nn.functional.cross_entropy(ref(x).logits[0, :-1].to(dtype), x[0, 1:],
                                                         reduction="none").double())
    return out


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_loss_by_position_matches_transformers_for_every_arm(tiny, kind, one_thread):
    r = evaluate(EvalConfig(model=str(tiny[kind]), docs=2, passkey_trials=0, scaling=ARMS, progress=False))
    assert [a.name for a in r.arms] == ARMS and r.edges == [0, L, 2 * L, 4 * L, 8 * L]
    assert all(d.size == 8 * L + 1 for d in r.docs.docs)
    want = hf_dicts()
    for arm in r.arms:
        assert arm.hf_rope == want[arm.name]
        l32 = _hf_losses(tiny[kind], want[arm.name], r.docs.docs, torch.float32)
        l64 = _hf_losses(tiny[kind], want[arm.name], r.docs.docs, torch.float64)
        eager_err = max(float((a - b).abs().max()) for a, b in zip(l32, l64))
        for ours, truth in zip(r.token_losses[arm.name], l64):
            err = np.abs(ours - truth.numpy())
            assert err.max() <= 2 * eager_err + 1e-6, (arm.name, err.max(), eager_err)
    # the arms really differ beyond L (else the parity above would prove little)
    for arm in ARMS[1:]:
        diff = max(np.abs(a[L:] - b[L:]).max() for a, b in zip(r.token_losses[arm], r.token_losses["none"]))
        assert diff > 1e-3, arm


def test_cli_report_files_and_statistics(tiny, tmp_path, one_thread):
    out = tmp_path / "rep"
    rc = main([str(tiny["llama"]), "--out", str(out), "--docs", "3", "--passkey-trials", "1",
               "--passkey-depths", "0,1", "--scaling", "none,yarn:4,linear", "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["loss_by_position.png", "passkey_heatmap.png", "report.json",
                                                     "report.md"]
    s = json.loads((out / "report.json").read_text())
    assert s["model"]["context"] == L and s["model"]["context_source"] == "config.json max_position_embeddings"
    assert [a["name"] for a in s["arms"]] == ["none", "yarn:4", "linear:8"]       # --factor defaults to max multiple
    assert all(a["hf_check_max_abs_err"] < 1e-4 for a in s["arms"])
    assert len(s["loss"]["none"]["buckets"]) == 4 and s["docs_per_bucket"] == [3, 3, 3, 3]
    assert s["loss"]["none"]["ood"]["n"] == 3
    vs = s["loss_vs_none"]["yarn:4"]["ood"]
    assert vs["verdict"] in ("holds", "opposite", "inconclusive") and vs["better"] == "lower" and "mde" in vs
    assert set(s["passkey"]["arms"]) == {"none", "yarn:4", "linear:8"}
    assert s["passkey"]["vs_none"]["linear:8"]["ood"]["better"] == "higher"
    md = (out / "report.md").read_text()
    assert "## Loss by position" in md and "## Passkey retrieval" in md and "verdict (OOD)" in md
    assert (out / "passkey_heatmap.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------ our checkpoints, export
def _ours(tmp_path, *, mlp="swiglu", tie=True, kv=2, pos="rope"):
    from lengen_fast.train.config import ModelConfig
    from lengen_fast.train.model import Transformer

    torch.manual_seed(1)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv, mlp=mlp, tie_embeddings=tie, rope_base=5000.0,
                      pos_encoding=pos)
    m = Transformer(cfg, 257).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / f"ours_{mlp}_{tie}.pt"
    atomic_torch_save({"model_config": dataclasses.asdict(cfg), "model": m.state_dict(), "seed": 0}, path)
    return m, path


@pytest.mark.parametrize("tie,kv", [(True, 2), (False, 0)])
def test_export_llama_logits_equal_ours_and_eval_runs(tmp_path, tie, kv, one_thread):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lengen_fast.integrations.hf import export_llama

    ours, ckpt = _ours(tmp_path, tie=tie, kv=kv)
    out = export_llama(ckpt, tmp_path / "exported", context=64)
    hf = LlamaForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "def f(x):\n    return x * 2  # héllo\n"
    ids = torch.tensor(tok(text)["input_ids"])
    assert ids.tolist() == list(text.encode()) and tok.eos_token_id == 256 and len(tok) == 257
    n = ids.numel()
    cu = torch.tensor([0, n], dtype=torch.int32)
    with torch.no_grad():
        hf32 = hf(ids[None]).logits[0].double()
        hf64 = hf.double()(ids[None]).logits[0]
        got = ours(ids, cu, n, torch.arange(n)).double()
    assert (got - hf64).abs().max() <= 2 * (hf32 - hf64).abs().max() + 1e-6
    # lengen-eval on the exported directory and on the .pt give the same per-token losses
    a = evaluate(EvalConfig(model=str(out), docs=2, passkey_trials=0, scaling=["none", "yarn:2"], progress=False))
    b = evaluate(EvalConfig(model=str(ckpt), context=64, docs=2, passkey_trials=0, scaling=["none", "yarn:2"],
                            progress=False))
    assert a.model.context == 64 and a.docs.names == b.docs.names
    for arm in ("none", "yarn:2"):
        for x, y in zip(a.token_losses[arm], b.token_losses[arm]):
            assert np.abs(x - y).max() < 1e-4


def test_export_refuses_what_llama_cannot_represent(tmp_path):
    from lengen_fast.integrations.hf import export_llama

    gelu, _ = _ours(tmp_path, mlp="gelu")
    with pytest.raises(ValueError, match="GELU MLP .* has no gate"):
        export_llama(gelu, tmp_path / "x")
    learned, _ = _ours(tmp_path, pos="learned")
    with pytest.raises(ValueError, match="RoPE only"):
        export_llama(learned, tmp_path / "y")
    ok, _ = _ours(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_llama(ok, tmp_path / "full")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------- RoPE checks
@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("linear", 8.0), RopeScaling("ntk", 8.0),
                                     RopeScaling("dynamic", 8.0, 4096), RopeScaling("yarn", 8.0, 4096),
                                     RopeScaling("llama3", 8.0, 4096)])
def test_rope_check_accepts_every_kind_far_out(scaling):
    from transformers import LlamaConfig

    c = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    assert rope_check.check_scaling(c, scaling, max_position=32768) < 0.1


def test_rope_check_refuses_a_different_rotation(monkeypatch):
    from transformers import LlamaConfig

    real = rope_check.hf_rope_parameters
    monkeypatch.setattr(rope_check, "hf_rope_parameters",
                        lambda s, b, r: ({"rope_type": "linear", "factor": 1.9, "rope_theta": b}, None))
    c = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32)
    with pytest.raises(ValueError, match="differs from transformers' LlamaRotaryEmbedding .* at position 1 "):
        rope_check.check_scaling(c, RopeScaling("linear", 2.0), max_position=256)
    monkeypatch.setattr(rope_check, "hf_rope_parameters", real)


# --------------------------------------------------------------------------------------------- bad input
def _fails(args, tmp_path, capsys, *needles):
    out = tmp_path / "never"
    assert main([*map(str, args), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()                                                    # nothing half-written
    return err


def test_bad_input_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails([tmp_path / "empty"], tmp_path, capsys, "empty'", "has no config.json")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    _fails([tmp_path / "junk.pt"], tmp_path, capsys, "junk.pt", "not a checkpoint torch can read")
    atomic_torch_save({"model": {}}, tmp_path / "nocfg.pt")
    _fails([tmp_path / "nocfg.pt"], tmp_path, capsys, "nocfg.pt", "key 'model_config'")
    _, ckpt = _ours(tmp_path)
    _fails([ckpt], tmp_path, capsys, "--context")


def test_bad_input_missing_tokenizer(tmp_path, capsys):
    d = save_tiny("mistral", tmp_path / "notok", tokenizer="none")
    _fails([d], tmp_path, capsys, "no usable tokenizer", "notok", "--tokenizer")


def test_bad_input_corpus_of_another_tokenizer(tiny, tmp_path, capsys):
    from lengen_fast.data.prepare import prepare

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = tmp_path / "texts"
    texts.mkdir()
    for f in ("argparse.py", "ast.py", "dataclasses.py"):
        (texts / f"{f}.txt").write_text((root / f).read_text(encoding="utf-8"))
    prep = tmp_path / "prep"
    prepare(str(texts), str(prep), tokenizer=str(tiny["llama"]), workers=1, progress=False)
    _fails([tiny["mistral"], "--data", prep], tmp_path, capsys, "--data", "manifest.json", str(tiny["llama"]),
           str(tiny["mistral"]))
    # the model's own tokenizer (the directory, or its tokenizer.json) is accepted
    r = evaluate(EvalConfig(model=str(tiny["llama"]), data=str(prep), docs=2, passkey_trials=0, scaling=["none"],
                            progress=False))
    assert r.docs.source.startswith("prepared directory") and len(r.docs.docs) == 2


def test_bad_input_rope_we_cannot_reproduce(tmp_path, capsys, monkeypatch):
    d = save_tiny("mistral", tmp_path / "rope")
    c = json.loads((d / "config.json").read_text())
    c["rope_parameters"] = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}
    (d / "config.json").write_text(json.dumps(c))
    _fails([d], tmp_path, capsys, "config.json", "cannot be reproduced", "proportional")
    # an arm whose rotation would differ from transformers' is refused before anything runs
    d2 = save_tiny("mistral", tmp_path / "rope2")
    monkeypatch.setattr(rope_check, "hf_rope_parameters",
                        lambda s, b, r: ({"rope_type": "linear", "factor": 1.5, "rope_theta": b}, None))
    _fails([d2, "--scaling", "none,linear:2"], tmp_path, capsys, "--scaling 'none'", "cannot reproduce")


def test_bad_input_context_and_memory(tiny, tmp_path, capsys, monkeypatch):
    _fails([tiny["mistral"], "--context", "100"], tmp_path, capsys, "--context 100", "max_position_embeddings = 32")
    _fails([tiny["mistral"], "--max-tokens", "100"], tmp_path, capsys, "--max-tokens 100", "257 tokens")
    from lengen_fast.eval import runner
    monkeypatch.setattr(runner, "available_bytes", lambda device: 1 << 20)
    _fails([tiny["mistral"]], tmp_path, capsys, "--max-tokens 32768", "GiB is free")
    monkeypatch.undo()
    from lengen_fast.integrations.hf.engine_model import HFEngineModel

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(HFEngineModel, "forward", oom)
    _fails([tiny["mistral"], "--passkey-trials", "0"], tmp_path, capsys, "--max-tokens", "ran out of memory")


def test_bad_flags_name_themselves(tiny):
    for cfg, flag in ((EvalConfig(model=str(tiny["mistral"]), multiples=[2.0, 1.0]), "--multiples"),
                      (EvalConfig(model=str(tiny["mistral"]), scaling=["none", "rope9"]), "--scaling"),
                      (EvalConfig(model=str(tiny["mistral"]), scaling=["yarn:0.5"]), "--scaling"),
                      (EvalConfig(model=str(tiny["mistral"]), scaling=["config"]), "--scaling 'config'"),
                      (EvalConfig(model=str(tiny["mistral"]), passkey_depths=[1.5]), "--passkey-depths")):
        with pytest.raises(EvalError, match=flag):
            evaluate(cfg)


def test_packing_keeps_length_dependent_arms_one_length_per_forward():
    from lengen_fast.eval.runner import groups

    assert groups([5, 5, 7, 5, 3], 100, per_length=False) == [[0, 1, 2, 3, 4]]
    assert groups([5, 5, 7, 5, 3], 12, per_length=False) == [[0, 1], [2, 3], [4]]
    assert groups([5, 5, 7, 5, 3], 100, per_length=True) == [[4], [0, 1, 3], [2]]   # dynamic NTK: seq_len per doc
