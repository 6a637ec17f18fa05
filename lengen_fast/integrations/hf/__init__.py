"""Hugging Face transformers drop-in: the "lengen_varlen" attention, a fused-RoPE patch and PackedCollator.

    from lengen_fast.integrations import hf
    hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="lengen_varlen")
    hf.patch_rope(model)                            # optional: our fused RoPE instead of cos/sin + rotate_half
    Trainer(model=model, data_collator=hf.PackedCollator(), ...)
    Trainer(train_dataset=hf.vsl_dataset("tokens/", max_len=8192), data_collator=hf.PackedCollator(),
            callbacks=[hf.LengthGenCallback(ood_docs, context=8192)], ...)   # our loader, OOD early stop
    model = hf.load_hf_model("ckpt/")                # a transformers LM behind our Transformer's forward
    hf.export_llama("run/ckpt/vsl_s0.pt", "exported/", context=512)       # ours -> a Llama checkpoint

One module per question:
  attention.py    how a model's attention runs through varlen_attention (register, cu_seqlens from the
                  batch's cu_seq_lens kwargs, padding mask or position_ids)
  rope_patch.py   how a model's RoPE is replaced by apply_rope (patch_rope and its checks)
  rope_check.py   whether our RoPE with a scaling rotates as transformers' rotary embedding with that config
  collator.py     how a batch becomes one packed row (PackedCollator)
  dataset.py      how our loader feeds Trainer on every rank (vsl_dataset)
  callback.py     how a Trainer run is evaluated at OOD lengths and stopped early (LengthGenCallback)
  engine_model.py how a transformers LM runs with our Transformer's forward signature (load_hf_model)
  export.py       how our Transformer becomes a Llama checkpoint (export_llama, byte_tokenizer)
  compat.py       which transformers is needed (imported lazily, by the functions that use it)
"""
from __future__ import annotations

from .attention import ATTN_NAME, lengen_attention_forward, register
from .collator import PackedCollator
from .compat import MIN_TRANSFORMERS
from .dataset import StepRef, VSLDataset, vsl_dataset
from .rope_patch import patch_rope, rope_scaling_override


def __getattr__(name):  # transformers-dependent pieces load on first use, so this package imports without it
    if name == "LengthGenCallback":
        from .callback import LengthGenCallback
        return LengthGenCallback
    if name in ("load_hf_model", "HFEngineModel", "ModelShape"):
        from . import engine_model
        return getattr(engine_model, name)
    if name in ("export_llama", "byte_tokenizer"):
        from . import export
        return getattr(export, name)
    if name in ("check_scaling", "hf_rope_parameters"):
        from . import rope_check
        return getattr(rope_check, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ATTN_NAME", "MIN_TRANSFORMERS", "register", "lengen_attention_forward", "patch_rope", "rope_scaling_override",
           "PackedCollator", "vsl_dataset", "VSLDataset", "StepRef", "LengthGenCallback", "load_hf_model",
           "HFEngineModel", "ModelShape", "export_llama", "byte_tokenizer", "check_scaling", "hf_rope_parameters"]
