"""Which frequencies does each RoPE scaling give? The spec: RopeScaling, rope_frequencies, and the HF-config reader.

``rope_frequencies`` is the spec of the frequencies (it matches Hugging Face transformers' rope
initialisation for every kind in ``KINDS``); ``reference.apply_rope_ref`` is the spec of the rotation.
``RopeScaling.from_hf`` reads one ``rope_scaling`` / ``rope_parameters`` dict, and ``rope_config_from_hf``
reads a whole transformers config into (base, scaling, rotary_dim, head_dim): the one reader that both
``RotaryEmbedding.from_hf_config`` and ``integrations.hf.patch_rope`` use.
A new scaling kind goes here (and into test_rope.py): the kernels see only inv_freq and the attention factor.
"""

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

KINDS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
# Hugging Face rope_type -> our kind ("default" is plain RoPE)
_HF_KINDS = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
             "llama3": "llama3", "longrope": "longrope", "ntk": "ntk"}


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
        # every number finite (inf or NaN would silently disable or corrupt the rotation), named on refusal
        for name in ("factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor", "mscale",
                     "mscale_all_dim", "attention_factor", "rope_theta", "partial_rotary_factor",
                     "original_max_position_embeddings"):
            value = getattr(self, name)
            if value is None and name not in ("factor", "beta_fast", "beta_slow", "low_freq_factor",
                                              "high_freq_factor"):
                continue
            _check_finite(f"RopeScaling.{name}", value)
        if not (self.factor >= 1.0):
            raise ValueError(f"RopeScaling.factor={self.factor} must be >= 1 (a factor < 1 shrinks the context)")
        for name in ("beta_fast", "beta_slow", "attention_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"RopeScaling.{name}={value} must be > 0")
        if self.rope_theta is not None and not self.rope_theta > 1.0:
            raise ValueError(f"RopeScaling.rope_theta={self.rope_theta} must be > 1")
        orig = self.original_max_position_embeddings
        if self.kind in ("yarn", "llama3", "dynamic", "longrope") and orig is None:
            raise ValueError(f"RopeScaling(kind={self.kind!r}) needs original_max_position_embeddings "
                             "(the pretraining context length)")
        if orig is not None and (int(orig) != orig or orig <= 0):
            raise ValueError(f"RopeScaling.original_max_position_embeddings={orig} must be a positive integer")
        if self.kind == "llama3" and not self.low_freq_factor > 0:
            raise ValueError(f"RopeScaling.low_freq_factor={self.low_freq_factor} must be > 0 (llama3 divides the "
                             "original context by it)")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"RopeScaling: llama3 needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")
        if self.kind == "longrope":
            if self.short_factor is None or self.long_factor is None:
                raise ValueError("RopeScaling(kind='longrope') needs short_factor and long_factor lists")
            for name in ("short_factor", "long_factor"):
                values = getattr(self, name)
                if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                    raise TypeError(f"RopeScaling.{name} must be a list of numbers, got {type(values).__name__}")
                values = tuple(_number(f"RopeScaling.{name}[{i}]", x) for i, x in enumerate(values))
                for i, x in enumerate(values):
                    if not x > 0:
                        raise ValueError(f"RopeScaling.{name}[{i}]={x} must be > 0")
                object.__setattr__(self, name, values)
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
        if not isinstance(params, Mapping):
            raise TypeError(f"RopeScaling.from_hf expects a mapping (a rope_scaling / rope_parameters dict) or "
                            f"None, got {type(params).__name__}")
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
                kw[key] = _number(f"rope config {key!r}", p[key])
            p.pop(key, None)
        factor = p.pop("factor", None)
        factor = None if factor is None else _number("rope config 'factor'", factor)
        orig = p.pop("original_max_position_embeddings", None)
        if orig is not None:
            orig = _number("rope config 'original_max_position_embeddings'", orig)
            if orig != int(orig) or orig <= 0:
                raise ValueError(f"rope config 'original_max_position_embeddings'={orig} must be a positive integer")
            orig = int(orig)
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
                if conv is float and value is not None:
                    value = _number(f"rope config {key!r}", value)
                elif conv is bool and not isinstance(value, bool):
                    raise TypeError(f"rope config {key!r} must be true or false, got {value!r}")
                # transformers treats beta_fast/beta_slow of 0/None as "use the default"
                if value is not None and not (key in ("beta_fast", "beta_slow") and not value):
                    kw[key] = conv(value) if conv is not tuple else value
        if p:
            raise ValueError(f"rope config has keys this RoPE does not understand: {sorted(p)}")
        return cls(**kw)


def _number(name: str, value) -> float:
    """A finite real number from a config value: int/float, or a numeric string (JSON written by hand); the
    refusal names the key."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    return value


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")


def _base_inv_freq(dim: int, base, device) -> Tensor:
    # written exactly as transformers does, so the fp32 values match bit for bit
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float) / dim))



def resolve_rotary_dim(head_dim: int, rotary_dim: Optional[int], scaling: Optional[RopeScaling]) -> int:
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
    dim = resolve_rotary_dim(head_dim, rotary_dim, scaling)
    s = scaling if scaling is not None else RopeScaling()
    base = s.rope_theta if s.rope_theta is not None else float(base)
    if not (base > 1.0 and math.isfinite(base)):
        raise ValueError(f"base={base} must be a finite number > 1")
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


# ------------------------------------------------------------------------------------- HF configs

class HFRopeConfig(NamedTuple):
    """What a transformers config says about RoPE (read by :func:`rope_config_from_hf`)."""
    base: float             # the rope_theta in effect
    scaling: RopeScaling    # kind "none" for plain RoPE; carries rope_theta and partial_rotary_factor as well
    rotary_dim: int         # int(head_dim * partial_rotary_factor), as transformers computes it
    head_dim: int


def rope_config_from_hf(config, layer_type: Optional[str] = None) -> HFRopeConfig:
    """(base, scaling, rotary_dim, head_dim) of a transformers model config: the one HF-config reader for RoPE.

    Reads a v5 ``rope_parameters`` dict, or a v4 ``rope_scaling`` dict with ``rope_theta`` and
    ``partial_rotary_factor`` on the config. As in transformers, a value in the dict wins over the config
    attribute, which wins over the default (rope_theta 10000, partial_rotary_factor 1). A v5 dict keyed by
    layer type (Gemma-3: "full_attention" / "sliding_attention") needs ``layer_type``; a single dict serves
    every layer type. A multimodal config is read through its ``get_text_config()``.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, Mapping):
        raise TypeError(f"config.rope_parameters / rope_scaling must be a dict, got {type(params).__name__}")
    if params and all(isinstance(v, Mapping) for v in params.values()):  # {layer_type: rope parameters}
        if layer_type is None:
            raise ValueError(f"the config has RoPE parameters per layer type ({sorted(params)}); "
                             "pass layer_type= one of them")
        if layer_type not in params:
            raise ValueError(f"layer_type={layer_type!r} is not one of the config's RoPE layer types {sorted(params)}")
        params = params[layer_type]
    params = dict(params)
    for key in ("rope_theta", "partial_rotary_factor"):
        if params.get(key) is None:  # v4: on the config itself
            params[key] = getattr(config, key, None)
    if params["rope_theta"] is None:
        params["rope_theta"] = 10000.0
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        if getattr(config, "hidden_size", None) is None or not getattr(config, "num_attention_heads", None):
            raise ValueError("the config has neither head_dim nor hidden_size and num_attention_heads")
        head_dim = config.hidden_size // config.num_attention_heads
    scaling = RopeScaling.from_hf(params, getattr(config, "max_position_embeddings", None))
    return HFRopeConfig(scaling.rope_theta, scaling, resolve_rotary_dim(head_dim, None, scaling), head_dim)
