"""Fused RoPE with context-extension scaling: RopeScaling, rope_frequencies, apply_rope, RotaryEmbedding.

``rope_frequencies`` is the spec of the frequencies (it matches Hugging Face transformers' rope
initialisation for every kind); ``reference.apply_rope_ref`` is the spec of the rotation. The kernels
(C++ CPU, Triton, CUDA) rotate q and k in one launch, compute the angles in fp32 in registers
(no cos/sin cache) and find each token's position inside its document by a binary search over
cu_seqlens, one token per work item.
"""

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import backends
from .reference import apply_rope_ref, positions_from_cu_seqlens

KINDS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
# Hugging Face rope_type -> our kind ("default" is plain RoPE)
_HF_KINDS = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
             "llama3": "llama3", "longrope": "longrope", "ntk": "ntk"}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are rescaled for a longer context.

    kind: none | linear | ntk (static NTK-aware base) | dynamic (dynamic NTK) | yarn | llama3 | longrope.
    ``original_max_position_embeddings`` is the pretraining context length; dynamic NTK uses it as
    Hugging Face uses ``max_position_embeddings``. ``rope_theta`` / ``partial_rotary_factor`` come from
    a v5 ``rope_parameters`` dict and, when set, take precedence over ``base`` / ``rotary_dim``.
    """
    kind: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True
    attention_factor: Optional[float] = None  # yarn, longrope: overrides the default cos/sin scale
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # longrope: one factor per frequency (rotary_dim // 2)
    short_factor: Optional[tuple] = None
    long_factor: Optional[tuple] = None
    rope_theta: Optional[float] = None
    partial_rotary_factor: Optional[float] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"RopeScaling.kind={self.kind!r} is not one of {KINDS}")
        if not (self.factor >= 1.0):
            raise ValueError(f"RopeScaling.factor={self.factor} must be >= 1 (a factor < 1 shrinks the context)")
        orig = self.original_max_position_embeddings
        if self.kind in ("yarn", "llama3", "dynamic", "longrope") and orig is None:
            raise ValueError(f"RopeScaling(kind={self.kind!r}) needs original_max_position_embeddings "
                             "(the pretraining context length)")
        if orig is not None and (int(orig) != orig or orig <= 0):
            raise ValueError(f"RopeScaling.original_max_position_embeddings={orig} must be a positive integer")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"RopeScaling: llama3 needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")
        if self.kind == "longrope":
            if self.short_factor is None or self.long_factor is None:
                raise ValueError("RopeScaling(kind='longrope') needs short_factor and long_factor lists")
            object.__setattr__(self, "short_factor", tuple(float(x) for x in self.short_factor))
            object.__setattr__(self, "long_factor", tuple(float(x) for x in self.long_factor))
            if len(self.short_factor) != len(self.long_factor):
                raise ValueError(f"RopeScaling: longrope short_factor has {len(self.short_factor)} entries but "
                                 f"long_factor has {len(self.long_factor)}")
        if self.partial_rotary_factor is not None and not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"RopeScaling.partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]")

    @classmethod
    def from_hf(cls, params: Optional[dict], max_position_embeddings: Optional[int] = None) -> "RopeScaling":
        """Build from a Hugging Face ``rope_scaling`` (v4) or ``rope_parameters`` (v5) dict, unchanged.

        ``max_position_embeddings`` is the model config's value: dynamic NTK scales relative to it, and
        yarn / llama3 / longrope fall back to it when the dict has no original_max_position_embeddings
        (as transformers does).
        """
        if params is None:
            return cls()
        p = dict(params)
        rope_type = p.pop("rope_type", None)
        legacy_type = p.pop("type", None)
        rope_type = rope_type or legacy_type or "default"
        if rope_type not in _HF_KINDS:
            raise ValueError(f"rope_type={rope_type!r} is not supported (supported: {sorted(_HF_KINDS)})")
        kind = _HF_KINDS[rope_type]
        kw: dict = {"kind": kind}
        for key in ("rope_theta", "partial_rotary_factor"):
            if p.get(key) is not None:
                kw[key] = float(p[key])
            p.pop(key, None)
        factor = p.pop("factor", None)
        orig = p.pop("original_max_position_embeddings", None)
        if kind == "dynamic":
            orig = max_position_embeddings if max_position_embeddings is not None else orig
        elif kind in ("yarn", "llama3", "longrope") and orig is None:
            orig = max_position_embeddings
        if kind != "none":
            kw["original_max_position_embeddings"] = orig
        if factor is None and kind in ("yarn", "longrope") and orig is not None and max_position_embeddings:
            factor = max_position_embeddings / orig  # transformers' implicit factor (DeepSeek-V3, Phi-3)
        if factor is not None and kind != "none":
            kw["factor"] = float(factor)
        elif kind in ("linear", "ntk", "dynamic", "yarn", "llama3"):
            raise ValueError(f"rope config of type {rope_type!r} has no 'factor'")
        simple = {"beta_fast": float, "beta_slow": float, "mscale": float, "mscale_all_dim": float,
                  "truncate": bool, "attention_factor": float, "low_freq_factor": float,
                  "high_freq_factor": float, "short_factor": tuple, "long_factor": tuple}
        for key, conv in simple.items():
            if key in p:
                value = p.pop(key)
                # transformers treats beta_fast/beta_slow of 0/None as "use the default"
                if value is not None and not (key in ("beta_fast", "beta_slow") and not value):
                    kw[key] = conv(value)
        if p:
            raise ValueError(f"rope config has keys this RoPE does not understand: {sorted(p)}")
        return cls(**kw)


def _base_inv_freq(dim: int, base, device) -> Tensor:
    # written exactly as transformers does, so the fp32 values match bit for bit
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float) / dim))


def _resolve_dims(head_dim: int, rotary_dim: Optional[int], scaling: Optional[RopeScaling]) -> int:
    if scaling is not None and scaling.partial_rotary_factor is not None:
        hf_dim = int(head_dim * scaling.partial_rotary_factor)
        if rotary_dim is not None and rotary_dim != hf_dim:
            raise ValueError(f"rotary_dim={rotary_dim} disagrees with partial_rotary_factor="
                             f"{scaling.partial_rotary_factor} (head_dim {head_dim} -> {hf_dim})")
        rotary_dim = hf_dim
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim={rotary_dim} must be a positive even integer <= head_dim={head_dim}")
    return rotary_dim


def rope_frequencies(head_dim: int, base: float = 10000.0, scaling: Optional[RopeScaling] = None, *,
                     rotary_dim: Optional[int] = None, seq_len: Union[int, Tensor, None] = None,
                     device=None) -> tuple[Tensor, float]:
    """(inv_freq: fp32 (rotary_dim // 2,), attention_factor: float) for ``scaling``; the spec.

    Matches transformers' ROPE_INIT_FUNCTIONS. ``seq_len`` (int or 0-d tensor, no host sync) is the
    current sequence length used by dynamic NTK and longrope; on packed data pass the longest document.
    """
    dim = _resolve_dims(head_dim, rotary_dim, scaling)
    s = scaling if scaling is not None else RopeScaling()
    base = s.rope_theta if s.rope_theta is not None else float(base)
    if not base > 1.0:
        raise ValueError(f"base={base} must be > 1")
    if isinstance(seq_len, Tensor):
        device = seq_len.device
    kind, factor = s.kind, s.factor
    if kind == "none":
        return _base_inv_freq(dim, base, device), 1.0
    if kind == "linear":
        return _base_inv_freq(dim, base, device) / factor, 1.0
    if kind == "ntk":
        return _base_inv_freq(dim, base * factor ** (dim / (dim - 2)), device), 1.0
    if kind == "dynamic":
        mpe = s.original_max_position_embeddings
        if seq_len is None:
            seq_len = mpe
        elif isinstance(seq_len, Tensor):
            seq_len = torch.maximum(seq_len, torch.tensor(mpe, dtype=seq_len.dtype, device=seq_len.device))
        else:
            seq_len = max(int(seq_len), mpe)
        new_base = base * ((factor * seq_len / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(dim, new_base, device), 1.0
    if kind == "yarn":
        return _yarn(dim, base, s, device)
    if kind == "llama3":
        return _llama3(dim, base, s, device)
    return _longrope(dim, base, s, seq_len, device)


def _yarn(dim, base, s: RopeScaling, device):
    factor, orig = s.factor, s.original_max_position_embeddings

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations):
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).to(torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _llama3(dim, base, s: RopeScaling, device):
    inv_freq = _base_inv_freq(dim, base, device)
    factor, old_context = s.factor, s.original_max_position_embeddings
    low_wavelen = old_context / s.low_freq_factor
    high_wavelen = old_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)   # long waves: interpolate
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv), 1.0


def _longrope(dim, base, s: RopeScaling, seq_len, device):
    orig = s.original_max_position_embeddings
    if len(s.short_factor) != dim // 2:
        raise ValueError(f"longrope short_factor/long_factor have {len(s.short_factor)} entries; "
                         f"rotary_dim={dim} needs {dim // 2}")
    attention_factor = s.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if s.factor <= 1.0 else math.sqrt(1 + math.log(s.factor) / math.log(orig))
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    short = torch.tensor(s.short_factor, dtype=torch.float32, device=device)
    long = torch.tensor(s.long_factor, dtype=torch.float32, device=device)
    if isinstance(seq_len, Tensor):  # traceable choice, no host sync
        ext = torch.where(seq_len > orig, long, short)
    else:
        ext = long if (seq_len and seq_len > orig) else short
    return 1.0 / (ext * base ** shape), float(attention_factor)


# ------------------------------------------------------------------------------------- the op

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


def _ext_args(q, k, qo, ko, inv_freq, cu, pos, offset, af, interleaved) -> tuple:
    """Positional arguments of rope_apply_cpu / rope_apply_cuda for (B, S, H, D) views."""
    B, S, Hq, D = q.shape
    pos_mode = 2 if cu is not None else (1 if pos is not None else 0)
    return (q.data_ptr(), k.data_ptr(), qo.data_ptr(), ko.data_ptr(), backends.DTYPE_CODES[q.dtype],
            B, S, Hq, k.shape[2], D, inv_freq.numel() * 2,
            list(q.stride()), list(qo.stride()), list(k.stride()), list(ko.stride()), inv_freq.data_ptr(),
            pos_mode, pos.data_ptr() if pos is not None else 0,
            (pos.stride(0) if pos.shape[0] > 1 else 0) if pos is not None else 0,  # (1, S) broadcasts over B
            pos.stride(1) if pos is not None else 0,
            cu.data_ptr() if cu is not None else 0, cu.numel() - 1 if cu is not None else 0,
            int(offset), float(af), bool(interleaved))


def _impl_cpu(*args):
    backends.cpu_ext().rope_apply_cpu(*_ext_args(*args))


def _impl_cuda(*args):
    stream = torch.cuda.current_stream(args[0].device).cuda_stream
    backends.cuda_ext().rope_apply_cuda(*_ext_args(*args), stream)


def _impl_triton(q, k, qo, ko, inv_freq, cu, pos, offset, af, interleaved):
    from .triton.rope import rope_triton
    rope_triton(q, k, qo, ko, inv_freq, cu, pos, offset, af, interleaved)


_IMPLS = {"cuda": _impl_cuda, "triton": _impl_triton, "cpu": _impl_cpu, "reference": _impl_reference}


def _as4d(x: Tensor) -> Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x  # (T, H, D) -> (1, T, H, D)


def _run(q, k, qo, ko, inv_freq, cu, pos, offset, af, interleaved, backward, backend):
    if cu is not None:
        _check_cu_values(cu, q.shape[0])
    # the inverse rotation R(-theta) = rotation by -inv_freq; the attention factor stays (adjoint of a*R)
    inv = (-inv_freq if backward else inv_freq).contiguous()
    _IMPLS[backend](_as4d(q), _as4d(k), _as4d(qo), _as4d(ko), inv, cu, pos, offset, af, interleaved)


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


class _RopeInplace(torch.autograd.Function):
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


# ------------------------------------------------------------------------------------- public API

_FREQ_CACHE: dict = {}


def _frequencies(head_dim, base, scaling, rotary_dim, seq_len, device) -> tuple[Tensor, float]:
    """rope_frequencies on ``device``, cached for static configs (frequencies are tiny; launches are not)."""
    if isinstance(seq_len, Tensor) or torch.compiler.is_compiling():
        inv, af = rope_frequencies(head_dim, base, scaling, rotary_dim=rotary_dim, seq_len=seq_len, device=device)
        return inv.to(device), af
    key = (head_dim, float(base), scaling, rotary_dim, seq_len, str(device))
    hit = _FREQ_CACHE.get(key)
    if hit is None:
        if len(_FREQ_CACHE) > 256:
            _FREQ_CACHE.clear()
        inv, af = rope_frequencies(head_dim, base, scaling, rotary_dim=rotary_dim, seq_len=seq_len)
        hit = _FREQ_CACHE[key] = (inv.to(device), af)
    return hit


@torch.compiler.assume_constant_result
def _select(device_type: str, kernel_dtype: bool, backend: Optional[str]) -> str:
    """backends.select for this op; a trace-time constant under torch.compile (it reads env and imports)."""
    supported = tuple(_IMPLS) if kernel_dtype else ("reference",)
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
    inv_freq, af = _frequencies(head_dim, base, scaling, rotary_dim, seq_len, q.device)
    name = _select(q.device.type, q.dtype in _KERNEL_DTYPES, backend)
    cu = cu_seqlens.to(torch.int32).contiguous() if cu_seqlens is not None else None
    pos = None
    if position_ids is not None:
        pos = position_ids.to(torch.int32)
        pos = pos.reshape(1, -1) if pos.dim() == 1 else pos  # (B or 1, S)
    if not inplace:
        return torch.ops.lengen.rope(q, k, inv_freq, cu, pos, position_offset, af, interleaved, False, name)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        for arg, x in (("q", q), ("k", k)):
            if x.requires_grad and x.is_leaf:
                raise ValueError(f"inplace=True: {arg} is a leaf tensor that requires grad and cannot be "
                                 "modified in place; use inplace=False")
        return _RopeInplace.apply(q, k, inv_freq, cu, pos, position_offset, af, interleaved, name)
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
        self.rotary_dim = _resolve_dims(head_dim, rotary_dim, scaling)
        self.interleaved, self.backend = interleaved, backend

    @classmethod
    def from_hf_config(cls, config, **kwargs) -> "RotaryEmbedding":
        """From a transformers model config (v4 rope_theta + rope_scaling, or v5 rope_parameters)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        base = getattr(config, "rope_theta", None) or 10000.0
        params = dict(params or {})
        if getattr(config, "partial_rotary_factor", None) is not None:
            params.setdefault("partial_rotary_factor", config.partial_rotary_factor)
        return cls(head_dim, base, RopeScaling.from_hf(params, getattr(config, "max_position_embeddings", None)),
                   **kwargs)

    def forward(self, q: Tensor, k: Tensor, *, cu_seqlens: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, position_offset: int = 0,
                seq_len: Union[int, Tensor, None] = None, inplace: bool = False) -> tuple[Tensor, Tensor]:
        return apply_rope(q, k, cu_seqlens=cu_seqlens, position_ids=position_ids, base=self.base,
                          scaling=self.scaling, rotary_dim=self.rotary_dim, interleaved=self.interleaved,
                          inplace=inplace, position_offset=position_offset, seq_len=seq_len, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}")
