"""How sure are we? Intervals over seeds (or documents), paired differences, verdicts and their power.

Every comparison here is paired: arm a and arm b trained with the same seed see the same data, initial weights
and evaluation sets, so the unit of evidence is the per-seed difference a - b. Its 95% Student-t interval gives
the verdict, and its minimum detectable effect (MDE) says how large a true difference this many seeds could have
found: a verdict of "inconclusive" with an MDE of 0.4 says something different from one with an MDE of 0.02.

No scipy: the two t quantiles needed (two-sided 95% and one-sided 80%) are tabulated for 1..30 degrees of freedom
(checked in the tests against a numeric integration of the t density) and fall back to the normal beyond.
"""
from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05           # two-sided level of every interval and verdict
POWER = 0.80           # the power an MDE is stated at
MIN_N = 2              # an interval needs a sample standard deviation

# t quantiles by degrees of freedom 1..30: two-sided 95% (t_0.975) and one-sided 80% (t_0.80)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
        0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854)
_Z = {0.975: 1.95996, 0.80: 0.84162}


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile for p in {0.975, 0.80} (the tabulated ones); the normal's beyond 30 df."""
    table = {0.975: _T975, 0.80: _T80}.get(p)
    if table is None:
        raise ValueError(f"t_quantile: p={p} is not tabulated (0.975 or 0.80)")
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    return table[df - 1] if df <= len(table) else _Z[p]


def _clean(xs) -> np.ndarray:
    return np.asarray([float(x) for x in xs if x is not None and not math.isnan(float(x))], dtype=np.float64)


def interval(xs) -> dict:
    """{"mean", "lo", "hi", "n", "sd", "mde"}: the mean with its 95% t-interval (sample sd, n - 1 df) and the
    MDE of a one-sample test of the mean; NaN bounds (and MDE) with fewer than 2 values."""
    x = _clean(xs)
    n = int(x.size)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "sd": math.nan, "mde": math.nan}
    m = float(x.mean())
    if n < MIN_N:
        return {"mean": m, "lo": math.nan, "hi": math.nan, "n": n, "sd": math.nan, "mde": math.nan}
    sd = float(x.std(ddof=1))
    h = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return {"mean": m, "lo": m - h, "hi": m + h, "n": n, "sd": sd, "mde": mde(sd, n)}


def mde(sd: float, n: int) -> float:
    """Minimum detectable effect of a paired (one-sample) two-sided t-test at level ALPHA with power POWER:
    (t_{1-alpha/2} + t_{power}) * sd / sqrt(n), both with n - 1 df (the usual approximation of the noncentral t).
    sd is the observed sd of the per-seed differences. inf with fewer than 2 values; 0 when sd is 0."""
    if n < MIN_N or math.isnan(sd):
        return math.inf
    return (t_quantile(0.975, n - 1) + t_quantile(0.80, n - 1)) * sd / math.sqrt(n)


def seeds_for_mde(sd: float, target: float, n_max: int = 1000) -> int | None:
    """The smallest n whose MDE at this sd is <= target (None when none up to n_max): how many seeds a
    comparison needs, from the spread seen so far."""
    if target <= 0 or math.isnan(sd):
        return None
    for n in range(MIN_N, n_max + 1):
        if mde(sd, n) <= target:
            return n
    return None


def paired(a, b) -> dict:
    """interval() of the per-unit differences a - b; units where either side is missing are dropped."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}")
    return interval([x - y for x, y in zip(a, b) if x is not None and y is not None
                     and not math.isnan(float(x)) and not math.isnan(float(y))])


def verdict(ci: dict, better: str = "higher") -> str:
    """"holds" when the 95% interval of the difference excludes zero on the ``better`` side ("higher" or
    "lower"), "opposite" when it excludes zero on the other side, else "inconclusive" (an interval that contains
    zero, or too few values for an interval)."""
    if better not in ("higher", "lower"):
        raise ValueError(f"verdict: better must be 'higher' or 'lower', got {better!r}")
    if ci["n"] < MIN_N or math.isnan(ci["lo"]):
        return "inconclusive"
    up, down = ci["lo"] > 0, ci["hi"] < 0
    if (up and better == "higher") or (down and better == "lower"):
        return "holds"
    if up or down:
        return "opposite"
    return "inconclusive"


def compare(a, b, better: str = "higher") -> dict:
    """A paired comparison a - b: the interval, its MDE and the verdict in one dict."""
    ci = paired(a, b)
    return ci | {"verdict": verdict(ci, better), "better": better}


def fmt_ci(ci: dict, digits: int = 2, signed: bool = False) -> str:
    """"0.42 [0.31, 0.53]"; "n/a" without values; "(n=1, no interval)" with one."""
    if ci["n"] == 0:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if math.isnan(ci["lo"]):
        return f.format(ci["mean"]) + f" (n={ci['n']}, no interval)"
    return f.format(ci["mean"]) + f" [{f.format(ci['lo'])}, {f.format(ci['hi'])}]"


def fmt_mde(ci: dict, digits: int = 2) -> str:
    m = ci.get("mde", math.inf)
    return "n/a (n<2)" if m is None or math.isinf(m) or math.isnan(m) else f"{m:.{digits}f}"
