"""Statistics of the experiment's seeds: sample std (ddof=1), Student-t 95% intervals and
paired differences between rows (same seed, same time split).

A paired difference removes what two rows of one seed share (the split, the seed's noise in
batch order and initialisation where the rows are built alike), so its interval is the honest
measure of "row A beats row B"; two overlapping per-row intervals say little either way.
"""
from __future__ import annotations

import math

import numpy as np


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with ``df`` degrees of freedom, by
    bisection on its CDF (Simpson's rule on the density; no SciPy in the serving image)."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float, steps: int = 2000) -> float:
        h = t / steps
        xs = np.linspace(0.0, t, steps + 1)
        ys = np.exp(log_c - (df + 1) / 2 * np.log1p(xs * xs / df))
        return 0.5 + h / 3 * (ys[0] + ys[-1] + 4 * ys[1:-1:2].sum() + 2 * ys[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def mean_interval(values, level: float = 0.95) -> dict:
    """{"mean", "std", "n", "ci": [lo, hi] or None (one value: no interval)} of ``values``."""
    arr = np.asarray(values, dtype=np.float64)
    mean, std = mean_std(arr)
    n = len(arr)
    if n < 2 or not np.isfinite(arr).all():
        return {"mean": mean, "std": std, "n": n, "ci": None}
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci": [mean - half, mean + half]}


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict:
    """A - B over the seeds both have ({seed: value}): mean, std, n, ci and the differences."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = mean_interval(diffs, level) if seeds else {"mean": None, "std": None, "n": 0, "ci": None}
    return {**out, "seeds": seeds, "diffs": diffs}
