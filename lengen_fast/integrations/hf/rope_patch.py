"""How does a transformers model rotate q and k with lengen_fast.apply_rope instead of its cos/sin cache?

    hf.patch_rope(model)                            # optional, after building the model
    hf.patch_rope(model, scaling=RopeScaling("yarn", 4.0, 4096))    # the same, with a context extension
    with hf.rope_scaling_override(model, RopeScaling("linear", 2.0)): ...   # for some forwards only

``patch_rope`` reads the model's RoPE config, checks our frequencies, attention factor and rotation layout
against the model's own rotary code, then makes the rotary embedding hand out positions
(``_RopePositions``) and wraps the modeling module's ``apply_rotary_pos_emb`` to rotate q and k in one op.
A model we would rotate differently raises ValueError instead of being patched.

A scaling given to ``patch_rope`` or ``rope_scaling_override`` replaces the config's one at run time (the
config is not touched: transformers 5 reads ``config.rope_parameters`` only when the rotary module is built, so
setting ``config.rope_scaling`` after ``from_pretrained`` silently changes nothing). ``rope_check`` compares
such a scaling with transformers' own rotary embedding built with the equivalent config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch

from .compat import _transformers


class _RopePositions:
    """What the patched rotary embedding hands the attention layers instead of (cos, sin)."""

    __slots__ = ("position_ids", "base", "scaling", "rotary_dim", "interleaved")

    def __init__(self, position_ids, base, scaling, rotary_dim, interleaved):
        self.position_ids = position_ids
        self.base = base
        self.scaling = scaling
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved


def _fused_rope(q: torch.Tensor, k: torch.Tensor, p: _RopePositions, unsqueeze_dim: int = 1):
    """Rotate q (B, H, S, D) / k (B, H_kv, S, D) (or (B, S, H, D) when unsqueeze_dim=2) with our RoPE."""
    from ...rope import apply_rope

    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"lengen_fast.patch_rope: unsupported unsqueeze_dim={unsqueeze_dim}")
    qs, ks = (q.transpose(1, 2), k.transpose(1, 2)) if unsqueeze_dim == 1 else (q, k)   # (B, S, H, D)
    B, S, H, D = qs.shape
    H_kv = ks.shape[2]
    pos = p.position_ids.expand(B, S).reshape(-1)
    qo, ko = apply_rope(qs.reshape(B * S, H, D), ks.reshape(B * S, H_kv, D), position_ids=pos, base=p.base,
                        scaling=p.scaling, rotary_dim=p.rotary_dim, interleaved=p.interleaved)
    qo, ko = qo.view(B, S, H, D), ko.view(B, S, H_kv, D)
    return (qo.transpose(1, 2), ko.transpose(1, 2)) if unsqueeze_dim == 1 else (qo, ko)


def _wrap_apply(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if isinstance(cos, _RopePositions):
            return _fused_rope(q, k, cos, *args, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._lengen_original = original
    return apply_rotary_pos_emb


def _rope_config(config):
    """(base, scaling) from a transformers config, read by ``rope.rope_config_from_hf`` (the one reader).

    The rotary dim is dropped from the scaling: patch_rope takes it from the model's inv_freq buffer.
    """
    from ...rope import rope_config_from_hf

    base, scaling, _, _ = rope_config_from_hf(config)
    return base, dataclasses.replace(scaling, partial_rotary_factor=None)


def rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    """The model's one rotary embedding module (with an ``inv_freq`` buffer); ValueError otherwise."""
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotaries) != 1 or not isinstance(getattr(rotaries[0], "inv_freq", None), torch.Tensor):
        raise ValueError(f"lengen_fast.patch_rope: expected one rotary embedding module with inv_freq, found "
                         f"{[type(m).__name__ for m in rotaries]} in {type(model).__name__}")
    return rotaries[0]


def _as_override(scaling):
    """A RopeScaling for run time: the rotary dim is the model's (from its inv_freq), so it is dropped here."""
    from ...rope import RopeScaling

    if scaling is None:
        return None
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"lengen_fast.patch_rope: scaling must be a lengen_fast.RopeScaling or None, got "
                        f"{type(scaling).__name__} (RopeScaling.from_hf(dict) reads a transformers rope dict)")
    return dataclasses.replace(scaling, partial_rotary_factor=None)


@contextlib.contextmanager
def rope_scaling_override(model: torch.nn.Module, scaling):
    """Within the block, a patched model rotates with ``scaling`` (a RopeScaling; None: the patched default)."""
    rot = rotary_module(model)
    if not getattr(rot, "_lengen_patched", False):
        raise ValueError("rope_scaling_override needs a model patched by lengen_fast's patch_rope(model) first")
    old = rot._lengen_override
    rot._lengen_override = _as_override(scaling)
    try:
        yield model
    finally:
        rot._lengen_override = old


def patch_rope(model: torch.nn.Module, scaling=None) -> torch.nn.Module:
    """Replace the model's rotary application with lengen_fast.apply_rope (fused, fp32 angles, no cos/sin cache).

    The rotary embedding module then returns the position ids, and the attention layers' calls to
    ``apply_rotary_pos_emb`` rotate q and k in one op. The model's own RoPE config goes through
    ``RopeScaling.from_hf``; before patching, the frequencies, attention factor and rotation layout
    are checked against the model's own rotary code, and a model we would rotate differently raises
    ValueError. ``scaling`` (a RopeScaling): rotate with it instead of the config's scaling from now on
    (``rope_check.check_scaling`` compares it with transformers' code). Returns the model (patched in place).
    """
    from ...reference import rope_cos_sin_ref
    from ...rope import rope_frequencies

    _transformers()
    rot = rotary_module(model)
    override = _as_override(scaling)
    if getattr(rot, "_lengen_patched", False):
        if scaling is not None:
            rot._lengen_default = override
        return model
    # the undecorated forward: 4.56-4.57 wrap attention forwards in @deprecate_kwarg, whose globals are not the model's
    forwards = {m: inspect.unwrap(type(m).forward) for m in model.modules()}
    layers = [m for m, f in forwards.items()
              if "apply_rotary_pos_emb" in getattr(getattr(f, "__code__", None), "co_names", ())]
    if not layers:
        raise ValueError(f"lengen_fast.patch_rope: no attention layer of {type(model).__name__} calls "
                         "apply_rotary_pos_emb; this model's rotary layout is not supported")
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    base, scaling = _rope_config(config)
    rotary_dim = 2 * rot.inv_freq.numel()
    head_dim = getattr(layers[0], "head_dim", rotary_dim)

    # 1. frequencies and attention factor: ours vs the model's buffers
    inv, factor = rope_frequencies(head_dim, base, scaling, rotary_dim=rotary_dim)
    hf_inv = getattr(rot, "original_inv_freq", rot.inv_freq).detach().float().cpu()
    rtol = 1e-5 if rot.inv_freq.dtype == torch.float32 else 1e-2
    hf_factor = float(getattr(rot, "attention_scaling", 1.0))
    if (inv.shape != hf_inv.shape or not torch.allclose(inv.float().cpu(), hf_inv, rtol=rtol, atol=0)
            or abs(factor - hf_factor) > 1e-5 * max(1.0, abs(hf_factor))):
        raise ValueError(f"lengen_fast.patch_rope: RoPE from the config (base={base}, scaling={scaling}) does not "
                         f"match {type(rot).__name__}'s frequencies/attention factor; leave this model unpatched")
    # 2. rotation layout: the model's apply_rotary_pos_emb vs ours on a probe, NeoX then GPT-J layout;
    # 3. and the model's own cos for that layout (small positions: a bf16 inv_freq buffer is coarse)
    globals_ = {id(g): g for g in (forwards[m].__globals__ for m in layers)}
    gen = torch.Generator().manual_seed(0)
    pos = torch.tensor([0, 1, 2, 7, 31, 100])
    q = torch.randn(1, 2, pos.numel(), head_dim, generator=gen)
    k = torch.randn(1, 1, pos.numel(), head_dim, generator=gen)
    with torch.no_grad():
        hf_cos = rot(torch.zeros(1, dtype=torch.float32, device=rot.inv_freq.device),
                     pos[None, :4].to(rot.inv_freq.device))[0][0].float().cpu()            # (4, rotary_dim)
    interleaved = None
    originals = []
    for g in globals_.values():
        original = getattr(g["apply_rotary_pos_emb"], "_lengen_original", g["apply_rotary_pos_emb"])
        originals.append(original)
        interleaved = None
        for inter in (False, True):
            cos, sin = rope_cos_sin_ref(pos, inv.float(), factor, interleaved=inter)
            # the full head, or only the rotary part for models (Phi) whose attention splits q before the call
            for width in dict.fromkeys((head_dim, rotary_dim)):
                try:
                    want_q, want_k = original(q[..., :width], k[..., :width], cos[None], sin[None])
                except RuntimeError:
                    continue
                got_q, got_k = _fused_rope(q[..., :width], k[..., :width],
                                           _RopePositions(pos[None], base, scaling, rotary_dim, inter))
                if (torch.allclose(got_q, want_q, atol=1e-4) and torch.allclose(got_k, want_k, atol=1e-4)
                        and torch.allclose(hf_cos, cos[:4], atol=5e-2)):
                    interleaved = inter
                    break
            if interleaved is not None:
                break
        if interleaved is None:
            raise ValueError(f"lengen_fast.patch_rope: {g.get('__name__')}.apply_rotary_pos_emb with "
                             f"{type(rot).__name__} rotates differently from lengen_fast.apply_rope (NeoX or "
                             "GPT-J layout); leave this model unpatched")
    for g in globals_.values():
        if not hasattr(g["apply_rotary_pos_emb"], "_lengen_original"):
            g["apply_rotary_pos_emb"] = _wrap_apply(g["apply_rotary_pos_emb"])

    def forward(x, position_ids, *args, **kwargs):
        s = rot._lengen_override if rot._lengen_override is not None else rot._lengen_default
        return _RopePositions(position_ids, base, s, rotary_dim, interleaved), None

    rot.forward = forward
    rot._lengen_default = scaling if override is None else override   # what forward uses outside an override
    rot._lengen_override = None
    rot._lengen_rope = {"base": base, "config_scaling": scaling, "rotary_dim": rotary_dim, "head_dim": head_dim,
                        "interleaved": interleaved, "apply_fn": originals[0]}   # what rope_check compares with
    rot._lengen_patched = True
    return model
