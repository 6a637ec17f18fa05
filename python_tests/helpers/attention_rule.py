"""flash-attn's tolerance rule for varlen attention outputs, shared by the CPU and Triton kernel tests.

truth = the reference in fp64, eager = the reference in the input dtype:
    max|kernel - truth| <= 2 * max|eager - truth| + atol, over the elements where truth is finite.
"""
from __future__ import annotations

import torch

from .tolerance import assert_rule

NAMES = ("out", "lse", "dq", "dk", "dv")
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_within_rule(got, truth, eager, atol_of, label: str) -> None:
    """got/truth/eager: (out, lse, dq, dk, dv). atol_of(truth_finite_values) -> atol. No NaN anywhere, and
    lse is +inf exactly where truth is (rows that see no key)."""
    for name, g_, t_, e_ in zip(NAMES, got, truth, eager):
        assert not torch.isnan(g_).any(), f"{name} has NaN"
        fin = torch.isfinite(t_)
        if name == "lse":
            assert torch.equal(torch.isinf(g_) & (g_ > 0), ~fin), "lse +inf pattern"
        if not fin.any():
            continue
        assert_rule(g_, t_, e_, atol_of(t_[fin]), f"{name}: {label}", mask=fin)
