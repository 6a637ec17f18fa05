"""Where is varlen attention? Packed, document-masked attention (a drop-in for flash_attn_varlen_func), one op per
file:

  api.py            varlen_attention, flash_attn_varlen_func: argument checks, then the custom op
  op.py             custom ops lengen::varlen_attention_fwd/bwd, fakes, autograd, the per-backend impl tables
  triton_fwd.py     Triton forward kernel (FA2 online softmax)
  triton_bwd.py     Triton backward: the launcher (delta, then dk/dv and dq)
  triton_bwd_delta.py, triton_bwd_doc.py, triton_bwd_packed.py   its kernels: delta; per-document tiles;
                    multi-document tiles for short documents
  triton_sched.py   device-side tile schedule and kernel config choice (autotuning)
  triton_common.py  @triton.jit helpers shared by forward and backward (masks, scores, loads, LOG2E)

The spec is ``lengen_fast.reference.varlen_attention_ref``; the C++ CPU kernels live in csrc/attention/.
"""
from .api import flash_attn_varlen_func, varlen_attention  # noqa: F401

__all__ = ["varlen_attention", "flash_attn_varlen_func"]
