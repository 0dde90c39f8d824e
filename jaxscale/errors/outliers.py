"""Outlier rejection by normalised deviation within symmetry groups (outliers.md).

All functions work on flat arrays of one "global" table: unscaled intensity I, weight w
(1/V or the error-model 1/V'), inverse scale g and integer group id; they return a boolean
outlier mask. Vectorised over groups with sorting and `np.bincount`; the only Python loop
is over rejection passes of the standard algorithm (few).
"""
from __future__ import annotations

import numpy as np


def _group_index(group_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compact group ids 0..n-1 and the number of groups."""
    uniq, inv = np.unique(group_id, return_inverse=True)
    return inv.astype(np.int64), uniq.size


def cap_weights(weight: np.ndarray, group_id: np.ndarray, factor: float = 10.0) -> np.ndarray:
    """Weights above `factor` x the group median weight are reduced to that value.

    Median = middle value, or the mean of the two middle values for even group sizes.
    """
    gid, n_groups = _group_index(group_id)
    order = np.lexsort((weight, gid))
    counts = np.bincount(gid, minlength=n_groups)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    w_sorted = weight[order]
    lo = starts + (counts - 1) // 2
    hi = starts + counts // 2
    median = 0.5 * (w_sorted[lo] + w_sorted[hi])
    return np.minimum(weight, factor * median[gid])


def _max_per_group(z: np.ndarray, gid: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the first maximum of z in each group (-1 for empty groups) and that maximum."""
    n = z.size
    order = np.lexsort((np.arange(n), -z, gid))  # by group, z descending, first occurrence
    g_sorted = gid[order]
    first = np.r_[True, g_sorted[1:] != g_sorted[:-1]] if n else np.zeros(0, bool)
    best = np.full(n_groups, -1, dtype=np.int64)
    best[g_sorted[first]] = order[first]
    zmax = np.full(n_groups, -np.inf)
    zmax[g_sorted[first]] = z[order[first]]
    return best, zmax


def standard_outliers(
    intensity: np.ndarray,
    weight: np.ndarray,
    g: np.ndarray,
    group_id: np.ndarray,
    zmax: float = 6.0,
) -> np.ndarray:
    """DIALS 'standard' rejection: iterative, at most one outlier per group per pass.

    z_i = |I_i - g_i I_(-i)| / sqrt(1/w_i + g_i^2 / sum_{j!=i} w_j g_j^2) with I_(-i) the
    weighted mean of the other members; groups with <= 2 active members are not tested.
    """
    intensity = np.asarray(intensity, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    w = cap_weights(np.asarray(weight, dtype=np.float64), group_id)
    gid, n_groups = _group_index(np.asarray(group_id))
    outlier = np.zeros(intensity.size, dtype=bool)
    active = np.ones(intensity.size, dtype=bool)
    while True:
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        gi, ii, wi, gg = gid[rows], intensity[rows], w[rows], g[rows]
        s1 = np.bincount(gi, wi * gg * ii, minlength=n_groups)
        s2 = np.bincount(gi, wi * gg * gg, minlength=n_groups)
        nh = np.bincount(gi, minlength=n_groups)
        num = s1[gi] - wi * gg * ii
        den = s2[gi] - wi * gg * gg
        ok = den > 0
        den_safe = np.where(ok, den, 1.0)
        z = np.where(
            ok,
            np.abs(ii - gg * num / den_safe) / np.sqrt(1.0 / wi + gg * gg / den_safe),
            1000.0,
        )
        z = np.where(nh[gi] > 2, z, 0.0)
        best, best_z = _max_per_group(z, gi, n_groups)
        flagged_groups = np.flatnonzero(best_z > zmax)
        if flagged_groups.size == 0:
            break
        new = rows[best[flagged_groups]]
        outlier[new] = True
        # next pass: remaining members of the flagged groups only
        keep_group = np.zeros(n_groups, dtype=bool)
        keep_group[flagged_groups] = True
        active = keep_group[gid] & ~outlier
    return outlier


def simple_outliers(
    intensity: np.ndarray,
    weight: np.ndarray,
    g: np.ndarray,
    group_id: np.ndarray,
    zmax: float = 6.0,
) -> np.ndarray:
    """DIALS 'simple' rejection: one pass against the full-group mean.

    z_i = |I_i - g_i I_h| / sqrt(1/w_i + (g_i / sum_h w g^2)^2) (the second term as DIALS
    writes it).
    """
    intensity = np.asarray(intensity, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    w = cap_weights(np.asarray(weight, dtype=np.float64), group_id)
    gid, n_groups = _group_index(np.asarray(group_id))
    s1 = np.bincount(gid, w * g * intensity, minlength=n_groups)
    s2 = np.bincount(gid, w * g * g, minlength=n_groups)
    zero = s2 == 0.0
    s2 = np.where(zero, 1.0, s2)
    z = np.abs(intensity - g * (s1 / s2)[gid]) / np.sqrt(1.0 / w + (g / s2[gid]) ** 2)
    return (z > zmax) | zero[gid]


def targeted_outliers(
    intensity: np.ndarray,
    variance: np.ndarray,
    g: np.ndarray,
    ih_reference: np.ndarray,
    variance_reference: np.ndarray,
    zmax: float = 6.0,
) -> np.ndarray:
    """Rejection against a fixed reference (per-observation I_ref, V_ref; NaN = absent):
    z = |I - g I_ref| / sqrt(V + g^2 V_ref); observations without a reference are kept."""
    present = np.isfinite(ih_reference)
    i_ref = np.where(present, ih_reference, 0.0)
    v_ref = np.where(present, variance_reference, 0.0)
    z = np.abs(intensity - g * i_ref) / np.sqrt(variance + g * g * v_ref)
    return present & (z > zmax)


def determine_outliers(
    intensity: np.ndarray,
    weight: np.ndarray,
    g: np.ndarray,
    group_id: np.ndarray,
    zmax: float = 6.0,
    method: str = "standard",
) -> np.ndarray:
    """Outlier mask by method name ('standard' or 'simple')."""
    if method == "standard":
        return standard_outliers(intensity, weight, g, group_id, zmax)
    if method == "simple":
        return simple_outliers(intensity, weight, g, group_id, zmax)
    raise ValueError(f"unknown outlier_rejection method {method!r}")


def normalised_intensity_outliers(
    intensity_scaled: np.ndarray,
    d_star_sq: np.ndarray,
    epsilon: np.ndarray,
    emax: float = 10.0,
) -> np.ndarray:
    """E^2 > emax^2 test (outliers.md §6) by quasi-normalisation in d*^2 shells.

    Shells equally spaced in d*^2 (10/15/20 by size); N(h) = mean of max(I,0)/eps per shell,
    interpolated linearly in d* between shell centres; E^2 = I / N(h).
    """
    i = np.asarray(intensity_scaled, dtype=np.float64)
    n = i.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    work = np.maximum(i, 0.0)
    n_bins = 20 if n > 20000 else 15 if n > 15000 else 10
    lo, hi = float(d_star_sq.min()), float(d_star_sq.max())
    span = hi - lo
    lo, hi = lo - span * 1e-6, hi + span * 1e-6
    step = (hi - lo) / n_bins
    if step <= 0:
        step = 1.0
    b = np.clip(((d_star_sq - lo) / step).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(b, minlength=n_bins)
    sums = np.bincount(b, work / epsilon, minlength=n_bins)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    edges = lo + step * np.arange(n_bins + 1)
    centres = 0.5 * (np.sqrt(np.maximum(edges[:-1], 0.0)) + np.sqrt(edges[1:]))
    norm = np.interp(np.sqrt(d_star_sq), centres, means)  # clamped at the ends
    with np.errstate(divide="ignore", invalid="ignore"):
        e2 = i / norm
    return np.nan_to_num(e2, nan=0.0, posinf=np.inf) > emax * emax
