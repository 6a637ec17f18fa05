"""Hugging Face transformers drop-in: the "lengen_varlen" attention, a fused-RoPE patch and PackedCollator.

    from lengen_fast.integrations import hf
    hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="lengen_varlen")
    hf.patch_rope(model)                            # optional: our fused RoPE instead of cos/sin + rotate_half
    Trainer(model=model, data_collator=hf.PackedCollator(), ...)

transformers is an optional dependency (``pip install lengen_fast[hf]``); it is imported only by
``register`` and ``patch_rope``. Layouts the attention understands, in order of precedence:
  1. ``cu_seq_lens_q/k`` (+ ``max_length_q/k``) kwargs, as PackedCollator and DataCollatorWithFlattening
     emit: used as is, no host sync;
  2. a 2-D padding ``attention_mask`` (left, right or both-sided padding of one contiguous run per row);
  3. ``position_ids`` that restart per document: cu_seqlens derived on device without a host sync;
  4. otherwise one sequence per row.
Anything else (4-D or flex masks, attention dropout, attention sinks, holes in the padding mask)
raises instead of computing something else.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ATTN_NAME = "lengen_varlen"
MIN_TRANSFORMERS = "4.53"  # masking_utils' AttentionMaskInterface; keep in step with pyproject's extras
_INSTALL = "pip install lengen_fast[hf]"


def _transformers():
    """The pieces of transformers we hook into; a clear ImportError when it is missing or too old."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"lengen_fast.integrations.hf needs Hugging Face transformers: {_INSTALL}") from e
    try:
        from transformers.modeling_utils import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as e:
        raise ImportError(f"lengen_fast.integrations.hf needs transformers>={MIN_TRANSFORMERS} (found "
                          f"{getattr(transformers, '__version__', '?')}): {_INSTALL} --upgrade") from e
    return AttentionInterface, AttentionMaskInterface, flash_attention_mask


def register(name: str = ATTN_NAME) -> str:
    """Register our varlen attention with transformers as ``attn_implementation=name``; returns name.

    The mask side reuses FlashAttention-2's: the model hands us the 2-D padding mask, or None when
    there is no padding, never a materialised 4-D mask.
    """
    attention_interface, mask_interface, flash_attention_mask = _transformers()
    attention_interface.register(name, lengen_attention_forward)
    mask_interface.register(name, flash_attention_mask)
    return name


# ============================================================================== attention

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
    from ..attention import varlen_attention

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


# =================================================================================== rope

class _RopePositions:
    """What the patched rotary embedding hands the attention layers instead of (cos, sin)."""

    __slots__ = ("position_ids", "base", "scaling", "rotary_dim", "interleaved")

    def __init__(self, position_ids, base, scaling, rotary_dim, interleaved):
        self.position_ids = position_ids
        self.base = base
        self.scaling = scaling
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved


def _fused_rope(q: torch.Tensor, k: torch.Tensor, p: _RopePositions, unsqueeze_dim: int = 1):
    """Rotate q (B, H, S, D) / k (B, H_kv, S, D) (or (B, S, H, D) when unsqueeze_dim=2) with our RoPE."""
    from ..rope import apply_rope

    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"lengen_fast.patch_rope: unsupported unsqueeze_dim={unsqueeze_dim}")
    qs, ks = (q.transpose(1, 2), k.transpose(1, 2)) if unsqueeze_dim == 1 else (q, k)   # (B, S, H, D)
    B, S, H, D = qs.shape
    H_kv = ks.shape[2]
    pos = p.position_ids.expand(B, S).reshape(-1)
    qo, ko = apply_rope(qs.reshape(B * S, H, D), ks.reshape(B * S, H_kv, D), position_ids=pos, base=p.base,
                        scaling=p.scaling, rotary_dim=p.rotary_dim, interleaved=p.interleaved)
    qo, ko = qo.view(B, S, H, D), ko.view(B, S, H_kv, D)
    return (qo.transpose(1, 2), ko.transpose(1, 2)) if unsqueeze_dim == 1 else (qo, ko)


def _wrap_apply(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if isinstance(cos, _RopePositions):
            return _fused_rope(q, k, cos, *args, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._lengen_original = original
    return apply_rotary_pos_emb


def _rope_config(config):
    """(base, scaling) from a transformers config, read by ``rope.rope_config_from_hf`` (the one reader).

    The rotary dim is dropped from the scaling: patch_rope takes it from the model's inv_freq buffer.
    """
    import dataclasses

    from ..rope import rope_config_from_hf

    base, scaling, _, _ = rope_config_from_hf(config)
    return base, dataclasses.replace(scaling, partial_rotary_factor=None)


def patch_rope(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the model's rotary application with lengen_fast.apply_rope (fused, fp32 angles, no cos/sin cache).

    The rotary embedding module then returns the position ids, and the attention layers' calls to
    ``apply_rotary_pos_emb`` rotate q and k in one op. The model's own RoPE config goes through
    ``RopeScaling.from_hf``; before patching, the frequencies, attention factor and rotation layout
    are checked against the model's own rotary code, and a model we would rotate differently raises
    ValueError. Returns the model (patched in place).
    """
    from ..reference import rope_cos_sin_ref
    from ..rope import rope_frequencies

    _transformers()
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotaries) != 1 or not isinstance(getattr(rotaries[0], "inv_freq", None), torch.Tensor):
        raise ValueError(f"lengen_fast.patch_rope: expected one rotary embedding module with inv_freq, found "
                         f"{[type(m).__name__ for m in rotaries]} in {type(model).__name__}")
    rot = rotaries[0]
    if getattr(rot, "_lengen_patched", False):
        return model
    # the undecorated forward: 4.56-4.57 wrap attention forwards in @deprecate_kwarg, whose globals are not the model's
    forwards = {m: inspect.unwrap(type(m).forward) for m in model.modules()}
    layers = [m for m, f in forwards.items()
              if "apply_rotary_pos_emb" in getattr(getattr(f, "__code__", None), "co_names", ())]
    if not layers:
        raise ValueError(f"lengen_fast.patch_rope: no attention layer of {type(model).__name__} calls "
                         "apply_rotary_pos_emb; this model's rotary layout is not supported")
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    base, scaling = _rope_config(config)
    rotary_dim = 2 * rot.inv_freq.numel()
    head_dim = getattr(layers[0], "head_dim", rotary_dim)

    # 1. frequencies and attention factor: ours vs the model's buffers
    inv, factor = rope_frequencies(head_dim, base, scaling, rotary_dim=rotary_dim)
    hf_inv = getattr(rot, "original_inv_freq", rot.inv_freq).detach().float().cpu()
    rtol = 1e-5 if rot.inv_freq.dtype == torch.float32 else 1e-2
    hf_factor = float(getattr(rot, "attention_scaling", 1.0))
    if (inv.shape != hf_inv.shape or not torch.allclose(inv.float().cpu(), hf_inv, rtol=rtol, atol=0)
            or abs(factor - hf_factor) > 1e-5 * max(1.0, abs(hf_factor))):
        raise ValueError(f"lengen_fast.patch_rope: RoPE from the config (base={base}, scaling={scaling}) does not "
                         f"match {type(rot).__name__}'s frequencies/attention factor; leave this model unpatched")
    # 2. rotation layout: the model's apply_rotary_pos_emb vs ours on a probe, NeoX then GPT-J layout;
    # 3. and the model's own cos for that layout (small positions: a bf16 inv_freq buffer is coarse)
    globals_ = {id(g): g for g in (forwards[m].__globals__ for m in layers)}
    gen = torch.Generator().manual_seed(0)
    pos = torch.tensor([0, 1, 2, 7, 31, 100])
    q = torch.randn(1, 2, pos.numel(), head_dim, generator=gen)
    k = torch.randn(1, 1, pos.numel(), head_dim, generator=gen)
    with torch.no_grad():
        hf_cos = rot(torch.zeros(1, dtype=torch.float32, device=rot.inv_freq.device),
                     pos[None, :4].to(rot.inv_freq.device))[0][0].float().cpu()            # (4, rotary_dim)
    interleaved = None
    for g in globals_.values():
        original = getattr(g["apply_rotary_pos_emb"], "_lengen_original", g["apply_rotary_pos_emb"])
        interleaved = None
        for inter in (False, True):
            cos, sin = rope_cos_sin_ref(pos, inv.float(), factor, interleaved=inter)
            # the full head, or only the rotary part for models (Phi) whose attention splits q before the call
            for width in dict.fromkeys((head_dim, rotary_dim)):
                try:
                    want_q, want_k = original(q[..., :width], k[..., :width], cos[None], sin[None])
                except RuntimeError:
                    continue
                got_q, got_k = _fused_rope(q[..., :width], k[..., :width],
                                           _RopePositions(pos[None], base, scaling, rotary_dim, inter))
                if (torch.allclose(got_q, want_q, atol=1e-4) and torch.allclose(got_k, want_k, atol=1e-4)
                        and torch.allclose(hf_cos, cos[:4], atol=5e-2)):
                    interleaved = inter
                    break
            if interleaved is not None:
                break
        if interleaved is None:
            raise ValueError(f"lengen_fast.patch_rope: {g.get('__name__')}.apply_rotary_pos_emb with "
                             f"{type(rot).__name__} rotates differently from lengen_fast.apply_rope (NeoX or "
                             "GPT-J layout); leave this model unpatched")
    for g in globals_.values():
        if not hasattr(g["apply_rotary_pos_emb"], "_lengen_original"):
            g["apply_rotary_pos_emb"] = _wrap_apply(g["apply_rotary_pos_emb"])

    def forward(x, position_ids, *args, **kwargs):
        return _RopePositions(position_ids, base, scaling, rotary_dim, interleaved), None

    rot.forward = forward
    rot._lengen_patched = True
    return model


# =============================================================================== collator

def _ints(x, what: str) -> np.ndarray:
    """A 1-D int64 numpy view/copy of a list, numpy array or tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == object or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"PackedCollator: {what} must hold integers, got dtype {a.dtype}")
    return a.reshape(-1).astype(np.int64, copy=False)


def _pipeline_fields(obj) -> dict | None:
    """input_ids / labels / cu_seqlens of one of our pipeline's batches (a data.Batch or a mapping), else None."""
    if isinstance(obj, Mapping):
        return dict(obj) if "cu_seqlens" in obj else None
    if hasattr(obj, "cu_seqlens") and hasattr(obj, "input_ids"):
        return {"input_ids": obj.input_ids, "labels": getattr(obj, "labels", None), "cu_seqlens": obj.cu_seqlens}
    return None


@dataclass
class PackedCollator:
    """Flattens rows (HF dataset dicts with ``input_ids`` and optional ``labels``) or one of our
    pipeline's packed batches into a single packed row, exactly as transformers'
    ``DataCollatorWithFlattening`` does (same keys, same values), plus the FlashAttention kwargs
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` by default, so the attention needs no host sync.

    Output: ``input_ids``, ``labels`` (``separator_id`` at each document's first token),
    ``position_ids`` (restarting at ``position_ids_start``): (1, T) int64; ``seq_idx`` (1, T) int32
    when asked; ``cu_seq_lens_q/k`` (n+1,) int32 and ``max_length_q/k`` python ints.
    A pipeline batch (``lengen_fast.data.Batch``, or a mapping with ``input_ids`` (T,) or (B, S),
    ``cu_seqlens`` and next-token ``labels``), alone or as a list of one, yields what
    DataCollatorWithFlattening would yield on its documents; zero-length documents and tokens after
    ``cu_seqlens[-1]`` are dropped.
    """

    return_position_ids: bool = True
    separator_id: int = -100
    return_flash_attn_kwargs: bool = True
    return_seq_idx: bool = False
    position_ids_start: int = 0
    return_tensors: str = "pt"

    def __call__(self, features, return_tensors: str | None = None, separator_id: int | None = None) -> dict:
        return_tensors = self.return_tensors if return_tensors is None else return_tensors
        separator_id = self.separator_id if separator_id is None else separator_id
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"PackedCollator: return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if not isinstance(features, Sequence) or isinstance(features, (str, bytes)):
            features = [features]
        if len(features) == 0:
            raise ValueError("PackedCollator: features must be a non-empty list of rows or a pipeline batch")
        pipeline = _pipeline_fields(features[0]) if len(features) == 1 else None
        if pipeline is not None:
            ids, labels, lengths = self._from_pipeline(pipeline)
        else:
            ids, labels, lengths = self._from_rows(features)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        labels[starts] = separator_id
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if self.return_position_ids:
            batch["position_ids"] = np.arange(ids.size) - np.repeat(starts, lengths) + self.position_ids_start
        if self.return_seq_idx:
            batch["seq_idx"] = np.repeat(np.arange(lengths.size), lengths).astype(np.int32)
        if self.return_flash_attn_kwargs:
            cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
            batch["cu_seq_lens_q"], batch["cu_seq_lens_k"] = cu, cu.copy()
            batch["max_length_q"] = batch["max_length_k"] = int(lengths.max())
        for key, val in batch.items():
            if isinstance(val, np.ndarray):
                val = val[None] if key in ("input_ids", "labels", "position_ids", "seq_idx") else val
                batch[key] = torch.from_numpy(np.ascontiguousarray(val)) if return_tensors == "pt" else val
        return batch

    @staticmethod
    def _from_rows(features):
        ids, labels, lengths = [], [], []
        has_labels = isinstance(features[0], Mapping) and "labels" in features[0]
        for i, row in enumerate(features):
            if not isinstance(row, Mapping) or "input_ids" not in row:
                raise ValueError(f"PackedCollator: features[{i}] must be a mapping with 'input_ids' (or the only "
                                 f"item a pipeline batch), got {type(row).__name__}")
            if ("labels" in row) != has_labels:
                raise ValueError(f"PackedCollator: features[{i}] {'lacks' if has_labels else 'has'} 'labels' "
                                 "unlike features[0]; give labels for all rows or none")
            x = _ints(row["input_ids"], f"features[{i}]['input_ids']")
            if x.size == 0:
                raise ValueError(f"PackedCollator: features[{i}]['input_ids'] is empty")
            ids.append(x)
            if has_labels:
                y = _ints(row["labels"], f"features[{i}]['labels']")
                if y.size != x.size:
                    raise ValueError(f"PackedCollator: features[{i}] has {y.size} labels for {x.size} input_ids")
                labels.append(y)
            lengths.append(x.size)
        ids = np.concatenate(ids)
        labels = np.concatenate(labels) if has_labels else ids.copy()
        return ids, labels, np.asarray(lengths, dtype=np.int64)

    @staticmethod
    def _from_pipeline(batch):
        ids = _ints(batch["input_ids"], "batch['input_ids']")
        cu = _ints(batch["cu_seqlens"], "batch['cu_seqlens']")
        if cu.size < 2 or cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] > ids.size:
            raise ValueError(f"PackedCollator: batch['cu_seqlens'] must start at 0, not decrease and end at or "
                             f"before the {ids.size} tokens; got {cu.tolist()[:8]}{'...' if cu.size > 8 else ''}")
        if cu[-1] == 0:
            raise ValueError("PackedCollator: batch['cu_seqlens'] holds no tokens")
        total = int(cu[-1])
        lengths = np.diff(cu)
        lengths = lengths[lengths > 0]
        tokens = ids[:total].copy()
        if "labels" in batch and batch["labels"] is not None:
            shifted = _ints(batch["labels"], "batch['labels']")
            if shifted.size != ids.size:
                raise ValueError(f"PackedCollator: batch has {shifted.size} labels for {ids.size} input_ids")
            labels = np.empty(total, dtype=np.int64)  # ours predict token t+1 at t; HF's hold token t at t
            labels[1:] = shifted[:total - 1]
        else:
            labels = tokens.copy()
        return tokens, labels, lengths
