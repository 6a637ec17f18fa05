"""Which RoPE scaling arms does lengen-eval run, and does each rotate exactly as transformers would?

Arm grammar (``--scaling``, comma-separated): ``kind`` or ``kind:factor``, kind one of
  none     plain RoPE at the checkpoint's rope_theta, whatever scaling its config holds: the baseline of every verdict
  config   the checkpoint's own RoPE config (added automatically when that config has a scaling)
  linear   position interpolation (PI)          ntk      static NTK-aware base
  dynamic  dynamic NTK (transformers' rule)     yarn     YaRN (default betas, mscale)
  llama3   Llama 3's frequency-banded interpolation (low/high freq factors 1 and 4)
A factor-less kind takes ``--factor`` (default: the largest multiple, so the extended context covers every evaluated
length). Every arm scales relative to the trained context L (original_max_position_embeddings = L).
Before anything runs, each arm's rotation is compared with transformers' own rotary embedding built with the
equivalent rope config (``integrations.hf.rope_check``) at positions up to the longest evaluated one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import EvalError

KINDS = ("none", "config", "linear", "ntk", "dynamic", "yarn", "llama3")


@dataclass
class Arm:
    name: str                 # "none", "config", "yarn:8"
    kind: str
    factor: float
    scaling: object           # RopeScaling passed to the model's forward; None = the checkpoint's own config
    per_length: bool          # frequencies depend on the sequence length: pack only equal-length documents
    hf_max_err: float = math.nan   # max |ours - transformers'| of the RoPE check
    hf_rope: dict | None = None    # the transformers rope dict it was checked against


def _fmt(f: float) -> str:
    return f"{f:g}"


def parse_arms(specs: list[str], factor: float, context: int, config_scaling, has_rope: bool) -> list[Arm]:
    """Arms in order, "none" first; EvalError naming --scaling for an unknown kind, a bad factor or a duplicate."""
    from ..rope import RopeScaling

    arms: list[Arm] = []
    items = [s.strip() for s in specs if s.strip()]
    if "none" not in [i.split(":")[0] for i in items]:
        items.insert(0, "none")
    if config_scaling is not None and config_scaling.kind != "none" and "config" not in items:
        items.insert(1, "config")
    for item in items:
        kind, _, f = item.partition(":")
        if kind not in KINDS:
            raise EvalError(f"--scaling: unknown arm {item!r}; kinds are {', '.join(KINDS)} (kind or kind:factor)")
        if kind in ("none", "config") and f:
            raise EvalError(f"--scaling: {kind!r} takes no factor, got {item!r}")
        try:
            fac = float(f) if f else float(factor)
        except ValueError:
            raise EvalError(f"--scaling: the factor in {item!r} is not a number") from None
        if not (math.isfinite(fac) and fac >= 1.0):
            raise EvalError(f"--scaling: the factor in {item!r} must be a finite number >= 1")
        if kind not in ("none", "config") and not has_rope:
            raise EvalError(f"--scaling {item!r}: this model has no RoPE, so only 'none' can be evaluated")
        if kind == "config" and (config_scaling is None or config_scaling.kind == "none"):
            raise EvalError("--scaling 'config': the checkpoint's config has no RoPE scaling (that is arm 'none')")
        if kind == "none":
            arm = Arm("none", "none", 1.0, RopeScaling(), False)
        elif kind == "config":
            arm = Arm("config", config_scaling.kind, config_scaling.factor, None,
                      config_scaling.kind in ("dynamic", "longrope"))
        else:
            orig = context if kind in ("dynamic", "yarn", "llama3") else None
            try:
                sc = RopeScaling(kind=kind, factor=fac, original_max_position_embeddings=orig)
            except (ValueError, TypeError) as e:
                raise EvalError(f"--scaling {item!r}: {e}") from e
            arm = Arm(f"{kind}:{_fmt(fac)}", kind, fac, sc, kind == "dynamic")
        if arm.name in [a.name for a in arms]:
            raise EvalError(f"--scaling: arm {arm.name!r} is given twice")
        arms.append(arm)
    return arms


def check_arms(arms: list[Arm], lm, max_position: int) -> None:
    """Each arm against transformers' rotary embedding with that rope config; EvalError when one differs."""
    from ..integrations.hf.rope_check import check_scaling, hf_rope_parameters

    if not lm.has_rope:
        return
    for arm in arms:
        scaling = arm.scaling if arm.scaling is not None else lm.config_scaling
        try:
            arm.hf_max_err = check_scaling(lm.hf_config, scaling, max_position=max_position, rotary_cls=lm.rotary_cls,
                                           apply_fn=lm.apply_fn, base=lm.base, rotary_dim=lm.rotary_dim,
                                           interleaved=lm.interleaved, head_dim=lm.head_dim, what=arm.name)
        except (ValueError, TypeError, KeyError) as e:
            raise EvalError(f"--scaling {arm.name!r}: a RoPE config lengen_fast cannot reproduce: {e}") from e
        arm.hf_rope = hf_rope_parameters(scaling, lm.base, lm.rotary_dim)[0]
