"""How do I rotate q and k? The public API: apply_rope, RotaryEmbedding, and the checks of their inputs.

Frequencies come from ``scaling.rope_frequencies`` (cached per static config); the rotation runs through the
``lengen::rope`` custom ops of ``op.py`` on the backend that ``backends.select`` picks.
"""

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import backends
from ..reference import ROPE_MAX_ANGLE, ROPE_MAX_POSITION
from .op import IMPLS, KERNEL_DTYPES, RopeInplace
from .scaling import RopeScaling, resolve_rotary_dim, rope_config_from_hf, rope_frequencies

_FREQ_CACHE: dict = {}


def _frequencies(head_dim, base, scaling, rotary_dim, seq_len, device) -> tuple[Tensor, float, Optional[float]]:
    """rope_frequencies on ``device`` plus max |inv_freq| (None where it would cost a device sync), cached for
    static configs (frequencies are tiny; launches are not)."""
    if isinstance(seq_len, Tensor) or torch.compiler.is_compiling():
        inv, af = rope_frequencies(head_dim, base, scaling, rotary_dim=rotary_dim, seq_len=seq_len, device=device)
        return inv.to(device), af, None
    key = (head_dim, float(base), scaling, rotary_dim, seq_len, str(device))
    hit = _FREQ_CACHE.get(key)
    if hit is None:
        if len(_FREQ_CACHE) > 256:
            _FREQ_CACHE.clear()
        inv, af = rope_frequencies(head_dim, base, scaling, rotary_dim=rotary_dim, seq_len=seq_len)
        hit = _FREQ_CACHE[key] = (inv.to(device), af, float(inv.abs().max()) if inv.numel() else 0.0)
    return hit


def _max_abs_position(q, cu_seqlens, position_ids, position_offset) -> Optional[int]:
    """The largest |position| of the call where the host knows it without a device sync, else None."""
    if position_ids is not None:
        if position_ids.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        if position_ids.numel() == 0:
            return abs(position_offset)
        return max(abs(int(position_ids.min()) + position_offset), abs(int(position_ids.max()) + position_offset))
    n = q.shape[-3]                                       # positions 0 .. n - 1 (+ offset)
    if cu_seqlens is not None and cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        n = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    elif cu_seqlens is not None:
        return None                                       # device cu_seqlens: n <= T, but not known exactly
    return max(abs(position_offset), abs(n - 1 + position_offset)) if n > 0 else abs(position_offset)


def _check_position_range(max_pos: Optional[int], max_inv_freq: Optional[float], position_offset: int) -> None:
    if max_pos is None:
        return  # a device tensor: the kernels return NaN for positions outside the range
    if max_pos >= ROPE_MAX_POSITION or (max_inv_freq is not None and max_pos * max_inv_freq > ROPE_MAX_ANGLE):
        raise ValueError(
            f"positions reach {max_pos} (position_offset={position_offset} included), beyond the accurate range "
            f"of fp32 RoPE: |position| < 2**24 and |position * inv_freq| <= {ROPE_MAX_ANGLE:g} rad "
            f"(max inv_freq here {max_inv_freq:g}); fp32 would rotate them by a wrong angle")


@torch.compiler.assume_constant_result
def _select(device_type: str, kernel_dtype: bool, backend: Optional[str]) -> str:
    """backends.select for this op; a trace-time constant under torch.compile (it reads env and imports)."""
    supported = tuple(IMPLS) if kernel_dtype else ("reference",)
    return backends.select("rope", torch.device(device_type), backend, supported=supported)


def _check_inputs(q, k, cu_seqlens, position_ids, position_offset, scaling):
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} must be (T, H, D) or (B, S, H, D), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share the token dims and head_dim "
                         "(only the head counts may differ)")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q ({q.dtype}, {q.device}) and k ({k.dtype}, {k.device}) must share dtype and device")
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("pass cu_seqlens or position_ids, not both")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor of (num_docs + 1) offsets")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if q.dim() != 3:
            raise ValueError("cu_seqlens needs packed (T, H, D) inputs, got q of shape " + str(tuple(q.shape)))
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        if cu_seqlens.dtype == torch.int64 and cu_seqlens.device.type == "cpu" \
                and not torch.compiler.is_compiling() \
                and not bool(((cu_seqlens >= -2**31) & (cu_seqlens < 2**31)).all()):
            # the kernels take int32 offsets: refuse before the cast could wrap a value into range
            raise ValueError(f"cu_seqlens values must fit in int32, got min {int(cu_seqlens.min())} "
                             f"and max {int(cu_seqlens.max())}")
    if position_ids is not None:
        if not isinstance(position_ids, Tensor) or position_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("position_ids must be an int32 or int64 tensor")
        if position_ids.device != q.device:
            raise ValueError(f"position_ids is on {position_ids.device} but q is on {q.device}")
        ok = ((q.dim() == 3 and position_ids.shape == (q.shape[0],))
              or (q.dim() == 4 and position_ids.shape in ((q.shape[1],), (1, q.shape[1]), tuple(q.shape[:2]))))
        if not ok:
            want = "(T,)" if q.dim() == 3 else "(S,), (1, S) or (B, S)"
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; q {tuple(q.shape)} needs {want}")
    if not isinstance(position_offset, int) or isinstance(position_offset, bool):
        raise TypeError(f"position_offset must be an int, got {type(position_offset).__name__}")
    if not -ROPE_MAX_POSITION < position_offset < ROPE_MAX_POSITION:
        raise ValueError(f"position_offset={position_offset} is outside (-2**24, 2**24), the range where fp32 "
                         "RoPE positions are exact")
    if scaling is not None and not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling (use RopeScaling.from_hf(dict) for a Hugging Face "
                        f"config), got {type(scaling).__name__}")


def apply_rope(q: Tensor, k: Tensor, *, cu_seqlens: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
               base: float = 10000.0, scaling: Optional[RopeScaling] = None, rotary_dim: Optional[int] = None,
               interleaved: bool = False, inplace: bool = False, position_offset: int = 0,
               seq_len: Union[int, Tensor, None] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Rotate q (T, H, D) and k (T, H_kv, D) (or (B, S, H, D) layouts) by position; returns (q_out, k_out).

    Positions restart in every document of ``cu_seqlens`` (B + 1,), or come from ``position_ids``
    ((T,) or (S,)/(B, S)), or default to arange; ``position_offset`` is added to all of them.
    ``interleaved`` selects the GPT-J pair layout instead of NeoX rotate_half. Dims past ``rotary_dim``
    pass through. ``seq_len`` feeds dynamic NTK / longrope; it defaults to the longest document (+ offset).
    ``inplace=True`` rotates q and k in place (not allowed on leaves that require grad).
    The backward pass is the inverse rotation. Values of a CUDA cu_seqlens are not checked (no host sync).
    """
    _check_inputs(q, k, cu_seqlens, position_ids, position_offset, scaling)
    head_dim = q.shape[-1]
    if scaling is not None and scaling.kind in ("dynamic", "longrope") and seq_len is None:
        if cu_seqlens is not None:
            seq_len = (cu_seqlens[1:] - cu_seqlens[:-1]).max() + position_offset
        elif position_ids is not None:
            seq_len = position_ids.max() + 1 + position_offset
        else:
            seq_len = q.shape[-3] + position_offset
    inv_freq, af, max_inv_freq = _frequencies(head_dim, base, scaling, rotary_dim, seq_len, q.device)
    _check_position_range(_max_abs_position(q, cu_seqlens, position_ids, position_offset), max_inv_freq,
                          position_offset)
    name = _select(q.device.type, q.dtype in KERNEL_DTYPES, backend)
    cu = cu_seqlens.to(torch.int32).contiguous() if cu_seqlens is not None else None
    pos = None
    if position_ids is not None:
        # int64 ids beyond int32 saturate (still outside the accurate range: NaN in the kernels), never wrap
        pos = position_ids.clamp(-2**31, 2**31 - 1).to(torch.int32) if position_ids.dtype == torch.int64 \
            else position_ids
        pos = pos.reshape(1, -1) if pos.dim() == 1 else pos  # (B or 1, S)
    if not inplace:
        return torch.ops.lengen.rope(q, k, inv_freq, cu, pos, position_offset, af, interleaved, False, name)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        for arg, x in (("q", q), ("k", k)):
            if x.requires_grad and x.is_leaf:
                raise ValueError(f"inplace=True: {arg} is a leaf tensor that requires grad and cannot be "
                                 "modified in place; use inplace=False")
        return RopeInplace.apply(q, k, inv_freq, cu, pos, position_offset, af, interleaved, name)
    torch.ops.lengen.rope_(q, k, inv_freq, cu, pos, position_offset, af, interleaved, name)
    return q, k


class RotaryEmbedding(nn.Module):
    """Thin nn.Module over :func:`apply_rope` holding the RoPE configuration."""

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: Union[RopeScaling, dict, None] = None, *,
                 rotary_dim: Optional[int] = None, interleaved: bool = False, backend: Optional[str] = None,
                 max_position_embeddings: Optional[int] = None):
        super().__init__()
        if isinstance(scaling, dict):
            scaling = RopeScaling.from_hf(scaling, max_position_embeddings)
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self.rotary_dim = resolve_rotary_dim(head_dim, rotary_dim, scaling)
        self.interleaved, self.backend = interleaved, backend

    @classmethod
    def from_hf_config(cls, config, layer_type: Optional[str] = None, **kwargs) -> "RotaryEmbedding":
        """From a transformers model config (v4 rope_theta + rope_scaling, or v5 rope_parameters), read by
        :func:`rope_config_from_hf`; ``layer_type`` picks one set of a per-layer-type dict (Gemma-3)."""
        c = rope_config_from_hf(config, layer_type)
        kwargs.setdefault("rotary_dim", c.rotary_dim)
        return cls(c.head_dim, c.base, c.scaling, **kwargs)

    def forward(self, q: Tensor, k: Tensor, *, cu_seqlens: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, position_offset: int = 0,
                seq_len: Union[int, Tensor, None] = None, inplace: bool = False) -> tuple[Tensor, Tensor]:
        return apply_rope(q, k, cu_seqlens=cu_seqlens, position_ids=position_ids, base=self.base,
                          scaling=self.scaling, rotary_dim=self.rotary_dim, interleaved=self.interleaved,
                          inplace=inplace, position_offset=position_offset, seq_len=seq_len, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}")
