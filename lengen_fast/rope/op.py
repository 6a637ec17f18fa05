"""How does one RoPE call reach a kernel? The torch.library custom ops, their fake kernels and autograd, the
position-mode enum shared with C++ and Triton, and the table of per-backend implementations.

Every implementation takes (B, S, H, D) views of q, k and their outputs (which may alias: in place), inv_freq
(R/2,) fp32 (negated for the backward, the inverse rotation), and positions from cu_seqlens (n + 1,) int32,
position_ids (B or 1, S) int32, or neither (arange over S); ``backends.select`` picked the backend name.
"""

import enum
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference import apply_rope_ref, positions_from_cu_seqlens

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the cpu / triton / cuda kernels take


class PosMode(enum.IntEnum):
    """Where positions come from; mirrors ``lf::rope::PosMode`` in csrc/rope/rope_args.h (same values)."""
    ARANGE = 0        # s, the index along S
    POSITION_IDS = 1  # pos[b, s]
    CU_SEQLENS = 2    # s - cu_seqlens[doc of s]: positions restart in every document (B == 1)

    @classmethod
    def of(cls, cu: Optional[Tensor], pos: Optional[Tensor]) -> "PosMode":
        return cls.CU_SEQLENS if cu is not None else (cls.POSITION_IDS if pos is not None else cls.ARANGE)


def _check_cu_values(cu: Tensor, total: int) -> None:
    """Value checks that need the data; run where they cost no device sync (cu_seqlens on the CPU)."""
    if cu.device.type != "cpu":
        return
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens[0]={int(cu[0])} must be 0")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens[-1]={int(cu[-1])} disagrees with the number of tokens T={total} in q and k")


def _impl_reference(q, k, qo, ko, inv_freq, cu, pos, offset, af, interleaved):
    """(B, S, H, D) views; pos (B or 1, S) int32 or cu (n+1,) int32 or neither (arange)."""
    B, S = q.shape[:2]
    if cu is not None:
        positions = positions_from_cu_seqlens(cu, S).reshape(1, S)
    elif pos is not None:
        positions = pos.to(torch.int64)
    else:
        positions = torch.arange(S, device=q.device).reshape(1, S)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    rq, rk = apply_rope_ref(q, k, positions + offset, inv_freq, af, interleaved=interleaved, compute_dtype=cdt)
    qo.copy_(rq)
    ko.copy_(rk)


def ext_args(q, k, qo, ko, inv_freq, cu, pos, offset, af, interleaved) -> tuple:
    """Positional arguments of rope_apply_cpu / rope_apply_cuda for (B, S, H, D) views."""
    B, S, Hq, D = q.shape
    pos_mode = int(PosMode.of(cu, pos))
    return (q.data_ptr(), k.data_ptr(), qo.data_ptr(), ko.data_ptr(), backends.DTYPE_CODES[q.dtype],
            B, S, Hq, k.shape[2], D, inv_freq.numel() * 2,
            list(q.stride()), list(qo.stride()), list(k.stride()), list(ko.stride()), inv_freq.data_ptr(),
            pos_mode, pos.data_ptr() if pos is not None else 0,
            (pos.stride(0) if pos.shape[0] > 1 else 0) if pos is not None else 0,  # (1, S) broadcasts over B
            pos.stride(1) if pos is not None else 0,
            cu.data_ptr() if cu is not None else 0, cu.numel() - 1 if cu is not None else 0,
            int(offset), float(af), bool(interleaved))


def _impl_cpu(*args):
    backends.cpu_ext().rope_apply_cpu(*ext_args(*args))


def _impl_cuda(*args):
    stream = torch.cuda.current_stream(args[0].device).cuda_stream
    backends.cuda_ext().rope_apply_cuda(*ext_args(*args), stream)


def _impl_triton(q, k, qo, ko, inv_freq, cu, pos, offset, af, interleaved):
    from .triton import rope_triton
    rope_triton(q, k, qo, ko, inv_freq, cu, pos, offset, af, interleaved)


IMPLS = {"cuda": _impl_cuda, "triton": _impl_triton, "cpu": _impl_cpu, "reference": _impl_reference}


def _as4d(x: Tensor) -> Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x  # (T, H, D) -> (1, T, H, D)


def _run(q, k, qo, ko, inv_freq, cu, pos, offset, af, interleaved, backward, backend):
    if cu is not None:
        _check_cu_values(cu, q.shape[0])
    # the inverse rotation R(-theta) = rotation by -inv_freq; the attention factor stays (adjoint of a*R)
    inv = (-inv_freq if backward else inv_freq).contiguous()
    IMPLS[backend](_as4d(q), _as4d(k), _as4d(qo), _as4d(ko), inv, cu, pos, offset, af, interleaved)


@torch.library.custom_op("lengen::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, inv_freq: Tensor, cu_seqlens: Optional[Tensor], position_ids: Optional[Tensor],
             position_offset: int, attention_factor: float, interleaved: bool, backward: bool,
             backend: str) -> tuple[Tensor, Tensor]:
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _run(q, k, qo, ko, inv_freq, cu_seqlens, position_ids, position_offset, attention_factor, interleaved,
         backward, backend)
    return qo, ko


@_rope_op.register_fake
def _(q, k, inv_freq, cu_seqlens, position_ids, position_offset, attention_factor, interleaved, backward, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup_context(ctx, inputs, output):
    _, _, inv_freq, cu, pos, offset, af, interleaved, backward, backend = inputs
    ctx.save_for_backward(inv_freq, cu, pos)
    ctx.args = (offset, af, interleaved, backward, backend)


def _rope_backward(ctx, gq, gk):
    inv_freq, cu, pos = ctx.saved_tensors
    offset, af, interleaved, backward, backend = ctx.args
    dq, dk = torch.ops.lengen.rope(gq, gk, inv_freq, cu, pos, offset, af, interleaved, not backward, backend)
    return dq, dk, None, None, None, None, None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


@torch.library.custom_op("lengen::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: Tensor, k: Tensor, inv_freq: Tensor, cu_seqlens: Optional[Tensor],
                     position_ids: Optional[Tensor], position_offset: int, attention_factor: float,
                     interleaved: bool, backend: str) -> None:
    _run(q, k, q, k, inv_freq, cu_seqlens, position_ids, position_offset, attention_factor, interleaved,
         False, backend)


@_rope_inplace_op.register_fake
def _(q, k, inv_freq, cu_seqlens, position_ids, position_offset, attention_factor, interleaved, backend):
    return None


class RopeInplace(torch.autograd.Function):
    """In-place rotation of non-leaf tensors that require grad (a mutating custom op carries no autograd)."""

    @staticmethod
    def forward(ctx, q, k, inv_freq, cu, pos, offset, af, interleaved, backend):
        torch.ops.lengen.rope_(q, k, inv_freq, cu, pos, offset, af, interleaved, backend)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(inv_freq, cu, pos)
        ctx.args = (offset, af, interleaved, backend)
        return q, k

    @staticmethod
    def backward(ctx, gq, gk):
        inv_freq, cu, pos = ctx.saved_tensors
        offset, af, interleaved, backend = ctx.args
        dq, dk = torch.ops.lengen.rope(gq, gk, inv_freq, cu, pos, offset, af, interleaved, True, backend)
        return dq, dk, None, None, None, None, None, None, None
