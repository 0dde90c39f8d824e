"""Synthetic equivalents with a planted error model and planted outliers."""
from __future__ import annotations

import numpy as np


def make_grouped(n_groups=1500, a=1.4, b=0.04, seed=0, n_outliers=0, mult_range=(2, 8), g_per_group=False):
    """Return dict(intensity, variance, g, group_id, outlier) with true sigma'^2 = a^2(V + (bI)^2).

    g_per_group: one g per group (equal variances within a group, for exact expectations).
    """
    rng = np.random.default_rng(seed)
    mult = rng.integers(mult_range[0], mult_range[1], n_groups)
    gid = np.repeat(np.arange(n_groups), mult)
    n = gid.size
    ih = rng.lognormal(6.0, 1.5, n_groups)
    g = rng.uniform(0.5, 1.5, n_groups)[gid] if g_per_group else rng.uniform(0.5, 1.5, n)
    mean = g * ih[gid]
    variance = mean + 20.0  # "integration" variance
    true_var = a * a * (variance + (b * mean) ** 2)
    intensity = mean + rng.normal(size=n) * np.sqrt(true_var)
    outlier = np.zeros(n, bool)
    if n_outliers:
        big = np.flatnonzero(mult[gid] >= 4)
        # one planted outlier in distinct groups
        _, first = np.unique(gid[big], return_index=True)
        pick = rng.choice(big[first], n_outliers, replace=False)
        intensity[pick] += rng.choice([-1, 1], n_outliers) * 30.0 * np.sqrt(true_var[pick])
        outlier[pick] = True
    return dict(intensity=intensity, variance=variance, g=g, group_id=gid, outlier=outlier, true_var=true_var)
