"""What model is at this path, which tokenizer reads its text, and how long a context was it trained on?

``load_model(path, ...)`` accepts
  - a transformers checkpoint directory (config.json + weights; Llama, Mistral, Qwen2 and other causal LMs whose
    rotary code ``patch_rope`` accepts), also the directories ``export_llama`` writes;
  - one of our checkpoints: a torch.save'd dict with "model_config" (ModelConfig fields) and "model" (state_dict)
    (only those two keys are read, with ``weights_only=True``: a checkpoint is an untrusted file).
Either way the result's ``model`` has our Transformer's forward signature plus ``logits_at`` (logits at chosen
flat positions only), so the evaluation code never branches on the kind.
The trained context L: ``--context``, else an export's lengen_export.json, else the config's rope ``original_max_position_embeddings`` when it
has a scaling, else ``max_position_embeddings``; our .pt files record it under "context" (lengen-train's seq_len).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import EvalError


@dataclass
class LoadedModel:
    model: nn.Module                  # forward(tokens, cu_seqlens, max_seqlen, positions, rope_scaling, *, labels,
                                      # loss_chunk, reduction) and logits_at(..., index, rope_scaling)
    tokenizer: object                 # a transformers tokenizer (callable; bos/eos ids)
    kind: str                         # "hf" | "lengen"
    path: Path
    name: str
    context: int                      # L
    context_source: str               # where L came from, for the report
    hard_max_positions: int | None    # positions the model cannot go past (learned tables); None for RoPE
    has_rope: bool
    hf_config: object                 # transformers config the RoPE checks build from (a LlamaConfig for ours)
    rotary_cls: object = None         # the model's rotary embedding class (None: Llama's)
    apply_fn: object = None           # its modeling module's apply_rotary_pos_emb (None: Llama's)
    base: float = 10000.0
    rotary_dim: int = 0
    head_dim: int = 0
    interleaved: bool = False
    config_scaling: object = None     # the checkpoint's own RopeScaling (kind "none" when unscaled)
    shape: dict = field(default_factory=dict)   # d_model, d_ff, n_layers, vocab_size: the memory estimate's inputs


class LengenEvalModel(nn.Module):
    """Our Transformer with ``logits_at`` (it computes the (N, V) logits; our vocabularies are small)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner, self.cfg, self.vocab_size = model, model.cfg, model.vocab_size

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def logits_at(self, tokens, cu_seqlens, max_seqlen, positions, index, rope_scaling=None):
        return self.inner(tokens, cu_seqlens, max_seqlen, positions, rope_scaling)[index]


def load_lengen_checkpoint(path) -> nn.Module:
    """Our Transformer from a checkpoint file holding "model_config" and "model"; errors name the file and key."""
    from ..train.config import ModelConfig
    from ..train.model import Transformer

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{str(path)!r} is not a file")
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of many kinds: say which file
        raise EvalError(f"{str(path)!r} is not a checkpoint torch can read safely (weights_only=True): {e}") from e
    if not isinstance(ck, dict):
        raise EvalError(f"{str(path)!r} holds a {type(ck).__name__}, not a checkpoint dict with 'model_config' and 'model'")
    for key in ("model_config", "model"):
        if not isinstance(ck.get(key), dict):
            raise EvalError(f"{str(path)!r}: key {key!r} is missing or not a dict (a lengen_fast checkpoint holds "
                            "'model_config' and 'model')")
    known = set(ModelConfig.__dataclass_fields__)
    extra = sorted(set(ck["model_config"]) - known)
    if extra:
        raise EvalError(f"{str(path)!r}: model_config has keys this lengen_fast's ModelConfig does not know: {extra}")
    cfg = ModelConfig(**ck["model_config"])
    emb = ck["model"].get("embed.weight")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise EvalError(f"{str(path)!r}: key 'model' has no 2-D 'embed.weight' to read the vocabulary from")
    model = Transformer(cfg, int(emb.shape[0]))
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise EvalError(f"{str(path)!r}: 'model' does not fit its 'model_config': {e}") from e
    model.trained_context = ck.get("context") if isinstance(ck.get("context"), int) else None
    return model.eval()


def _tokenizer(spec, where: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ...: name the path
        raise EvalError(f"no usable tokenizer in {str(spec)!r} (tokenizer.json / tokenizer_config.json) for the "
                        f"model {str(where)!r}; pass --tokenizer DIR: {type(e).__name__}: {e}") from e


def _hf_context(config) -> tuple[int, str]:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if isinstance(params, dict) and params.get("rope_type", params.get("type", "default")) != "default" \
            and params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"]), "config.json rope original_max_position_embeddings"
    mpe = getattr(c, "max_position_embeddings", None)
    if not mpe:
        raise EvalError("config.json has no max_position_embeddings to read the trained context from; pass --context")
    return int(mpe), "config.json max_position_embeddings"


def _load_hf(path: Path, tokenizer, dtype, device) -> LoadedModel:
    from ..integrations.hf.engine_model import load_hf_model
    from ..integrations.hf.rope_patch import rotary_module
    from ..rope import rope_config_from_hf

    try:
        m = load_hf_model(path, dtype=dtype, device=device)
    except Exception as e:  # noqa: BLE001 - transformers raises anything from a bad config: name the directory
        raise EvalError(f"{str(path)!r}: transformers cannot load it as a causal LM: {type(e).__name__}: {e}") from e
    config = m.hf.config.get_text_config() if hasattr(m.hf.config, "get_text_config") else m.hf.config
    try:
        rope = rope_config_from_hf(config)
    except (ValueError, TypeError) as e:
        raise EvalError(f"{str(path / 'config.json')!r}: its RoPE config cannot be reproduced: {e}") from e
    if not m.rope_patched:
        raise EvalError(f"{str(path)!r}: its RoPE cannot be reproduced by lengen_fast's fused RoPE, so no scaling arm "
                        f"could be applied: {getattr(m, 'rope_error', '')}")
    rot = rotary_module(m.hf)
    info = rot._lengen_rope                     # what patch_rope found: base, rotary dim, layout, apply function
    L, src = _hf_context(config)
    exp = path / "lengen_export.json"          # written by export_llama / lengen-train: the context it trained at
    if exp.is_file():
        import json
        try:
            L, src = int(json.loads(exp.read_text())["context"]), "lengen_export.json (the training context)"
        except (ValueError, KeyError, TypeError) as e:
            raise EvalError(f"{str(exp)!r} is not a valid export record (needs an int 'context'): {e}") from e
    tok = _tokenizer(tokenizer or path, path)
    return LoadedModel(model=m, tokenizer=tok, kind="hf", path=path, name=path.name, context=L, context_source=src,
                       hard_max_positions=None, has_rope=True, hf_config=config, rotary_cls=type(rot),
                       apply_fn=info["apply_fn"], base=info["base"], rotary_dim=info["rotary_dim"],
                       head_dim=info["head_dim"], interleaved=info["interleaved"],
                       config_scaling=rope.scaling,
                       shape={"d_model": m.cfg.d_model, "d_ff": m.cfg.d_ff, "n_layers": m.cfg.n_layers,
                              "vocab_size": m.cfg.vocab_size, "logits": False})


def _load_lengen(path: Path, tokenizer, dtype, device, context) -> LoadedModel:
    from transformers import LlamaConfig

    from ..integrations.hf.export import EOD, byte_tokenizer
    from ..rope import RopeScaling

    model = load_lengen_checkpoint(path)
    cfg = model.cfg
    source = "--context"
    if context is None and getattr(model, "trained_context", None):
        context, source = int(model.trained_context), "the checkpoint's training context"
    if context is None:
        raise EvalError(f"{str(path)!r} is one of our checkpoints without a recorded training context (written before "
                        "2026-12-05); pass --context L (the training sequence length)")
    if tokenizer is not None:
        tok = _tokenizer(tokenizer, path)
    elif model.vocab_size == EOD + 1:
        tok = byte_tokenizer()
    else:
        raise EvalError(f"{str(path)!r} has a vocabulary of {model.vocab_size}, not the byte corpus's {EOD + 1}; "
                        "pass --tokenizer DIR")
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    dh = cfg.d_model // cfg.n_heads
    stand_in = LlamaConfig(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, head_dim=dh,
                           num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, max_position_embeddings=context,
                           vocab_size=model.vocab_size, num_hidden_layers=cfg.n_layers,
                           rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)})
    ffn = model.blocks[0].mlp.up.out_features if len(model.blocks) else 0
    return LoadedModel(model=LengenEvalModel(model), tokenizer=tok, kind="lengen", path=path, name=path.stem,
                       context=context, context_source=source,
                       hard_max_positions=cfg.max_positions if cfg.pos_encoding == "learned" else None,
                       has_rope=cfg.pos_encoding == "rope", hf_config=stand_in, base=float(cfg.rope_base),
                       rotary_dim=dh, head_dim=dh, config_scaling=RopeScaling(),
                       shape={"d_model": cfg.d_model, "d_ff": ffn, "n_layers": cfg.n_layers,
                              "vocab_size": model.vocab_size, "logits": True})


def load_model(path, *, tokenizer=None, context: int | None = None, dtype: torch.dtype | None = None,
               device=None) -> LoadedModel:
    """The model at ``path`` ready to evaluate (see module doc); EvalError naming the file or key otherwise."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{str(path)!r} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EvalError(f"{str(path)!r} is not a checkpoint: it has no config.json (a transformers checkpoint "
                            "directory) and is not a .pt file of ours")
        try:
            json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise EvalError(f"{str(path / 'config.json')!r} is not valid JSON: {e}") from e
        lm = _load_hf(path, tokenizer, dtype, device)
    else:
        lm = _load_lengen(path, tokenizer, dtype, device, context)
    if context is not None:
        limit = lm.hard_max_positions
        if lm.kind == "hf":
            c = lm.hf_config
            limit = getattr(c, "max_position_embeddings", None)
        if limit is not None and context > limit:
            where = "config.json max_position_embeddings" if lm.kind == "hf" else "model_config max_positions"
            raise EvalError(f"--context {context} is longer than the model's positions ({where} = {limit})")
        lm.context, lm.context_source = context, "--context"
    return lm
