"""RopeScaling, rope_frequencies, apply_rope, RotaryEmbedding.

TEMPORARY: until issue 4 lands, apply_rope supports only unscaled RoPE through the reference.
"""
from __future__ import annotations

import torch

from .reference import apply_rope_ref, positions_from_cu_seqlens


class RopeScaling:  # replaced by the rope op (issue 4)
    pass


def rope_frequencies(head_dim, base, scaling=None, *, rotary_dim=None, seq_len=None):
    if scaling is not None:
        raise NotImplementedError("rope scaling: in progress (issue 4)")
    rotary_dim = rotary_dim or head_dim
    inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    return inv, 1.0


def apply_rope(q, k, *, cu_seqlens=None, position_ids=None, base=10000.0, scaling=None, rotary_dim=None,
               interleaved=False, inplace=False, position_offset=0, backend=None):
    T = q.shape[0]
    if position_ids is None:
        position_ids = (positions_from_cu_seqlens(cu_seqlens, T) if cu_seqlens is not None
                        else torch.arange(T, device=q.device))
    inv, af = rope_frequencies(q.shape[-1], base, scaling, rotary_dim=rotary_dim)
    return apply_rope_ref(q, k, position_ids + position_offset, inv.to(q.device), af, interleaved=interleaved)


class RotaryEmbedding:  # replaced by the rope op (issue 4)
    pass
