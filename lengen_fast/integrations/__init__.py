"""Integrations with other libraries; each imports its optional dependency lazily.

hf: Hugging Face transformers ("lengen_varlen" attention, fused-RoPE patch, PackedCollator).
"""
