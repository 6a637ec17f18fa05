"""How does one of our trained Transformers become a Llama checkpoint that transformers loads?

    export_llama("runs/x/ckpt/vsl_s0.pt", "exported/", context=512)   # or a Transformer instance
    AutoModelForCausalLM.from_pretrained("exported/"); AutoTokenizer.from_pretrained("exported/")

Our blocks are Llama's: pre-norm RMSNorm (eps 1e-6, no bias), attention with no biases and RoPE in the NeoX
(rotate_half) layout that ``apply_rope`` uses by default (``interleaved=False``), so q/k need no permutation
(Meta's original Llama weights do; ours don't), and a SwiGLU MLP whose fused ``up`` holds [gate | up]:
``down(silu(up_a) * up_b)`` is Llama's ``down_proj(silu(gate_proj(x)) * up_proj(x))``. Weights map as

    embed -> model.embed_tokens            blocks.i.norm1 -> model.layers.i.input_layernorm
    blocks.i.attn.qkv [q | k | v] -> q_proj, k_proj, v_proj        blocks.i.attn.proj -> o_proj
    blocks.i.norm2 -> post_attention_layernorm
    blocks.i.mlp.up [gate | up] -> gate_proj, up_proj              blocks.i.mlp.down -> down_proj
    norm -> model.norm                     head -> lm_head (tied to embed_tokens when tie_embeddings)

A GELU MLP (``down(gelu(up(x)))``) has no gate, and Llama's MLP is always gated, so it cannot be represented;
neither can learned or absent positions. Both are refused with the reason.
``byte_tokenizer`` is the tokenizer of the embedded corpus: ids 0..255 are the bytes, 256 is the end-of-document
token "<|eod|>" (EOD), so the exported directory is self-contained.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ...fsio import TMP_PREFIX, atomic_write_text

EOD = 256
EOD_TOKEN = "<|eod|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A transformers fast tokenizer: byte b -> id b (0..255), "<|eod|>" -> 256 (the eos token); vocabulary 257."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))        # no merges: every byte is its own token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
    if tok.token_to_id(EOD_TOKEN) != EOD:
        raise RuntimeError(f"byte_tokenizer: {EOD_TOKEN} got id {tok.token_to_id(EOD_TOKEN)}, expected {EOD}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD_TOKEN)


def _check_exportable(cfg) -> None:
    if cfg.mlp != "swiglu":
        raise ValueError(f"export_llama: the model's MLP is {cfg.mlp!r}; Llama's MLP is always gated "
                         "(down_proj(silu(gate_proj(x)) * up_proj(x))), and a GELU MLP down(gelu(up(x))) has no gate "
                         "and another activation, so Llama cannot represent it. Train with mlp='swiglu' to export.")
    if cfg.pos_encoding != "rope":
        raise ValueError(f"export_llama: the model's positions are {cfg.pos_encoding!r}; Llama encodes positions "
                         "with RoPE only, so it cannot represent learned or absent positions")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"export_llama: d_model={cfg.d_model} is not a multiple of n_heads={cfg.n_heads}")


def llama_config(model, *, context: int | None = None, eos_token_id: int | None = EOD):
    """The LlamaConfig equivalent to our Transformer ``model`` (see module doc)."""
    from transformers import LlamaConfig

    cfg = model.cfg
    _check_exportable(cfg)
    kv = cfg.n_kv_heads or cfg.n_heads
    ffn = model.blocks[0].mlp.down.in_features if len(model.blocks) else 0
    kw = dict(vocab_size=model.vocab_size, hidden_size=cfg.d_model, intermediate_size=ffn,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=kv,
              head_dim=cfg.d_model // cfg.n_heads, max_position_embeddings=int(context or cfg.max_positions),
              rms_norm_eps=float(model.norm.eps), tie_word_embeddings=bool(cfg.tie_embeddings), hidden_act="silu",
              attention_bias=False, mlp_bias=False, attention_dropout=0.0, bos_token_id=None,
              eos_token_id=eos_token_id, pad_token_id=None)
    try:
        return LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)}, **kw)
    except TypeError:  # transformers 4: rope_theta on the config
        return LlamaConfig(rope_theta=float(cfg.rope_base), **kw)


def llama_state_dict(model) -> dict[str, torch.Tensor]:
    """Our Transformer's weights under LlamaForCausalLM's names (the map in the module doc)."""
    cfg = model.cfg
    _check_exportable(cfg)
    h, kv, dh = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.d_model // cfg.n_heads
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.head.weight}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = blk.attn.qkv.weight.split([h * dh, kv * dh, kv * dh], dim=0)     # rows: [q | k | v]
        gate, up = blk.mlp.up.weight.chunk(2, dim=0)                               # rows: [gate | up]
        sd.update({p + "input_layernorm.weight": blk.norm1.weight, p + "post_attention_layernorm.weight": blk.norm2.weight,
                   p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": blk.attn.proj.weight, p + "mlp.gate_proj.weight": gate,
                   p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": blk.mlp.down.weight})
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def _tokenizer(spec, vocab_size: int):
    if spec is None:
        return None
    if spec == "bytes":
        if vocab_size != EOD + 1:
            raise ValueError(f"export_llama: tokenizer='bytes' is the embedded corpus's byte tokenizer (vocabulary "
                             f"{EOD + 1}), but the model has {vocab_size} tokens; pass tokenizer= a directory or object")
        return byte_tokenizer()
    if isinstance(spec, (str, os.PathLike)):
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(str(spec), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the path
            raise ValueError(f"export_llama: cannot load a tokenizer from {str(spec)!r}: {e}") from e
    if not hasattr(spec, "save_pretrained"):
        raise TypeError(f"export_llama: tokenizer must be 'bytes', a directory or a transformers tokenizer, "
                        f"got {type(spec).__name__}")
    return spec


def export_llama(model_or_checkpoint, out_dir, *, tokenizer="bytes", context: int | None = None,
                 overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Save our Transformer (an instance, or a checkpoint .pt holding "model_config" and "model") as a Llama
    checkpoint directory that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load; returns ``out_dir``.

    tokenizer: "bytes" (the embedded corpus's byte tokenizer), a tokenizer directory or object, or None.
    context: the training context, written as ``max_position_embeddings`` (lengen-eval reads it as L); default
    the one a lengen-train checkpoint records, else the model's ``max_positions``. The directory appears whole or not at all (written beside it, then renamed);
    an existing non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    from transformers import LlamaForCausalLM

    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        from ...eval.checkpoint import load_lengen_checkpoint
        model = load_lengen_checkpoint(model_or_checkpoint)
    else:
        model = model_or_checkpoint
    if not hasattr(model, "cfg") or not hasattr(model, "blocks"):
        raise TypeError(f"export_llama: expected a lengen_fast Transformer or a checkpoint path, got "
                        f"{type(model).__name__}")
    if context is None and getattr(model, "trained_context", None):   # recorded by lengen-train checkpoints
        context = int(model.trained_context)
    if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
        raise ValueError(f"export_llama: context must be a positive int (the training context), got {context!r}")
    tok = _tokenizer(tokenizer, model.vocab_size)
    eos = EOD if tokenizer == "bytes" else getattr(tok, "eos_token_id", None)
    config = llama_config(model, context=context, eos_token_id=eos)
    sd = llama_state_dict(model)
    hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]:
        raise RuntimeError(f"export_llama: weight map incomplete (missing {missing}, unexpected {unexpected})")
    if dtype is not None:
        hf = hf.to(dtype)
    return save_pretrained_dir(hf, out_dir, tok, config.max_position_embeddings, source=model_or_checkpoint,
                               overwrite=overwrite)


def save_pretrained_dir(hf, out_dir, tok, context: int, *, source, overwrite: bool = False) -> Path:
    """``hf.save_pretrained`` (+ the tokenizer, + lengen_export.json with the context) into ``out_dir``, written beside
    it and renamed into place: the directory appears whole or not at all."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"export_llama: {str(out)!r} exists and is not an empty directory; pass overwrite=True")
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        atomic_write_text(tmp / "lengen_export.json",
                          '{"format": "lengen-export", "source": %s, "context": %d}\n' % (_json_str(source), context))
        if out.exists():
            old = out.with_name(f"{TMP_PREFIX}{out.name}.old.{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _json_str(x) -> str:
    import json
    return json.dumps(str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__)
