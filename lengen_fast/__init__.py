"""lengen_fast: fast kernels and a data pipeline for training LLMs that generalize in length.

Public API:
  varlen_attention            packed, document-masked attention (flash_attn_varlen_func semantics)
  flash_attn_varlen_func      the same with flash-attn's exact signature and defaults (change the import)
  RopeScaling, rope_frequencies, apply_rope, RotaryEmbedding
                              fused RoPE with context-extension scaling, positions from cu_seqlens
  lengen_fast.data            Arrow/Parquet token sources, audit, decomposition, packing, curricula, loader
  lengen_fast.reference       the pure-torch spec of attention and RoPE; its docstring says where each op's spec is
"""
from . import backends, reference  # noqa: F401
from .attention import flash_attn_varlen_func, varlen_attention  # noqa: F401
from .rope import RopeScaling, RotaryEmbedding, apply_rope, rope_frequencies  # noqa: F401

__version__ = "0.1.0"
__all__ = ["varlen_attention", "flash_attn_varlen_func", "RopeScaling", "RotaryEmbedding", "apply_rope", "rope_frequencies",
           "backends", "reference"]
