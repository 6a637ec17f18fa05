"""How does a transformers model run its attention through lengen_fast.varlen_attention?

    from lengen_fast.integrations import hf
    hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="lengen_varlen")

``register`` adds the "lengen_varlen" attention interface; ``lengen_attention_forward`` turns the batch's
layout into cu_seqlens. Layouts it understands, in order of precedence:
  1. ``cu_seq_lens_q/k`` (+ ``max_length_q/k``) kwargs, as PackedCollator and DataCollatorWithFlattening
     emit: used as is, no host sync;
  2. a 2-D padding ``attention_mask`` (left, right or both-sided padding of one contiguous run per row);
  3. ``position_ids`` that restart per document: cu_seqlens derived on device without a host sync;
  4. otherwise one sequence per row.
Anything else (4-D or flex masks, attention dropout, attention sinks, holes in the padding mask)
raises instead of computing something else.
"""
from __future__ import annotations

import torch

from .compat import _transformers

ATTN_NAME = "lengen_varlen"


def register(name: str = ATTN_NAME) -> str:
    """Register our varlen attention with transformers as ``attn_implementation=name``; returns name.

    The mask side reuses FlashAttention-2's: the model hands us the 2-D padding mask, or None when
    there is no padding, never a materialised 4-D mask.
    """
    attention_interface, mask_interface, flash_attention_mask = _transformers()
    if not isinstance(name, str) or not name:
        raise TypeError(f"register(name): name must be a non-empty str, got {name!r}")
    if "|" in name or "/" in name:
        raise ValueError(f"register(name={name!r}): transformers reads '|' (paged|<impl>) and '/' (a Hub kernel "
                         "repo) in attn_implementation names itself; pick a plain name such as 'lengen_varlen'")
    existing = attention_interface._global_mapping.get(name)
    if name == "eager" or (existing is not None and existing is not lengen_attention_forward):
        raise ValueError(f"register(name={name!r}) would replace an attention implementation transformers already "
                         f"has ({'built in' if name == 'eager' else existing.__module__}); pick another name, "
                         f"such as the default {ATTN_NAME!r}")
    attention_interface.register(name, lengen_attention_forward)
    mask_interface.register(name, flash_attention_mask)
    return name


def _segments_to_cu(seg: torch.Tensor) -> torch.Tensor:
    """(B, n) segment lengths -> (B*n + 1,) int32 cu_seqlens, on device."""
    return torch.nn.functional.pad(seg.reshape(-1).cumsum(0), (1, 0)).to(torch.int32)


def _cu_from_padding_mask(mask: torch.Tensor, s_q: int):
    """2-D padding mask (B, S_k) -> (cu_q, cu_k, q_valid) with three segments per row: lead pads, tokens, tail pads.

    Pads become documents of their own, so real tokens never see them. Queries: with S_q == S_k
    they share the keys' segments; otherwise (decoding with a cache) a row's S_q queries form one
    document aligned bottom-right with its valid keys, as flash-attn's varlen causal mask aligns.
    """
    B, s_k = mask.shape
    mask = mask.bool()
    n = mask.sum(-1)                                                               # (B,)
    lead = torch.where(n > 0, mask.int().argmax(-1), torch.zeros_like(n))          # first valid index
    idx = torch.arange(s_k, device=mask.device)
    expected = (idx >= lead[:, None]) & (idx < (lead + n)[:, None])
    if not bool((expected == mask).all()):  # the one host sync, only on this padded path
        raise ValueError("lengen_varlen: attention_mask must hold one contiguous run of tokens per row "
                         "(left and/or right padding); masks with holes are not supported")
    seg_k = torch.stack((lead, n, s_k - lead - n), dim=-1)                          # (B, 3)
    if s_q == s_k:
        return _segments_to_cu(seg_k), _segments_to_cu(seg_k), mask
    zeros = torch.zeros_like(n)
    seg_q = torch.stack((zeros, torch.full_like(n, s_q), zeros), dim=-1)
    return _segments_to_cu(seg_q), _segments_to_cu(seg_k), None


def _cu_from_position_ids(position_ids: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """(B|1, S) positions -> (B*S + 1,) int32 cu_seqlens with no host sync.

    A document starts at every row start and wherever the position does not continue the previous
    one (the rule transformers' masks use). The document count is data-dependent, so the result has
    a fixed size: starts of the real documents, then zero-length documents at T.
    """
    T = B * S
    pos = position_ids.expand(B, S)
    start = torch.ones(B, S, dtype=torch.bool, device=pos.device)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    doc = start.reshape(-1).long().cumsum(0) - 1                                   # (T,) document index
    t = torch.arange(T, device=pos.device)
    cu = torch.full((T + 1,), T, dtype=torch.long, device=pos.device)
    cu = cu.scatter_reduce(0, doc, t, reduce="amin", include_self=True)
    return cu.to(torch.int32)


def _as_int(x) -> int | None:
    """max_length_* as a python int; tensors give None (the op then bounds it without a host sync)."""
    return x if isinstance(x, int) else None


def lengen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, is_causal: bool | None = None, s_aux=None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (B, H, S_q, D), key/value (B, H_kv, S_k, D) -> (B, S_q, H, D)."""
    from ...attention import varlen_attention

    if dropout:
        raise ValueError(f"lengen_varlen does not implement attention dropout (got p={dropout}); "
                         "set config.attention_dropout=0.0")
    if s_aux is not None:
        raise ValueError("lengen_varlen does not implement attention sinks (s_aux)")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        raise ValueError("lengen_varlen takes a 2-D padding attention_mask or none; got "
                         f"{type(attention_mask).__name__} of shape {tuple(getattr(attention_mask, 'shape', ()))}. "
                         "Custom 4-D or flex masks are not supported: use cu_seq_lens or position_ids for packing")
    B, H, s_q, D = query.shape
    H_kv, s_k = key.shape[1], key.shape[2]
    if key.shape[0] != B or value.shape[:3] != key.shape[:3] or key.shape[-1] != D:
        raise ValueError(f"lengen_varlen: incompatible query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)} (expected (B, H, S, D) and (B, H_kv, S_k, D))")
    if value.shape[-1] != D:
        raise ValueError(f"lengen_varlen: value head dim {value.shape[-1]} != query head dim {D} is not supported")
    if H % H_kv:
        raise ValueError(f"lengen_varlen: {H} query heads are not a multiple of {H_kv} key/value heads")

    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    window = (-1, -1)
    if sliding_window is not None:
        # transformers' window counts the query itself: key j visible when i - j < sliding_window
        window = (sliding_window - 1, -1 if causal else sliding_window - 1)
    softcap = float(softcap) if softcap else 0.0

    q = query.transpose(1, 2).reshape(B * s_q, H, D)                               # (T_q, H, D)
    k = key.transpose(1, 2).reshape(B * s_k, H_kv, D)                              # (T_k, H_kv, D)
    v = value.transpose(1, 2).reshape(B * s_k, H_kv, D)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = s_q, s_k
    q_valid = None
    position_ids = kwargs.get("position_ids")
    if cu_q is not None or cu_k is not None:
        if attention_mask is not None:
            raise ValueError("lengen_varlen: got both a padding attention_mask and cu_seq_lens_*; "
                             "packed batches carry no padding mask")
        cu_q = (cu_k if cu_q is None else cu_q).to(q.device, non_blocking=True)
        cu_k = (cu_q if cu_k is None else cu_k).to(q.device, non_blocking=True)
        if cu_q.dim() != 1 or cu_q.numel() < 2 or cu_k.shape != cu_q.shape:
            # e.g. accelerate's dispatch_batches slicing every tensor to the (1, T) batch's first row
            raise ValueError(f"lengen_varlen: cu_seq_lens_q {tuple(cu_q.shape)} / cu_seq_lens_k {tuple(cu_k.shape)} "
                             "must be equal-length 1-D (n_docs + 1,) tensors with at least one document; with an "
                             "IterableDataset under HF Trainer set TrainingArguments(accelerator_config="
                             "{'dispatch_batches': False}) so the packed batch is not sliced")
        max_q = _as_int(kwargs.get("max_length_q"))
        max_k = _as_int(kwargs.get("max_length_k"))
    elif attention_mask is not None:
        if attention_mask.shape != (B, s_k):
            raise ValueError(f"lengen_varlen: attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"(batch, key length) = {(B, s_k)}")
        cu_q, cu_k, q_valid = _cu_from_padding_mask(attention_mask, s_q)
    elif position_ids is not None and s_q == s_k and s_q > 1:
        if position_ids.dim() != 2 or position_ids.shape[-1] != s_q or position_ids.shape[0] not in (1, B):
            raise ValueError(f"lengen_varlen: position_ids of shape {tuple(position_ids.shape)} are not "
                             f"(batch, seq) = {(B, s_q)}; multi-axis (M-RoPE) positions are not supported")
        cu_q = cu_k = _cu_from_position_ids(position_ids, B, s_q)
    else:
        cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * s_q
        cu_k = torch.arange(B + 1, device=q.device, dtype=torch.int32) * s_k
    out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scaling,
                           window_size=window, softcap=softcap)                    # (T_q, H, D)
    out = out.view(B, s_q, H, D)
    if q_valid is not None:  # padded queries output 0, as flash-attn's unpad/pad does
        out = out * q_valid[:, :, None, None].to(out.dtype)
    return out, None
