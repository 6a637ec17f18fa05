"""RopeScaling, rope_frequencies, apply_rope, RotaryEmbedding."""
from __future__ import annotations


class RopeScaling:  # replaced by the rope op (issue 4)
    pass


def rope_frequencies(head_dim, base, scaling=None, *, rotary_dim=None, seq_len=None):
    raise NotImplementedError("rope_frequencies: in progress (issue 4)")


def apply_rope(q, k, *, cu_seqlens=None, position_ids=None, base=10000.0, scaling=None, rotary_dim=None,
               interleaved=False, inplace=False, position_offset=0, backend=None):
    raise NotImplementedError("apply_rope: in progress (issue 4)")


class RotaryEmbedding:  # replaced by the rope op (issue 4)
    pass
