"""How does a transformers causal LM run inside our engine, with our Transformer's exact forward signature?

    model = load_hf_model("path/to/checkpoint")       # or a config.json (random init), or HFEngineModel(hf_model)
    loss = model(tokens, cu_seqlens, max_seqlen, positions, labels=labels)          # summed next-token loss
    logits = model(tokens, cu_seqlens, max_seqlen, positions)                       # (N, V)

The adapter feeds the flat packed batch to the HF model as one row: ``position_ids`` = positions and the
FlashAttention kwargs ``cu_seq_lens_q/k`` = cu_seqlens, so with the "lengen_varlen" attention (set by
``load_hf_model``) documents never attend across cu_seqlens boundaries and no (S, S) mask exists. A model
built with another attention runs one document per forward instead (correct, slower). RoPE goes through
``patch_rope``, so ``rope_scaling`` (a RopeScaling) changes the rotation for one call only, as in our
Transformer; None means the checkpoint's own RoPE config. ``cfg`` carries the shape fields FLOP counting reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ATTN_NAME, register
from .rope_patch import patch_rope, rope_scaling_override


@dataclass(frozen=True)
class ModelShape:
    """The fields of our ModelConfig that the engine reads (FLOP counting, logging), from a transformers config."""
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    max_positions: int | None
    tie_embeddings: bool
    model_type: str
    pos_encoding: str = "rope"

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        return cls(n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=heads,
                   n_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   d_ff=getattr(c, "intermediate_size", 0) or 0, vocab_size=c.vocab_size,
                   max_positions=getattr(c, "max_position_embeddings", None),
                   tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                   model_type=getattr(c, "model_type", type(c).__name__))


def _check_batch(tokens, cu_seqlens, positions, labels) -> None:
    if tokens.dim() != 1 or positions.shape != tokens.shape:
        raise ValueError(f"HFEngineModel: tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must "
                         "both be flat (N,)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"HFEngineModel: cu_seqlens must be (B+1,) int32, got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    if labels is not None and labels.shape != tokens.shape:
        raise ValueError(f"HFEngineModel: labels {tuple(labels.shape)} must match tokens {tuple(tokens.shape)}")


class HFEngineModel(nn.Module):
    """A transformers causal LM behind our Transformer's forward (see module doc). ``hf``: the wrapped model."""

    def __init__(self, hf_model: nn.Module, *, patch: bool = True):
        super().__init__()
        self.hf = hf_model
        self.cfg = ModelShape.from_config(hf_model.config)
        self.vocab_size = self.cfg.vocab_size
        self.packed = getattr(hf_model.config, "_attn_implementation", None) == ATTN_NAME
        self.rope_patched = False
        if patch:
            try:
                patch_rope(hf_model)
                self.rope_patched = True
            except ValueError as e:  # kept as HF rotates; rope_scaling is then refused
                self.rope_error = str(e)
        c = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
        self.final_softcap = getattr(c, "final_logit_softcapping", None) or None
        self.logit_scale = getattr(c, "logit_scale", None)
        self.attn_backend = None  # our Transformer's attribute; the HF attention uses lengen_fast's default order

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------------------------------- pieces
    def hidden(self, tokens, cu_seqlens, max_seqlen: int, positions, rope_scaling=None) -> torch.Tensor:
        """Final-norm hidden states (N, d) of a flat packed batch."""
        _check_batch(tokens, cu_seqlens, positions, None)
        if rope_scaling is not None and not self.rope_patched:
            raise ValueError(f"HFEngineModel: rope_scaling needs our fused RoPE, and this model could not be patched: "
                             f"{getattr(self, 'rope_error', '')}")
        decoder = self.hf.get_decoder()
        ctx = rope_scaling_override(self.hf, rope_scaling) if self.rope_patched else _null()
        with ctx:
            if self.packed:
                out = decoder(input_ids=tokens[None], position_ids=positions[None], use_cache=False,
                              cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                              max_length_q=int(max_seqlen), max_length_k=int(max_seqlen))
                return out.last_hidden_state[0]
            cu = cu_seqlens.tolist()  # another attention: one document per forward, so none attends across
            parts = [decoder(input_ids=tokens[None, a:b], position_ids=positions[None, a:b],
                             use_cache=False).last_hidden_state[0] for a, b in zip(cu[:-1], cu[1:]) if b > a]
            tail = tokens.shape[0] - cu[-1]  # tokens after cu_seqlens[-1] (padding): their own segment
            if tail:
                parts.append(decoder(input_ids=tokens[None, cu[-1]:], position_ids=positions[None, cu[-1]:],
                                     use_cache=False).last_hidden_state[0])
            return torch.cat(parts) if parts else tokens.new_zeros((0, self.cfg.d_model), dtype=torch.float32)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states, with the model's final softcap / logit scale where it has one."""
        logits = self.hf.get_output_embeddings()(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def logits_at(self, tokens, cu_seqlens, max_seqlen: int, positions, index, rope_scaling=None) -> torch.Tensor:
        """Logits (len(index), V) at the flat positions ``index`` only (no (N, V) tensor)."""
        return self.head(self.hidden(tokens, cu_seqlens, max_seqlen, positions, rope_scaling)[index])

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, tokens, cu_seqlens, max_seqlen: int, positions, rope_scaling=None, *, labels=None,
                loss_chunk: int = 4096, reduction: str = "sum"):
        """tokens, positions: (N,) int64; cu_seqlens: (B+1,) int32. Logits (N, V), or with ``labels`` (N,) (the
        target of each position, -100 = none) the next-token loss: "sum", "mean" or per-token "none" (0 where
        ignored), computed ``loss_chunk`` rows at a time so (N, V) logits are never held whole."""
        _check_batch(tokens, cu_seqlens, positions, labels)
        h = self.hidden(tokens, cu_seqlens, max_seqlen, positions, rope_scaling)             # (N, d)
        if labels is None:
            return self.head(h)
        head = self.hf.get_output_embeddings()
        plain = (self.logit_scale is None and not self.final_softcap and isinstance(head, nn.Linear)
                 and head.bias is None)
        if plain:
            from ...train.model import chunked_cross_entropy  # our Transformer's loss, so both compute alike
            return chunked_cross_entropy(h, head.weight, labels, chunk=loss_chunk, reduction=reduction)
        if reduction == "none":
            out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
            with torch.no_grad():
                for a in range(0, h.shape[0], loss_chunk):
                    out[a:a + loss_chunk] = F.cross_entropy(self.head(h[a:a + loss_chunk]).float(),
                                                            labels[a:a + loss_chunk], reduction="none")
            return out
        if reduction not in ("sum", "mean"):
            raise ValueError(f"HFEngineModel: reduction must be sum, mean or none, got {reduction!r}")
        return F.cross_entropy(self.head(h).float(), labels, reduction=reduction)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _read_config(path: Path):
    from transformers import AutoConfig

    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"load_hf_model: cannot read {str(path)!r} as JSON: {e}") from e
    if not isinstance(d, dict) or "model_type" not in d:
        raise ValueError(f"load_hf_model: {str(path)!r} is not a transformers config (no 'model_type' key)")
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as e:
        raise ValueError(f"load_hf_model: {str(path)!r}: transformers does not know model_type {model_type!r}") from e


def load_hf_model(path, *, dtype: torch.dtype | None = None, device=None, patch: bool = True) -> HFEngineModel:
    """A transformers causal LM as an :class:`HFEngineModel`, with the "lengen_varlen" attention.

    path: a checkpoint directory (``from_pretrained``, local files only) or a config.json, or a directory holding
    only a config.json (a randomly initialised model; seed torch first). dtype: the parameters' dtype (default: the checkpoint's, fp32 for a
    config). Nothing is downloaded.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    register()
    kw = {"attn_implementation": ATTN_NAME}
    weights = path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))
    if path.is_dir() and (path / "config.json").is_file() and not weights:
        path = path / "config.json"       # a directory with a config and no weights: a fresh model of that config
    if path.is_file():
        cfg = _read_config(path)
        model = AutoModelForCausalLM.from_config(cfg, **kw)
        if dtype is not None:
            model = model.to(dtype)
    elif (path / "config.json").is_file():
        if dtype is not None:
            kw["dtype"] = dtype
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kw)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            kw["torch_dtype"] = kw.pop("dtype")
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kw)
    else:
        raise FileNotFoundError(f"load_hf_model: {str(path)!r} is neither a config.json nor a directory holding one")
    if device is not None:
        model = model.to(device)
    model.eval()
    return HFEngineModel(model, patch=patch)
