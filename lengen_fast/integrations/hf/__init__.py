"""Hugging Face transformers drop-in: the "lengen_varlen" attention, a fused-RoPE patch and PackedCollator.

    from lengen_fast.integrations import hf
    hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="lengen_varlen")
    hf.patch_rope(model)                            # optional: our fused RoPE instead of cos/sin + rotate_half
    Trainer(model=model, data_collator=hf.PackedCollator(), ...)

One module per question:
  attention.py    how a model's attention runs through varlen_attention (register, cu_seqlens from the
                  batch's cu_seq_lens kwargs, padding mask or position_ids)
  rope_patch.py   how a model's RoPE is replaced by apply_rope (patch_rope and its checks)
  collator.py     how a batch becomes one packed row (PackedCollator)
  compat.py       which transformers is needed (imported lazily, by register and patch_rope only)
"""
from __future__ import annotations

from .attention import ATTN_NAME, lengen_attention_forward, register
from .collator import PackedCollator
from .compat import MIN_TRANSFORMERS
from .rope_patch import patch_rope

__all__ = ["ATTN_NAME", "MIN_TRANSFORMERS", "register", "lengen_attention_forward", "patch_rope", "PackedCollator"]
