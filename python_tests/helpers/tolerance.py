"""flash-attn's tolerance rule, written once for every op's tests.

truth = the reference in fp64, eager = the reference in the input dtype:
    max|kernel - truth| <= 2 * max|eager - truth| + atol, over the elements where truth is finite.
"""
from __future__ import annotations

import torch


def rule_error(got: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor, atol: float,
               mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(err, bound) of flash-attn's rule over ``mask`` (default: where truth is finite)."""
    fin = torch.isfinite(truth) if mask is None else mask
    if not fin.any():
        return 0.0, atol
    err = (got.double() - truth)[fin].abs().max().item()
    err_eager = (eager.double() - truth)[fin].abs().max().item()
    return err, 2 * err_eager + atol


def assert_rule(got, truth, eager, atol: float, label: str = "", mask=None) -> None:
    err, bound = rule_error(got, truth, eager, atol, mask)
    assert err <= bound, f"{label}: kernel error {err:.3g} > 2 * eager error + atol = {bound:.3g}"
