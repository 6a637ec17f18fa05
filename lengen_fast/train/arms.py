"""What is an arm? One set of orthogonal batching knobs, its presets, its one grammar, and one-factor ablations.

An arm (:class:`ArmConfig`) is what a comparison varies: packing (concat | bfd | decompose), attention span
(row | document), positions (row | document), the curriculum of decomposition buckets, its cycles, and how task
documents are fitted to rows (none | pad). The familiar strategies are named presets of these knobs; a few
aliases keep the names language-model papers use (``concat`` is concat-and-chunk). A new arm needs no code:
``name:knob=value,...`` with ``base=<preset>`` supplying the knobs not given. Every workload (tasks, corpus)
uses this one type, table and grammar.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data.curriculum import CURRICULA

PACKINGS = ("concat", "bfd", "decompose")   # cut every seq_len | best-fit-decreasing rows | DD buckets
SPANS = ("row", "document")                 # attention span and position resets
FITS = ("none", "pad")                      # pad: task documents padded to a power of two (counted as padding)
KNOBS = ("packing", "attention", "positions", "curriculum", "cycles", "fit")


@dataclass(frozen=True)
class ArmConfig:
    """One arm of the comparison: each field is one independent knob."""
    name: str
    packing: str = "bfd"
    attention: str = "document"
    positions: str = "document"
    curriculum: str = "natural"         # decompose only: the order of its buckets
    cycles: int = 1                     # decompose only: curriculum cycles per epoch
    fit: str = "none"

    def knobs(self) -> dict:
        return {k: getattr(self, k) for k in KNOBS}

    def spec(self) -> str:
        """The ``name:knob=v,...`` spelling that parse_arm turns back into this arm."""
        return f"{self.name}:" + ",".join(f"{k}={v}" for k, v in self.knobs().items())


KNOB_CHOICES = {"packing": PACKINGS, "attention": SPANS, "positions": SPANS, "curriculum": CURRICULA, "fit": FITS}
ARM_PRESETS = {
    "concat_chunk": ArmConfig("concat_chunk", packing="concat", attention="row", positions="row"),
    "pack_naive": ArmConfig("pack_naive", packing="bfd", attention="row", positions="row"),
    "pack_masked": ArmConfig("pack_masked", packing="bfd", attention="document", positions="document"),
    "vsl": ArmConfig("vsl", packing="decompose", curriculum="grow_p2", fit="pad"),
    "concat_docmask": ArmConfig("concat_docmask", packing="concat"),
    "dd_natural": ArmConfig("dd_natural", packing="decompose"),
    "dd_grow_p2": ArmConfig("dd_grow_p2", packing="decompose", curriculum="grow_p2"),
}
# other names for presets (the language-model papers' spellings); the arm keeps the name it was given
ARM_ALIASES = {"concat": "concat_chunk", "bfd_docmask": "pack_masked"}
GRAMMAR = "name:packing=bfd,attention=document,positions=document,curriculum=natural,cycles=1,fit=none"


def preset_names() -> list[str]:
    return sorted(ARM_PRESETS) + sorted(ARM_ALIASES)


def parse_arm(spec: str) -> ArmConfig:
    """``vsl`` (a preset or alias) or ``name:knob=value,...``; ``base=<preset>`` supplies the knobs not given."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"arm spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        if spec in ARM_ALIASES:
            return dataclasses.replace(ARM_PRESETS[ARM_ALIASES[spec]], name=spec)
        if spec not in ARM_PRESETS:
            raise ValueError(f"unknown arm {spec!r}: choose a preset {preset_names()} or define one as {GRAMMAR}")
        return ARM_PRESETS[spec]
    if "=" not in spec:
        raise ValueError(f"arm spec {spec!r} is not name:knob=value,... (the packing:attention:positions spelling of "
                         f"older lengen-train lm versions is gone): {GRAMMAR}")
    name, _, body = spec.partition(":")
    name = name.strip()
    if not name or any(c in name for c in "/\\ ") or name in ARM_PRESETS or name in ARM_ALIASES:
        raise ValueError(f"arm spec {spec!r}: the name before ':' must be a new, plain name (not a preset; "
                         "no spaces or slashes)")
    vals = {}
    for item in filter(None, (x.strip() for x in body.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"arm spec {spec!r}: {item!r} is not knob=value (grammar: {GRAMMAR})")
        vals[k.strip()] = v.strip()
    base = ArmConfig(name)
    if "base" in vals:
        b = vals.pop("base")
        b = ARM_ALIASES.get(b, b)
        if b not in ARM_PRESETS:
            raise ValueError(f"arm spec {spec!r}: base={b!r} is not a preset {preset_names()}")
        base = dataclasses.replace(ARM_PRESETS[b], name=name)
    for k, v in vals.items():
        if k not in KNOBS:
            raise ValueError(f"arm spec {spec!r}: unknown knob {k!r} (knobs: {KNOBS} and base)")
        if k == "cycles":
            try:
                vals[k] = int(v)
            except ValueError:
                raise ValueError(f"arm spec {spec!r}: cycles must be an int, got {v!r}") from None
    arm = dataclasses.replace(base, **vals)
    check_arm(arm)
    return arm


def check_arm(arm: ArmConfig) -> None:
    """Every knob value is known and the combination can run (with the reason when it cannot)."""
    for k, choices in KNOB_CHOICES.items():
        if getattr(arm, k) not in choices:
            raise ValueError(f"arm {arm.name!r}: {k}={getattr(arm, k)!r} is not one of {choices}")
    if not isinstance(arm.cycles, int) or isinstance(arm.cycles, bool) or arm.cycles < 1:
        raise ValueError(f"arm {arm.name!r}: cycles must be an int >= 1, got {arm.cycles!r}")
    if arm.packing != "decompose" and (arm.curriculum != "natural" or arm.cycles != 1):
        raise ValueError(f"arm {arm.name!r}: curriculum={arm.curriculum}, cycles={arm.cycles} cannot run with "
                         f"packing={arm.packing}: a curriculum orders the length buckets of packing=decompose, and "
                         f"{arm.packing} has a single row length, so there is nothing to order (use "
                         "curriculum=natural,cycles=1, or packing=decompose)")


def resolve_arms(specs) -> tuple[ArmConfig, ...]:
    """Parse every spec of ``train.arms``; names must be unique."""
    arms = tuple(parse_arm(s) for s in specs)
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"train.arms: arm names must be unique, {dup} repeat")
    return arms


# ------------------------------------------------------------------------------------------ ablate
def ablation_arms(base: ArmConfig) -> list[tuple[str, ArmConfig, str]]:
    """(factor, arm, note) for the base arm and one arm per changed knob value (one factor at a time).

    Each knob moves to every other value (curriculum: to natural; cycles stays). Where the new value cannot
    run with the base's other knobs (packing away from decompose with a curriculum), the dependent knob
    takes its only valid value and the note says so.
    """
    out = [("base", base, "")]
    for k in KNOBS:
        if k == "cycles":
            continue
        alts = [v for v in KNOB_CHOICES[k] if v != getattr(base, k)]
        if k == "curriculum":
            alts = ["natural"] if base.curriculum != "natural" and base.packing == "decompose" else []
        for v in alts:
            arm = dataclasses.replace(base, name=f"{base.name}-{k}-{v}", **{k: v})
            note = ""
            if k == "packing" and v != "decompose" and (arm.curriculum != "natural" or arm.cycles != 1):
                arm = dataclasses.replace(arm, curriculum="natural", cycles=1)
                note = f"curriculum {base.curriculum} -> natural too ({v} has one row length)"
            check_arm(arm)
            out.append((k, arm, note))
    return out


def ablation_specs(base_spec: str) -> list[str]:
    """The arm specs of the ablation around ``base_spec`` (a preset or a spec); the base keeps its spelling."""
    base = parse_arm(base_spec)
    return [base_spec if arm is base else arm.spec() for _, arm, _ in ablation_arms(base)]


def ablation_meta(arms) -> dict:
    """{"base": name, "variants": [{"factor", "arm", "note"}]} for ``lengen-train ablate`` (the first arm is the
    base, the others its ablation_arms)."""
    base = arms[0]
    by_name = {arm.name: (k, note) for k, arm, note in ablation_arms(base)}
    return {"base": base.name, "variants": [{"factor": by_name.get(a.name, ("other", ""))[0], "arm": a.name,
                                             "note": by_name.get(a.name, ("", ""))[1]} for a in arms[1:]]}
