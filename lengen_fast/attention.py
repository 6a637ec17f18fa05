"""varlen_attention: custom op + fake + autograd; backends chosen in backends.py."""
from __future__ import annotations


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
                     causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                     return_lse=False, deterministic=False, backend=None):
    raise NotImplementedError("varlen_attention: in progress (issue 3)")
