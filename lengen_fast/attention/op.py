"""How does one call run? The custom ops ``lengen::varlen_attention_fwd`` / ``lengen::varlen_attention_bwd``,
their fake (meta) kernels and autograd, and the per-backend implementation tables they dispatch through.

  * the ops are torch.library custom ops with fakes and autograd, so ``torch.compile(fullgraph=True)`` traces a
    model that uses them (the public, validating entry point is :mod:`lengen_fast.attention.api`);
  * inside the ops, :func:`lengen_fast.backends.select_attention` picks an entry of ``_FWD`` / ``_BWD`` for each pass
    (cpu: C++ kernels in csrc/attention, triton: :mod:`.triton_fwd` / :mod:`.triton_bwd`, reference: the spec,
    fa2 / cudnn: the installed peers in :mod:`.peers`). The two passes are routed independently: every forward
    returns lse in our layout, and every backward takes it.
"""
import functools
import importlib.util
from typing import Optional

import torch

from .. import backends
from ..reference import varlen_attention_ref


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
    from .triton_fwd import attention_fwd_triton
    return attention_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                softmax_scale, window_left, window_right, softcap)


def _bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                softmax_scale, window_left, window_right, softcap, deterministic):
    from .triton_bwd import attention_bwd_triton
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


def _fwd_peer(name):
    def fwd(*args):
        from . import peers
        return peers.FWD[name](*args)
    return fwd


def _bwd_peer(name):
    def bwd(*args):
        from . import peers
        return peers.BWD[name](*args)
    return bwd


_FWD = {"cpu": attention_fwd_cpu, "triton": _fwd_triton, "reference": _fwd_reference,
        "fa2": _fwd_peer("fa2"), "cudnn": _fwd_peer("cudnn")}
_BWD = {"cpu": attention_bwd_cpu, "triton": _bwd_triton, "reference": _bwd_reference,
        "fa2": _bwd_peer("fa2"), "cudnn": _bwd_peer("cudnn")}


@functools.lru_cache(maxsize=None)
def _supported() -> tuple:
    """Backends in the table whose code exists (the Triton kernels are imported lazily)."""
    have_triton = backends.has_triton() and all(
        importlib.util.find_spec(f"{__package__}.{m}") is not None for m in ("triton_fwd", "triton_bwd"))
    return tuple(name for name in _FWD if name != "triton" or have_triton)


def attention_call(q, k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right, softcap,
                   deterministic) -> backends.AttentionCall:
    return backends.AttentionCall(q.device, q.dtype, q.shape[2], q.shape[1], k.shape[1], bool(causal), int(window_left),
                                  0 if causal else int(window_right), float(softcap), bool(deterministic),
                                  max_seqlen_q, max_seqlen_k)


def route(pass_: str, q, k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right, softcap, deterministic,
          backend: Optional[str]) -> str:
    """The backend that runs ``pass_`` ("fwd" or "bwd") of this call (backends.select_attention)."""
    call = attention_call(q, k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right, softcap, deterministic)
    return backends.select_attention(call, pass_, backend, supported=_supported())


# ============================================================================ custom ops

@torch.library.custom_op("lengen::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
             cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], causal: bool,
             softmax_scale: float, window_left: int, window_right: int, softcap: float, deterministic: bool,
             backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _FWD[route("fwd", q, k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right, softcap,
                      deterministic, backend)]
    return impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                window_left, window_right, softcap)


@varlen_attention_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_left,
              window_right, softcap, deterministic, backend):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lengen::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int],
             max_seqlen_k: Optional[int], causal: bool, softmax_scale: float, window_left: int, window_right: int,
             softcap: float, deterministic: bool,
             backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _BWD[route("bwd", q, k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right, softcap,
                      deterministic, backend)]
    dq, dk, dv = impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      softmax_scale, window_left, window_right, softcap, deterministic)
    return dq, dk, dv


@varlen_attention_bwd.register_fake
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
    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, left, right,
                                      softcap, deterministic, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
