"""What does the caller pass, and is it valid? The public entry points of varlen attention.

:func:`varlen_attention` (packed, document-masked attention: the semantics of ``flash_attn_varlen_func``) and
:func:`flash_attn_varlen_func` (flash-attn's exact signature) validate their arguments, with errors that name the
argument, then call the custom op ``lengen::varlen_attention_fwd`` (:mod:`lengen_fast.attention.op`).

No host sync: ``max_seqlen_*`` may be None and is never computed from ``cu_seqlens``. Checks that need the values
of ``cu_seqlens`` (starts at 0, non-decreasing, ends within the tokens) run only for CPU tensors in eager mode (the
C++ kernels repeat them at run time); for CUDA tensors they would need a device-to-host copy, so they are skipped
and invalid values are undefined behaviour, as in flash-attn.
"""
import math

import torch

from .. import backends
from .op import varlen_attention_fwd

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
# Integers the kernels index with (int32 offsets); larger values would also overflow the op schema's int64.
MAX_INT32 = 2**31 - 1
# |softmax_scale| above this is refused: the scores of ordinary inputs would overflow fp32 (and every backend
# would return NaN rows). 2^16 keeps fp16 inputs of any value finite: 256 * 65504^2 * 2^16 * log2(e) < 2^127.
MAX_SOFTMAX_SCALE = 2.0**16

def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(cu).__name__}")
    if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D with B+1 >= 1 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}: all tensors must be on one device")
    # Value checks need the data: only for CPU tensors, and not while torch.compile traces (the C++ kernels check
    # again at run time). On CUDA they would force a device-to-host sync.
    if cu.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if cu.numel() and int(cu[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(cu[0])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        i = int((cu[1:] < cu[:-1]).nonzero()[0, 0])
        raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = {int(cu[i + 1])} < "
                         f"{name}[{i}] = {int(cu[i])}")
    if int(cu[-1]) > total:
        raise ValueError(f"{name} ends at {int(cu[-1])}, beyond the {total} tokens of the tensor it indexes")


def _check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim), got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {x.dtype}; supported: float32, float16, bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}: all tensors must be on one device")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    D = q.shape[2]
    if k.shape[2] != D:
        raise ValueError(f"head_dim of k ({k.shape[2]}) differs from q ({D})")
    if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM and D % 8 == 0):
        raise ValueError(f"unsupported head_dim {D} (q.shape[2]): must be a multiple of 8 in "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads H={H} (q.shape[1]) must be a multiple of the number of "
                         f"key/value heads H_kv={Hkv} (k.shape[1])")


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
                     causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0, return_lse=False,
                     deterministic=False, backend=None):
    """Document-masked attention over packed sequences; the semantics of ``flash_attn_varlen_func``.

    q: (total_q, H, D); k, v: (total_k, H_kv, D) with H % H_kv == 0; fp32, fp16 or bf16; any strides.
    cu_seqlens_q / cu_seqlens_k: (B+1,) int32 document offsets (cu_seqlens_k defaults to cu_seqlens_q).
    max_seqlen_*: optional hints for the GPU kernels; leaving them out never syncs the host.
    causal masks are aligned bottom-right when a document's q and k lengths differ; window_size = (left, right),
    -1 = unbounded; softcap > 0 applies cap * tanh(s / cap). Rows with no visible key and tokens past
    cu_seqlens_q[-1] output 0 (lse +inf) and get zero gradients.
    Returns out (total_q, H, D) in q.dtype, or (out, lse) with lse (H, total_q) fp32 when return_lse.
    deterministic=True asks for a bitwise-repeatable backward (the CPU backward always is).
    backend: "cpu", "triton", "reference", or the installed peers "fa2" / "cudnn" (CUDA, fp16/bf16, with max_seqlen
    hints; a peer that is missing or cannot run the call's features raises ValueError naming it). Default: for CUDA
    calls with hints the measured dispatch table (lengen_fast/attention/dispatch_table.json), else ours
    (backends.DEFAULT_ORDER), or $LENGEN_BACKEND. On a peer route the hints must bound every document.
    """
    _check_qkv(q, k, v)
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length B+1, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= MAX_INT32):
            raise ValueError(f"{name} must be None or a non-negative int <= 2**31 - 1, got {m!r}")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) and -1 <= w <= MAX_INT32 for w in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints in [-1, 2**31 - 1] (-1 = unbounded), "
                         f"got {window_size!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[2])
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    if abs(softmax_scale) > MAX_SOFTMAX_SCALE:
        raise ValueError(f"softmax_scale={softmax_scale!r} is too large: |softmax_scale| must be <= 2**16 "
                         "(larger scales overflow the fp32 scores, and overflowed rows would come out NaN)")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) \
            or not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {backends.BACKENDS}")
    left, right = int(window_size[0]), int(window_size[1])
    out, lse = varlen_attention_fwd(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                                   max_seqlen_q, max_seqlen_k, bool(causal), float(softmax_scale), left,
                                   0 if causal else right, float(softcap), bool(deterministic), backend)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """``flash_attn.flash_attn_varlen_func`` with its exact signature and defaults (flash-attn 2.6+), so existing
    calls (positional ones included) switch by changing the import. Runs :func:`varlen_attention`.

    Returns out, or (out, softmax_lse (H, total_q) fp32, None) with return_attn_probs (flash-attn's third value is
    a dropout mask for tests; there is no dropout here). Features this package does not implement raise
    ValueError instead of being ignored: dropout_p > 0, alibi_slopes, block_table (paged KV cache).
    """
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p!r} is not supported (attention dropout is not implemented); "
                         "use dropout_p=0.0")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported (lengen_fast applies RoPE, not ALiBi); pass None")
    if block_table is not None:
        raise ValueError("block_table (paged KV cache) is not supported; pass None")
    res = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                           softmax_scale=softmax_scale, window_size=tuple(window_size), softcap=softcap,
                           return_lse=bool(return_attn_probs), deterministic=deterministic)
    return (res[0], res[1], None) if return_attn_probs else res
