"""Does our RoPE with a given scaling rotate exactly as transformers' own rotary embedding with that rope config?

    err = check_scaling(model.config, RopeScaling("yarn", 4.0, 4096), max_position=32768)

``hf_rope_parameters`` writes a RopeScaling as the transformers rope dict that means the same thing, and
``hf_config_for`` puts it into a copy of a model config, as a user would at load time
(``from_pretrained(..., rope_parameters=...)``). ``check_scaling`` then builds transformers' rotary
embedding class from that config, rotates random q/k at positions up to ``max_position`` with it and with
``lengen_fast.apply_rope``, and raises ValueError when they differ by more than fp32 rounding.

Static NTK ("ntk") has no rope_type in transformers; by definition it is plain RoPE at the base
``rope_theta * factor ** (d / (d - 2))`` (d the rotary dim), which is what it is checked against.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect

import torch

# Tolerance per position p. transformers rounds the angle p * inv_freq to fp32 before its cos/sin; our kernels
# take the sincos of the exact product (the fma residual is carried into the range reduction). The angles then
# differ by at most half an ulp, |d theta| <= theta * 2**-24, and a rotated element by at most
# (|x1| + |x2|) * attention_factor * |d theta|, plus ~1e-6 relative for the cos/sin polynomials. Twice that bound:
# tiny at small positions (a wrong scaling differs by O(1) there), growing with p as fp32 itself does.
ULP_HALF = 2.0 ** -24
POLY = 1e-6
SAFETY = 2.0


def hf_rope_parameters(scaling, base: float, rotary_dim: int) -> tuple[dict, int | None]:
    """(transformers rope dict, max_position_embeddings the dict needs or None) meaning ``scaling`` at ``base``.

    Dynamic NTK in transformers scales relative to ``config.max_position_embeddings``, so it needs that set to
    the original context; the other kinds carry it in the dict.
    """
    from ...rope import RopeScaling

    s = scaling if scaling is not None else RopeScaling()
    base = float(s.rope_theta) if s.rope_theta is not None else float(base)
    if s.kind == "none":
        return {"rope_type": "default", "rope_theta": base}, None
    if s.kind == "ntk":
        return {"rope_type": "default", "rope_theta": base * s.factor ** (rotary_dim / (rotary_dim - 2))}, None
    if s.kind == "linear":
        return {"rope_type": "linear", "factor": s.factor, "rope_theta": base}, None
    if s.kind == "dynamic":
        return {"rope_type": "dynamic", "factor": s.factor, "rope_theta": base}, s.original_max_position_embeddings
    d = {"rope_type": s.kind, "factor": s.factor, "rope_theta": base,
         "original_max_position_embeddings": s.original_max_position_embeddings}
    default = RopeScaling(kind=s.kind, factor=s.factor, original_max_position_embeddings=s.original_max_position_embeddings,
                          short_factor=s.short_factor, long_factor=s.long_factor)
    keys = {"yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor"),
            "llama3": ("low_freq_factor", "high_freq_factor"),
            "longrope": ("short_factor", "long_factor", "attention_factor")}[s.kind]
    for k in keys:
        v = getattr(s, k)
        if v != getattr(default, k) or k in ("low_freq_factor", "high_freq_factor", "short_factor", "long_factor"):
            d[k] = list(v) if isinstance(v, tuple) else v
    return d, None


def hf_config_for(config, scaling, base: float, rotary_dim: int):
    """A deep copy of a transformers config whose RoPE is ``scaling`` (what loading with that rope dict gives)."""
    params, mpe = hf_rope_parameters(scaling, base, rotary_dim)
    cfg = copy.deepcopy(config)
    partial = getattr(cfg, "partial_rotary_factor", None)
    old = getattr(cfg, "rope_parameters", None)
    if isinstance(old, dict) and old.get("partial_rotary_factor") is not None:
        partial = old["partial_rotary_factor"]
    if partial is not None:
        params["partial_rotary_factor"] = partial
    if mpe is not None:
        cfg.max_position_embeddings = int(mpe)
    elif params.get("rope_type") in ("yarn", "longrope") and params.get("original_max_position_embeddings"):
        # transformers 5 warns when max_position_embeddings / original disagrees with an explicit factor
        cfg.max_position_embeddings = int(round(params["original_max_position_embeddings"] * params["factor"]))
    if hasattr(cfg, "rope_parameters"):       # transformers 5
        cfg.rope_parameters = params
    else:                                     # transformers 4: rope_theta on the config, the rest in rope_scaling
        cfg.rope_theta = params.pop("rope_theta")
        cfg.rope_scaling = None if params.get("rope_type") == "default" and len(params) == 1 else params
    return cfg


def probe_positions(max_position: int, n: int = 256) -> torch.Tensor:
    """(P,) sorted distinct positions: every one below 64, then evenly spaced up to max_position - 1."""
    dense = torch.arange(min(64, max_position))
    spread = torch.linspace(0, max_position - 1, n).round().long()
    return torch.unique(torch.cat([dense, spread]))


def check_scaling(config, scaling, *, max_position: int, rotary_cls=None, apply_fn=None, base: float | None = None,
                  rotary_dim: int | None = None, interleaved: bool = False, head_dim: int | None = None,
                  what: str = "") -> float:
    """Max |ours - transformers'| of q/k rotated at positions 0..max_position-1 with ``scaling``; ValueError when
    it exceeds fp32 rounding at some position (see ULP_HALF).

    config: the model's transformers config (a LlamaConfig stands in for our own models). rotary_cls / apply_fn:
    the model's rotary embedding class and its modeling module's ``apply_rotary_pos_emb`` (default: Llama's).
    Dynamic NTK depends on the sequence length: both sides see one sequence of ``max_position`` tokens.
    """
    from ...rope import apply_rope, rope_config_from_hf, rope_frequencies

    if rotary_cls is None or apply_fn is None:
        from transformers.models.llama import modeling_llama
        rotary_cls = rotary_cls or modeling_llama.LlamaRotaryEmbedding
        apply_fn = apply_fn or modeling_llama.apply_rotary_pos_emb
    apply_fn = getattr(apply_fn, "_lengen_original", apply_fn)
    hf_rope = rope_config_from_hf(config)
    base = hf_rope.base if base is None else base
    rotary_dim = hf_rope.rotary_dim if rotary_dim is None else rotary_dim
    head_dim = hf_rope.head_dim if head_dim is None else head_dim
    if scaling is None:  # the config's own RoPE
        scaling = hf_rope.scaling
    cfg = hf_config_for(config, scaling, base, rotary_dim)
    if "config" in inspect.signature(rotary_cls.__init__).parameters:
        rot = rotary_cls(config=cfg)
    else:  # older per-argument constructors
        rot = rotary_cls(rotary_dim, max_position_embeddings=cfg.max_position_embeddings, base=base)
    pos = probe_positions(max_position)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, pos.numel(), head_dim, generator=gen)                    # (B, H, P, D)
    k = torch.randn(1, 1, pos.numel(), head_dim, generator=gen)
    with torch.no_grad():
        cos, sin = rot(q, pos[None])
        want_q, want_k = apply_fn(q, k, cos.float(), sin.float())
    s = None if scaling is None else dataclasses.replace(scaling, partial_rotary_factor=None)
    got_q, got_k = apply_rope(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), position_ids=pos,
                              base=base, scaling=s, rotary_dim=rotary_dim, interleaved=interleaved,
                              seq_len=max_position)                                 # (P, H, D)
    dq = (got_q.transpose(0, 1)[None] - want_q).abs().amax(dim=(0, 1, 3))          # (P,) per position
    dk = (got_k.transpose(0, 1)[None] - want_k).abs().amax(dim=(0, 1, 3))
    err = torch.maximum(dq, dk)
    inv, af = rope_frequencies(head_dim, base, s, rotary_dim=rotary_dim, seq_len=max_position)
    xmax = float(torch.maximum(q.abs().max(), k.abs().max()))
    bound = SAFETY * 2 * xmax * abs(af) * (pos.double() * float(inv.abs().max()) * ULP_HALF + POLY)   # (P,)
    bad = ~(err.double() <= bound)                                                  # NaN fails too
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        params, _ = hf_rope_parameters(scaling, base, rotary_dim)
        raise ValueError(f"RoPE {what or scaling.kind}: lengen_fast's rotation differs from transformers' "
                         f"{rotary_cls.__name__} built with rope_parameters={params} by {float(err[i]):.3g} at "
                         f"position {int(pos[i])} (fp32 allows {float(bound[i]):.3g} there); this scaling cannot be "
                         "reproduced, so it is not evaluated")
    return float(err.max())
