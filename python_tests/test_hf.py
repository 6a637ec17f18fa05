"""Hugging Face integration: "lengen_varlen" attention, the fused-RoPE patch and PackedCollator.

Tiny randomly initialised configs, no downloads. Parity follows flash-attn's rule: the error of our
packed run against an fp64 eager run per document is at most 2x the error of eager in the same
dtype per document, plus a small atol.
"""
from __future__ import annotations

import copy
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lengen_fast.attention
import lengen_fast.rope
from lengen_fast.integrations import hf
from lengen_fast.reference import varlen_attention_ref

try:
    from transformers import (AutoModelForCausalLM, DataCollatorWithFlattening, Gemma2Config, GPT2Config,
                              LlamaConfig, MistralConfig)
except ImportError:  # the attention's layout checks and the missing-extra error are tested without it
    AutoModelForCausalLM = None
needs_hf = pytest.mark.skipif(AutoModelForCausalLM is None, reason="transformers not installed")

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
DOCS = (5, 11, 3)


def llama_config(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


def mistral_config():  # sliding window smaller than a document
    return MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
                         max_position_embeddings=128)


def gemma2_config():  # softcap, sliding window on alternate layers, query_pre_attn_scalar scaling
    return Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                        attn_logit_softcapping=2.0, final_logit_softcapping=None, query_pre_attn_scalar=8,
                        max_position_embeddings=128)


def models(config, *impls, seed=0):
    """Same weights under each attention implementation."""
    hf.register()
    torch.manual_seed(seed)
    first = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impls[0])
    out = [first]
    for impl in impls[1:]:
        m = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
        m.load_state_dict(first.state_dict())
        out.append(m)
    return out


def rows_for(lengths, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for n in lengths]


def run(model, batches):
    """Logits (T, V) fp64 of each batch concatenated, and every parameter's grad of the summed loss."""
    model.zero_grad(set_to_none=True)
    logits, loss = [], 0.0
    for kwargs, keep in batches:
        out = model(**kwargs).logits                                              # (B, S, V)
        keep = torch.ones(out.shape[:2], dtype=torch.bool) if keep is None else keep
        for row in range(out.shape[0]):                                            # one document per row
            lg, ids = out[row][keep[row]], kwargs["input_ids"][row][keep[row]]    # (n, V), (n,)
            logits.append(lg)
            loss = loss + torch.nn.functional.cross_entropy(lg[:-1].float(), ids[1:], reduction="sum")
    loss.backward()
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits).double(), grads


def per_doc(rows):
    return [({"input_ids": torch.tensor([r["input_ids"]])}, None) for r in rows]


def check_rule(ours, eager, ref, atol, what):
    scale = ref.abs().max().item()
    err, base = (ours - ref).abs().max().item(), (eager - ref).abs().max().item()
    assert err <= 2 * base + atol * max(scale, 1.0), f"{what}: err {err:.3g} vs eager {base:.3g} (scale {scale:.3g})"


def run_packed(model, rows, collator):
    model.zero_grad(set_to_none=True)
    b = collator(rows)
    logits = model(**b).logits[0]                                                  # (T, V)
    labels = b["labels"][0]
    # HF's packed loss: logits[t] predicts labels[t+1]; separator (-100) at every document start
    loss = torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="sum")
    loss.backward()
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.double(), grads


def parity(ours, eager, rows, dtype, our_fn):
    ref = copy.deepcopy(eager).double()
    eager, ours = eager.to(dtype), ours.to(dtype)
    ref_l, ref_g = run(ref, per_doc(rows))
    eag_l, eag_g = run(eager, per_doc(rows))
    our_l, our_g = our_fn(ours)
    check_rule(our_l, eag_l, ref_l, ATOL[dtype], "logits")
    assert our_g.keys() == ref_g.keys()
    for name in ref_g:
        check_rule(our_g[name], eag_g[name], ref_g[name], ATOL[dtype], f"grad {name}")


# ================================================================================ parity

@needs_hf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_packed_cu_seq_lens(dtype):
    rows = rows_for(DOCS)
    ours, eager = models(llama_config(), "lengen_varlen", "eager")
    parity(ours, eager, rows, dtype, lambda m: run_packed(m, rows, hf.PackedCollator()))


@needs_hf
@pytest.mark.parametrize("config", ["llama", "mistral", "gemma2"])
def test_parity_packed_position_ids_only(config):
    """DataCollatorWithFlattening without flash kwargs: documents found from restarting position_ids
    (each model must hand position_ids on to the attention)."""
    rows = rows_for(DOCS)
    config = {"llama": llama_config, "mistral": mistral_config, "gemma2": gemma2_config}[config]()
    ours, eager = models(config, "lengen_varlen", "eager")
    parity(ours, eager, rows, torch.float32, lambda m: run_packed(m, rows, DataCollatorWithFlattening()))


@needs_hf
@pytest.mark.parametrize("side", ["right", "left"])
def test_parity_padded_rows(side):
    """One sequence per row with a padding attention_mask; pad outputs are zero."""
    rows = rows_for(DOCS)
    L = max(DOCS)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        sl = slice(0, n) if side == "right" else slice(L - n, L)
        ids[i, sl], mask[i, sl] = torch.tensor(r["input_ids"]), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ours, eager = models(llama_config(), "lengen_varlen", "eager")
    keep = mask.bool()
    parity(ours, eager, rows, torch.float32,
           lambda m: run(m, [({"input_ids": ids, "attention_mask": mask, "position_ids": pos}, keep)]))


@needs_hf
@pytest.mark.parametrize("config", [mistral_config, gemma2_config], ids=["mistral-window-mqa", "gemma2-softcap"])
def test_parity_window_softcap_scaling(config):
    rows = rows_for(DOCS)
    ours, eager = models(config(), "lengen_varlen", "eager")
    parity(ours, eager, rows, torch.float32, lambda m: run_packed(m, rows, hf.PackedCollator()))


def cohere_config():  # GPT-J (interleaved) rotary layout
    from transformers import CohereConfig

    return CohereConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)


def phi_config():  # partial rotary (half the head), q split before apply_rotary_pos_emb
    from transformers import PhiConfig

    # pad_token_id given: transformers 5.0.0's PhiConfig has no default for it
    return PhiConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     partial_rotary_factor=0.5, max_position_embeddings=128, pad_token_id=0)


@needs_hf
@pytest.mark.parametrize("config,interleaved", [(llama_config, False), (cohere_config, True), (phi_config, False)],
                         ids=["llama-neox", "cohere-gptj", "phi-partial"])
def test_parity_fused_rope_patch(monkeypatch, config, interleaved):
    calls = []
    apply_rope = lengen_fast.rope.apply_rope
    monkeypatch.setattr(lengen_fast.rope, "apply_rope",
                        lambda *a, **k: calls.append(k["interleaved"]) or apply_rope(*a, **k))
    rows = rows_for(DOCS)
    ours, eager = models(config(), "lengen_varlen", "eager")
    hf.patch_rope(ours)
    n_probe = len(calls)
    parity(ours, eager, rows, torch.float32, lambda m: run_packed(m, rows, hf.PackedCollator()))
    assert calls[n_probe:] == [interleaved] * 2  # one fused call per layer, in the model's layout
    # an unpatched model of the same class in the same process still uses the original rotation
    plain, eager2 = models(config(), "eager", "eager", seed=3)
    ids = torch.tensor([rows[1]["input_ids"]])
    assert torch.equal(plain(input_ids=ids).logits, eager2(input_ids=ids).logits)
    assert len(calls) == n_probe + 2


SCALED = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def rope_config(theta, scaling):
    """v5 configs take rope_parameters; v4 configs take rope_theta and rope_scaling."""
    if "rope_parameters" in inspect.signature(LlamaConfig).parameters:
        return {"rope_parameters": {"rope_theta": theta, **scaling}}
    return {"rope_theta": theta, "rope_scaling": dict(scaling)}


@needs_hf
@pytest.mark.parametrize("kind", sorted(SCALED))
def test_parity_fused_rope_patch_scaled(kind):
    """The model's own rope config (v5 rope_parameters, v4 rope_theta + rope_scaling) goes through from_hf."""
    if not hasattr(lengen_fast.rope.RopeScaling, "from_hf"):
        pytest.skip("RopeScaling.from_hf arrives with the rope op")
    rows = rows_for(DOCS)
    cfg = llama_config(**rope_config(500.0, SCALED[kind]))
    ours, eager = models(cfg, "lengen_varlen", "eager")
    assert ours.model.rotary_emb.rope_type == kind
    hf.patch_rope(ours)
    parity(ours, eager, rows, torch.float32, lambda m: run_packed(m, rows, hf.PackedCollator()))


@needs_hf
def test_generate_left_padded_matches_eager():
    """Cache decoding: S_q != S_k, per-row documents aligned bottom-right with the valid keys."""
    ours, eager = models(llama_config(), "lengen_varlen", "eager")
    ids = torch.tensor([[0, 0, 0, 5, 17, 9, 33], [4, 8, 15, 16, 23, 42, 7]])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))


@needs_hf
def test_compile_fullgraph_no_graph_break():
    """Packed kwargs and restarting position_ids trace with no graph break (fused RoPE patched too)."""
    try:
        torch.ops.lengen.varlen_attention_fwd
    except (AttributeError, RuntimeError):
        pytest.skip("the lengen::varlen_attention_fwd custom op arrives with the attention op")
    (model,) = models(llama_config(num_hidden_layers=1), "lengen_varlen")
    hf.patch_rope(model)
    b = hf.PackedCollator()(rows_for(DOCS))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    # a training-style forward: no KV cache (4.54/4.55's DynamicCache() constructor itself breaks the graph)
    for kw in ({k: v for k, v in b.items() if k != "labels"},
               {"input_ids": b["input_ids"], "position_ids": b["position_ids"]}):
        kw["use_cache"] = False
        torch.testing.assert_close(compiled(**kw).logits, model(**kw).logits)


# ================================================================================ trainer

@needs_hf
@pytest.mark.parametrize("source", ["hf-rows", "packed-loader"])
def test_trainer_run_with_collator(tmp_path, monkeypatch, source):
    """HF Trainer + PackedCollator on dataset rows, or on our PackedLoader's batches (batch size 1)."""
    from transformers import Trainer, TrainingArguments

    pytest.importorskip("accelerate")
    g = torch.Generator().manual_seed(0)
    if source == "hf-rows":
        train = [{"input_ids": torch.randint(0, 97, (int(n),), generator=g).tolist()}
                 for n in torch.randint(4, 17, (24,), generator=g)]
        batch_size = 4
    else:
        data = pytest.importorskip("lengen_fast.data")
        if not hasattr(data, "PackedLoader"):
            pytest.skip("lengen_fast.data.PackedLoader arrives with the data pipeline")
        loader = data.PackedLoader(data.synthetic_source(200, "uniform", mean=24, vocab_size=97),
                                   data.LoaderConfig(strategy="vsl", tokens_per_batch=256, max_len=64, min_len=8,
                                                     prefetch=0, infinite=True))

        class Batches(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(loader)

        train, batch_size = Batches(), 1
    seen = []
    varlen = lengen_fast.attention.varlen_attention

    def spy(q, k, v, cu_q, *a, **kw):
        seen.append(cu_q.numel() - 1)
        return varlen(q, k, v, cu_q, *a, **kw)

    monkeypatch.setattr(lengen_fast.attention, "varlen_attention", spy)
    (model,) = models(llama_config(), "lengen_varlen")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=batch_size,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-3,
                             disable_tqdm=True, dataloader_num_workers=0,
                             # an IterableDataset's packed batches must not be sliced by accelerate
                             accelerator_config={"dispatch_batches": False} if source == "packed-loader" else None)
    result = Trainer(model=model, args=args, train_dataset=train, data_collator=hf.PackedCollator()).train()
    assert result.global_step == 3 and np.isfinite(result.training_loss)
    assert seen and min(seen) > 1  # packed batches of several documents, through cu_seq_lens
    if source == "hf-rows":
        assert set(seen) == {4}


# =============================================================================== collator

def _equal(ours: dict, theirs: dict):
    assert list(ours) == list(theirs)
    for key in theirs:
        a, b = ours[key], theirs[key]
        assert type(a) is type(b), key
        if isinstance(b, (torch.Tensor, np.ndarray)):
            assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), key
        else:
            assert a == b, key


OPTIONS = [dict(return_flash_attn_kwargs=True), dict(), dict(return_seq_idx=True, position_ids_start=2),
           dict(separator_id=-1, return_position_ids=False), dict(return_tensors="np", return_flash_attn_kwargs=True)]


@needs_hf
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_collator_matches_hf(opts):
    try:
        theirs = DataCollatorWithFlattening(**opts)
    except TypeError as e:  # position_ids_start arrived after transformers 5.0
        pytest.skip(f"this transformers' DataCollatorWithFlattening lacks an option: {e}")
    g = np.random.default_rng(0)
    lists = [{"input_ids": g.integers(0, 97, n).tolist()} for n in (3, 1, 7)]
    labelled = [{"input_ids": r["input_ids"], "labels": [-100 if j < 2 else x for j, x in enumerate(r["input_ids"])]}
                for r in lists]
    ours = hf.PackedCollator(**{"return_flash_attn_kwargs": False, **opts})
    for rows in (lists, labelled):
        mixed = copy.deepcopy(rows)                 # ours also takes tensors and arrays (HF 4.x does not)
        mixed[1]["input_ids"] = torch.tensor(mixed[1]["input_ids"])
        mixed[2]["input_ids"] = np.asarray(mixed[2]["input_ids"])
        want = theirs(rows)
        _equal(ours(rows), want)
        _equal(ours(mixed), want)


@needs_hf
def test_collator_defaults_add_flash_kwargs():
    rows = rows_for((4, 2))
    _equal(hf.PackedCollator()(rows), DataCollatorWithFlattening(return_flash_attn_kwargs=True)(rows))


@needs_hf
@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=20), min_size=1, max_size=6), st.booleans())
def test_collator_fuzz(docs, with_labels):
    rows = [{"input_ids": d, **({"labels": [x if x % 3 else -100 for x in d]} if with_labels else {})} for d in docs]
    _equal(hf.PackedCollator()(rows), DataCollatorWithFlattening(return_flash_attn_kwargs=True)(rows))


def pipeline_batch(docs, pad=0, ignore=-100):
    """Our loader's layout: flat input_ids, next-token labels with ignore_index across documents."""
    ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs] + [np.zeros(pad, dtype=np.int64)])
    cu = np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int32)
    labels = np.full(ids.size, ignore, dtype=np.int64)
    for a, b in zip(cu[:-1], cu[1:]):
        labels[a:b - 1] = ids[a + 1:b]
    pos = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(pad, dtype=np.int64)])
    lens = [len(d) for d in docs]
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), "cu_seqlens": torch.from_numpy(cu),
            "position_ids": torch.from_numpy(pos), "max_seqlen": max(lens), "seq_len": ids.size}


@needs_hf
@pytest.mark.parametrize("wrap", [False, True], ids=["batch", "list-of-one"])
def test_collator_pipeline_batch(wrap):
    docs = [[5, 6, 7], [], [8], [9, 10, 11, 12]]  # a zero-length document and 2 padding tokens
    batch = pipeline_batch(docs, pad=2)
    want = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs if d])
    _equal(hf.PackedCollator()([batch] if wrap else batch), want)


@needs_hf
def test_collator_packed_loader_batch():
    """A real lengen_fast.data.PackedLoader batch: pieces become documents, padding is dropped."""
    data = pytest.importorskip("lengen_fast.data")
    if not hasattr(data, "PackedLoader"):
        pytest.skip("lengen_fast.data.PackedLoader arrives with the data pipeline")
    loader = data.PackedLoader(data.synthetic_source(40, "uniform", mean=24, vocab_size=97),
                               data.LoaderConfig(strategy="pack", tokens_per_batch=256, max_len=64, min_len=8,
                                                 prefetch=0))
    batch = next(iter(loader))
    cu = batch.cu_seqlens.tolist()
    pieces = [{"input_ids": batch.input_ids[a:b].tolist()} for a, b in zip(cu[:-1], cu[1:]) if b > a]
    got = hf.PackedCollator()(batch)
    _equal(got, DataCollatorWithFlattening(return_flash_attn_kwargs=True)(pieces))
    assert torch.equal(got["position_ids"][0], batch.position_ids[:cu[-1]])


BAD_COLLATE = [
    ([], ValueError, "non-empty"),
    ([{"ids": [1]}], ValueError, "mapping with 'input_ids'"),
    ([[1, 2, 3]], ValueError, "mapping with 'input_ids'"),
    ([{"input_ids": []}], ValueError, r"features\[0\]\['input_ids'\] is empty"),
    ([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], ValueError, "lacks 'labels'"),
    ([{"input_ids": [1, 2], "labels": [1]}], ValueError, "1 labels for 2 input_ids"),
    ([{"input_ids": [1.5, 2.0]}], TypeError, "must hold integers"),
    ({"input_ids": [1, 2, 3], "cu_seqlens": [0, 2, 5]}, ValueError, "cu_seqlens.*end at or"),
    ({"input_ids": [1, 2, 3], "cu_seqlens": [1, 3]}, ValueError, "cu_seqlens.*start at 0"),
    ({"input_ids": [1, 2, 3], "cu_seqlens": [0, 0]}, ValueError, "holds no tokens"),
    ({"input_ids": [1, 2, 3], "cu_seqlens": [0, 3], "labels": [1]}, ValueError, "1 labels for 3"),
]


@pytest.mark.parametrize("features,exc,match", BAD_COLLATE)
def test_collator_bad_input(features, exc, match):
    with pytest.raises(exc, match=match):
        hf.PackedCollator()(features)


def test_collator_bad_return_tensors():
    with pytest.raises(ValueError, match="return_tensors"):
        hf.PackedCollator(return_tensors="tf")(rows_for((2,)))


# ===================================================================== attention layouts

def _flat(x):  # (B, H, S, D) -> (B*S, H, D)
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4), min_size=1, max_size=3), st.integers(0, 3))
def test_position_ids_layouts(rows_docs, window):
    """Restarting position_ids (rows of several documents, single-token documents) == cu_seqlens."""
    S = max(sum(r) for r in rows_docs)
    rows = [r + ([S - sum(r)] if sum(r) < S else []) for r in rows_docs]
    pos = torch.tensor([[p for n in r for p in range(n)] for r in rows])
    q, k, v = _qkv(B=len(rows), S=S)
    sw = window or None
    out, _ = hf.lengen_attention_forward(_Module(), q, k, v, None, position_ids=pos, sliding_window=sw)
    cu = torch.tensor(np.concatenate(([0], np.cumsum([n for r in rows for n in r]))), dtype=torch.int32)
    want = varlen_attention_ref(_flat(q), _flat(k), _flat(v), cu, window_size=(window - 1, -1) if sw else (-1, -1))
    torch.testing.assert_close(out.reshape(-1, 4, 8), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), min_size=1, max_size=3), st.integers(0, 2))
def test_padding_mask_layouts(pads, extra):
    """Left/right/both-sided padding, fully padded rows; decoding (S_q < S_k) aligns bottom-right."""
    S = max(1, max(a + n for a, n in pads) + extra)
    mask = torch.zeros(len(pads), S, dtype=torch.long)
    for i, (a, n) in enumerate(pads):
        mask[i, a:a + n] = 1
    q, k, v = _qkv(B=len(pads), S=S)
    for s_q in {S, 1}:
        qq = q[:, :, S - s_q:]
        out, _ = hf.lengen_attention_forward(_Module(), qq, k, v, mask)               # (B, s_q, H, D)
        for i, (a, n) in enumerate(pads):
            if s_q == S:
                want = torch.zeros_like(out[i])
                if n:
                    cu = torch.tensor([0, n], dtype=torch.int32)
                    want[a:a + n] = varlen_attention_ref(_flat(q[i:i + 1, :, a:a + n]), _flat(k[i:i + 1, :, a:a + n]),
                                                         _flat(v[i:i + 1, :, a:a + n]), cu)
            else:
                cu_q, cu_k = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32)
                want = varlen_attention_ref(_flat(qq[i:i + 1]), _flat(k[i:i + 1, :, a:a + n]),
                                            _flat(v[i:i + 1, :, a:a + n]), cu_q, cu_k)
            torch.testing.assert_close(out[i], want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["cu_seq_lens", "position_ids"])
def test_gpu_packed_attention_no_host_sync(layout):
    """The packed paths on CUDA in bf16: flash-attn's tolerance rule and no host sync."""
    lengths = [37, 1, 200, 90]
    T, H, H_kv, D = sum(lengths), 8, 2, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H, H_kv, H_kv))
    cu = torch.tensor(np.concatenate(([0], np.cumsum(lengths))), dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    kw = (dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
          if layout == "cu_seq_lens" else dict(position_ids=pos))
    hf.lengen_attention_forward(_Module(), q, k, v, None, **kw)                   # warm-up / autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = hf.lengen_attention_forward(_Module(), q, k, v, None, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = varlen_attention_ref(_flat(q), _flat(k), _flat(v), cu)
    eager = varlen_attention_ref(_flat(q), _flat(k), _flat(v), cu, upcast=False)
    err = (out.reshape(T, H, D).float() - ref.float()).abs().max().item()
    assert err <= 2 * (eager.float() - ref.float()).abs().max().item() + 1e-3


# ============================================================================== bad input

def test_register_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install lengen_fast\[hf\]"):
        hf.register()
    with pytest.raises(ImportError, match=r"pip install lengen_fast\[hf\]"):
        hf.patch_rope(torch.nn.Linear(2, 2))


@needs_hf
def test_register_transformers_too_old(monkeypatch):
    """transformers < 4.53 has no masking_utils: the error names the installed and the required versions."""
    import transformers

    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)
    found = re.escape(transformers.__version__)
    with pytest.raises(ImportError, match=rf"needs transformers>=4\.53 \(found {found}\)"):
        hf.register()


def test_min_transformers_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.exists():
        pytest.skip("no pyproject.toml beside the tests (installed package)")
    extras = tomllib.loads(path.read_text())["project"]["optional-dependencies"]
    for extra in ("hf", "test"):
        assert f"transformers>={hf.MIN_TRANSFORMERS}" in extras[extra], extra


def _qkv(B=1, H=4, H_kv=2, S=6, D=8):
    return torch.randn(B, H, S, D), torch.randn(B, H_kv, S, D), torch.randn(B, H_kv, S, D)


class _Module(torch.nn.Module):
    is_causal = True


BAD_ATTN = [
    (dict(attention_mask=torch.zeros(1, 1, 6, 6)), "2-D padding attention_mask"),
    (dict(dropout=0.1), "attention dropout"),
    (dict(s_aux=torch.zeros(4)), "attention sinks"),
    (dict(attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1]])), "contiguous run"),
    (dict(attention_mask=torch.ones(1, 6, dtype=torch.long), cu_seq_lens_q=torch.tensor([0, 6], dtype=torch.int32)),
     "both a padding attention_mask and cu_seq_lens"),
    (dict(attention_mask=torch.ones(2, 6, dtype=torch.long)), "does not match"),
    (dict(position_ids=torch.zeros(3, 1, 6, dtype=torch.long)), "M-RoPE"),
    (dict(cu_seq_lens_q=torch.tensor([0], dtype=torch.int32)), "dispatch_batches"),
    (dict(cu_seq_lens_q=torch.tensor([0, 6], dtype=torch.int32), cu_seq_lens_k=torch.tensor([0, 3, 6])),
     "equal-length"),
]


@pytest.mark.parametrize("kwargs,match", BAD_ATTN, ids=[m for _, m in BAD_ATTN])
def test_attention_bad_layout(kwargs, match):
    q, k, v = _qkv()
    mask = kwargs.pop("attention_mask", None)
    with pytest.raises(ValueError, match=match):
        hf.lengen_attention_forward(_Module(), q, k, v, mask, **kwargs)


def test_attention_bad_heads():
    q, k, v = _qkv(H=4, H_kv=3)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        hf.lengen_attention_forward(_Module(), q, k, v, None)


@needs_hf
def test_model_with_4d_mask_or_dropout_raises():
    (model,) = models(llama_config(attention_dropout=0.1), "lengen_varlen")
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="2-D padding attention_mask"):
        model.eval()(input_ids=ids, attention_mask=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="attention dropout"):
        model.train()(input_ids=ids)


@needs_hf
def test_patch_rope_unsupported_models():
    (gpt2,) = models(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64), "eager")
    with pytest.raises(ValueError, match="one rotary embedding"):
        hf.patch_rope(gpt2)
    (llama,) = models(llama_config(), "eager")
    llama.model.rotary_emb.inv_freq.mul_(1.5)  # the model no longer rotates as its config says
    if hasattr(llama.model.rotary_emb, "original_inv_freq"):
        llama.model.rotary_emb.original_inv_freq.mul_(1.5)
    with pytest.raises(ValueError, match="does not match"):
        hf.patch_rope(llama)
