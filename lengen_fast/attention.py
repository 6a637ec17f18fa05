"""varlen_attention: packed, document-masked attention (drop-in for flash_attn_varlen_func).

Layers:
  * :func:`varlen_attention` validates the arguments (errors name the argument) and calls the custom op;
  * ``lengen::varlen_attention_fwd`` / ``lengen::varlen_attention_bwd`` are torch.library custom ops with fake
    (meta) kernels and autograd, so ``torch.compile(fullgraph=True)`` traces a model that uses them;
  * inside the ops, :func:`lengen_fast.backends.select` picks an entry of ``_FWD`` / ``_BWD``
    (cpu: C++ kernels in csrc/attention, triton: lengen_fast/triton/attention_{fwd,bwd}.py, reference: the spec).

No host sync: ``max_seqlen_*`` may be None and is never computed from ``cu_seqlens``. Checks that need the values
of ``cu_seqlens`` (starts at 0, non-decreasing, ends within the tokens) run only for CPU tensors in eager mode (the
C++ kernels repeat them at run time); for CUDA tensors they would need a device-to-host copy, so they are skipped
and invalid values are undefined behaviour, as in flash-attn.
"""
import functools
import importlib.util
import math
from typing import Optional

import torch

from . import backends
from .reference import varlen_attention_ref

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256


# ============================================================================ backends
# Every forward takes (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
# window_left, window_right, softcap) with q (Tq, H, D), k/v (Tk, H_kv, D), cu_seqlens int32 (B+1,), and returns
# (out (Tq, H, D) q.dtype, lse (H, Tq) fp32). Every backward takes (dout, q, k, v, out, lse, <the same>, deterministic)
# and returns (dq, dk, dv) shaped like q, k, v.

def _cpu_problem(q, k, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_left, window_right, softcap):
    Tq, H, D = q.shape
    Tk, Hkv, _ = k.shape
    return (cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(), cu_seqlens_q.numel() - 1, Tq, Tk, H, Hkv, D,
            backends.DTYPE_CODES[q.dtype], causal, softmax_scale, window_left, window_right, softcap)


def attention_fwd_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                      window_left, window_right, softcap):
    """C++ forward (csrc/attention/varlen_attention_cpu.cpp); max_seqlen_* are not needed."""
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype)                                          # (Tq, H, D)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)                     # (H, Tq)
    backends.cpu_ext().attention_fwd_cpu(
        q.data_ptr(), q.stride(), k.data_ptr(), k.stride(), v.data_ptr(), v.stride(), out.data_ptr(), lse.data_ptr(),
        *_cpu_problem(q, k, cu_q, cu_k, causal, softmax_scale, window_left, window_right, softcap))
    return out, lse


def attention_bwd_cpu(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      softmax_scale, window_left, window_right, softcap, deterministic):
    """C++ backward; always deterministic (each output element is reduced by one thread in a fixed order).

    fp16/bf16: dS = P * (dP - rowsum(dO * O)) needs O at fp32 precision. The saved 16-bit `out` carries a
    rounding of 2^-9 |O| into every dS of its row (hypothesis found 3x eager's error on tiny docs), so the
    backward runs in fp32 on an fp32 recompute of the forward, and the gradients are rounded once at the end.
    """
    if q.dtype != torch.float32:
        q32, k32, v32 = q.float(), k.float(), v.float()
        out32, _ = attention_fwd_cpu(q32, k32, v32, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                     softmax_scale, window_left, window_right, softcap)
        grads = attention_bwd_cpu(dout.float(), q32, k32, v32, out32, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, causal, softmax_scale, window_left, window_right, softcap, deterministic)
        return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    backends.cpu_ext().attention_bwd_cpu(
        dout.data_ptr(), dout.stride(), q.data_ptr(), q.stride(), k.data_ptr(), k.stride(), v.data_ptr(), v.stride(),
        out.data_ptr(), out.stride(), lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
        *_cpu_problem(q, k, cu_q, cu_k, causal, softmax_scale, window_left, window_right, softcap))
    return dq, dk, dv


def _fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                window_left, window_right, softcap):
    from .triton.attention_fwd import attention_fwd_triton
    return attention_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                softmax_scale, window_left, window_right, softcap)


def _bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                softmax_scale, window_left, window_right, softcap, deterministic):
    from .triton.attention_bwd import attention_bwd_triton
    return attention_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                causal, softmax_scale, window_left, window_right, softcap, deterministic)


def _fwd_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                   window_left, window_right, softcap):
    return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale,
                                window_size=(window_left, window_right), softcap=softcap, return_lse=True)


def _bwd_reference(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                   softmax_scale, window_left, window_right, softcap, deterministic):
    """Autograd through the reference (recomputes the forward). torch.func.vjp, because a custom op's body runs
    below the autograd dispatch key, where torch.autograd.grad records nothing."""
    def f(q_, k_, v_):
        return varlen_attention_ref(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                    softmax_scale=softmax_scale, window_size=(window_left, window_right),
                                    softcap=softcap)
    _, vjp = torch.func.vjp(f, q, k, v)
    return tuple(g.contiguous() for g in vjp(dout.to(q.dtype)))


_FWD = {"cpu": attention_fwd_cpu, "triton": _fwd_triton, "reference": _fwd_reference}
_BWD = {"cpu": attention_bwd_cpu, "triton": _bwd_triton, "reference": _bwd_reference}


@functools.lru_cache(maxsize=None)
def _supported() -> tuple:
    """Backends in the table whose code exists (the Triton kernels are imported lazily)."""
    have_triton = backends.has_triton() and all(
        importlib.util.find_spec(f"lengen_fast.triton.{m}") is not None for m in ("attention_fwd", "attention_bwd"))
    return tuple(name for name in _FWD if name != "triton" or have_triton)


def _select(device: torch.device, backend: Optional[str]) -> str:
    return backends.select("attention", device, backend, supported=_supported())


# ============================================================================ custom ops

@torch.library.custom_op("lengen::varlen_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], causal: bool,
            softmax_scale: float, window_left: int, window_right: int, softcap: float, deterministic: bool,
            backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _FWD[_select(q.device, backend)]
    return impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                window_left, window_right, softcap)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_left,
              window_right, softcap, deterministic, backend):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lengen::varlen_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int],
            max_seqlen_k: Optional[int], causal: bool, softmax_scale: float, window_left: int, window_right: int,
            softcap: float, deterministic: bool,
            backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _BWD[_select(q.device, backend)]
    dq, dk, dv = impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      softmax_scale, window_left, window_right, softcap, deterministic)
    return dq, dk, dv


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
              softmax_scale, window_left, window_right, softcap, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right, softcap, deterministic, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, left, right, softcap, deterministic, backend)


def _backward(ctx, dout, dlse):
    # lse is marked non-differentiable (as in flash-attn), so dlse is always None or zeros.
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, causal, scale, left, right, softcap, deterministic, backend = ctx.args
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, left, right, softcap,
                         deterministic, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public API

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
    backend: "cpu", "triton" or "reference" (default: backends.DEFAULT_ORDER, or $LENGEN_BACKEND).
    """
    _check_qkv(q, k, v)
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length B+1, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"{name} must be None or a non-negative int, got {m!r}")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1 = unbounded), "
                         f"got {window_size!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[2])
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    if not isinstance(softcap, (int, float)) or not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {backends.BACKENDS}")
    left, right = int(window_size[0]), int(window_size[1])
    out, lse = _fwd_op(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), max_seqlen_q,
                       max_seqlen_k, bool(causal), float(softmax_scale), left, 0 if causal else right,
                       float(softcap), bool(deterministic), backend)
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
