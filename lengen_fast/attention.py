"""varlen_attention: custom op + fake + autograd; backends chosen in backends.py.

TEMPORARY: until issue 3 lands this calls the pure-torch reference (autograd through torch).
"""
from __future__ import annotations

from .reference import varlen_attention_ref


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
                     causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                     return_lse=False, deterministic=False, backend=None):
    return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale,
                                window_size=window_size, softcap=softcap, return_lse=return_lse)
