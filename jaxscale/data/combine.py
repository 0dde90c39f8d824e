"""Profile/summation intensity combination (spec overview.md §6; DIALS combine_intensities.py).

Imid codes: 0 = profile only, 1 = summation only, any other value = the blend
`w = 1/(1 + (I_sum/Imid)^3)` (w = 1 where I_sum <= 0), I = w I_prf + (1-w) I_sum,
V = w V_prf + (1-w) V_sum (linear, as DIALS), on raw values with I_sum, V_sum divided by
p, p^2. The candidate with the lowest Rmeas of the scaled, merged test set wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import gemmi
import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.prepare import inverse_partiality
from jaxscale.data.symmetry import group_ids, map_to_asu
from jaxscale.data.table import ReflectionTable

PROFILE = 0.0
SUMMATION = 1.0


@dataclass
class ImidChoice:
    imid: float  # chosen code/value (0 profile, 1 summation, else the blend midpoint)
    imids: list[float]  # candidates in DIALS' order
    rmeas: list[float]  # per candidate; -1 where no data
    cc_half: list[float]  # per candidate, random half-dataset CC1/2 (display only)
    n_test: int  # rows in the test set

    def label(self, imid: float) -> str:
        return {PROFILE: "prf only", SUMMATION: "sum only"}.get(imid, f"Imid = {round(imid, 2)}")


def combination_test_mask(
    table: ReflectionTable, inverse_scale: np.ndarray | None = None, outlier: np.ndarray | None = None
) -> np.ndarray:
    """Rows (n,) used to test candidates: integrated by both methods, not bad_for_scaling,
    not outliers, both variances > 0, g > 0, partiality > 0."""
    g = table["inverse_scale_factor"] if inverse_scale is None else inverse_scale
    flags = table["flags"]
    good = F.has_all(flags, F.INTEGRATED) & ~F.has_any(flags, F.BAD_FOR_SCALING)
    good &= (np.asarray(table["intensity.prf.variance"]) > 0) & (np.asarray(table["intensity.sum.variance"]) > 0)
    good &= np.asarray(g) > 0
    if "partiality" in table:
        good &= np.asarray(table["partiality"]) > 0
    if outlier is not None:
        good &= ~np.asarray(outlier, dtype=bool)
    return good


def candidate_imids(raw_sum: np.ndarray) -> list[float]:
    """[0, 1, avg, Imid_0, Imid_0/10, ...] down to the first value <= avg (DIALS' list)."""
    avg = max(10.0, float(np.mean(raw_sum)))
    imid = float(np.max(raw_sum)) / 10.0
    out = [PROFILE, SUMMATION, avg, imid]
    while imid > avg:
        imid /= 10.0
        out.append(imid)
    return out


def blend(
    i_prf: np.ndarray, i_sum: np.ndarray, v_prf: np.ndarray, v_sum: np.ndarray, imid: float
) -> tuple[np.ndarray, np.ndarray]:
    """Blended raw (I, V) (n,) for one Imid; i_sum, v_sum already partiality-corrected."""
    w = 1.0 / (1.0 + (i_sum / imid) ** 3)
    w = np.where(i_sum <= 0, 1.0, w)
    return w * i_prf + (1.0 - w) * i_sum, w * v_prf + (1.0 - w) * v_sum


def raw_for_imid(table: ReflectionTable, imid: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw (I, V) (n,) of every row for an Imid code or value (before conv and g)."""
    i_prf, v_prf = np.asarray(table["intensity.prf.value"]), np.asarray(table["intensity.prf.variance"])
    i_sum = np.asarray(table["intensity.sum.value"], dtype=np.float64)
    v_sum = np.asarray(table["intensity.sum.variance"], dtype=np.float64)
    if "partiality" in table:
        p = np.asarray(table["partiality"], dtype=np.float64)
        i_sum, v_sum = i_sum / p, v_sum / (p * p)
    if imid == PROFILE:
        return i_prf, v_prf
    if imid == SUMMATION:
        return i_sum, v_sum
    return blend(i_prf, i_sum, v_prf, v_sum, imid)


def rmeas(intensity: np.ndarray, sigma: np.ndarray, group_id: np.ndarray) -> float:
    """Rmeas of observations (n,) after keeping sigma > 0 and I/sigma > 1; -1 if none left.

    Merged value = inverse-variance weighted mean per group; Rmeas = sum over groups with
    n > 1 of sqrt(n/(n-1)) sum|I - <I>|, over the signed sum of their I (cctbx).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (sigma > 0) & (intensity / sigma > 1.0)
    if not keep.any():
        return -1.0
    i, s = intensity[keep], sigma[keep]
    _, g = np.unique(group_id[keep], return_inverse=True)
    g = g.reshape(-1)
    w = 1.0 / (s * s)
    n = np.bincount(g)
    mean = np.bincount(g, w * i) / np.bincount(g, w)
    dev = np.bincount(g, np.abs(i - mean[g]))
    multi = n > 1
    den = np.bincount(g, i)[multi].sum()
    if den == 0:
        return 0.0
    return float((np.sqrt(n[multi] / (n[multi] - 1.0)) * dev[multi]).sum() / den)


def cc_half_random(intensity: np.ndarray, sigma: np.ndarray, group_id: np.ndarray, seed: int = 0) -> float:
    """Random half-dataset CC1/2 of sigma-weighted half means (display only; the split is
    numpy-random, not cctbx's, so the value differs from DIALS' in the last digits)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (sigma > 0) & (intensity / sigma > 1.0)
    i, s = intensity[keep], sigma[keep]
    _, g = np.unique(group_id[keep], return_inverse=True)
    g = g.reshape(-1)
    rng = np.random.default_rng(seed)
    n = np.bincount(g)
    order = np.lexsort((rng.random(g.size), g))
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    rank = np.empty(g.size, dtype=np.int64)
    rank[order] = np.arange(g.size) - start[g[order]]
    n_first = n // 2 + ((n % 2 == 1) & (rng.random(n.size) < 0.5))
    first = rank < n_first[g]
    w = 1.0 / (s * s)
    use = n >= 2
    with np.errstate(divide="ignore", invalid="ignore"):  # singly observed groups are unused
        m1 = np.bincount(g, w * i * first, minlength=n.size) / np.bincount(g, w * first, minlength=n.size)
        m2 = np.bincount(g, w * i * ~first, minlength=n.size) / np.bincount(g, w * ~first, minlength=n.size)
    if use.sum() < 2:
        return 0.0
    return float(np.corrcoef(m1[use], m2[use])[0, 1])


def choose_imid(
    tables: Sequence[ReflectionTable],
    space_group: gemmi.SpaceGroup,
    inverse_scales: Sequence[np.ndarray] | None = None,
    outliers: Sequence[np.ndarray | None] | None = None,
    imids: Sequence[float] | None = None,
) -> ImidChoice:
    """Choose the Imid with the lowest Rmeas over all datasets jointly (one table = one dataset).

    Each table needs intensity.prf/sum columns, flags, `prescaling_correction` and (unless
    `inverse_scales` is given) `inverse_scale_factor`. `outliers[k]` (n_k,) marks current
    outliers. Scaled data I conv / g, sigma sqrt(V) conv / g are merged non-anomalously
    with `space_group`. Datasets without profile values should not be passed (DIALS uses
    summation for them).
    """
    tests = []
    for k, t in enumerate(tables):
        g = np.asarray(t["inverse_scale_factor"] if inverse_scales is None else inverse_scales[k], dtype=np.float64)
        rows = combination_test_mask(t, g, None if outliers is None else outliers[k])
        tests.append((t.select(rows), g[rows]))
    hkl = np.concatenate([t["miller_index"] for t, _ in tests])
    asu, _ = map_to_asu(hkl, space_group, anomalous=False)
    gid, _ = group_ids(asu)
    raw_sum = np.concatenate(
        [np.asarray(t["intensity.sum.value"]) / (t["partiality"] if "partiality" in t else 1.0) for t, _ in tests]
    )
    candidates = list(imids) if imids else candidate_imids(raw_sum)
    conv = np.concatenate([np.asarray(t["prescaling_correction"]) for t, _ in tests])
    g = np.concatenate([g for _, g in tests])
    r_list, cc_list = [], []
    for imid in candidates:  # a handful of candidates
        parts = [raw_for_imid(t, imid) for t, _ in tests]
        i = np.concatenate([p[0] for p in parts]) * conv / g
        s = np.sqrt(np.concatenate([p[1] for p in parts])) * conv / g
        r_list.append(rmeas(i, s, gid))
        cc_list.append(cc_half_random(i, s, gid))
    valid = [k for k, r in enumerate(r_list) if r >= 0]
    best = PROFILE if not valid else candidates[min(valid, key=lambda k: r_list[k])]
    return ImidChoice(best, candidates, r_list, cc_list, int(gid.size))


def apply_imid(table: ReflectionTable, imid: float) -> tuple[np.ndarray, np.ndarray]:
    """Scaling intensities (I, V) (n,) for a chosen Imid, with conv (and 1/p for sums).

    Imid = 1: summation (profile where not integrated_sum); otherwise profile (summation
    where not integrated_prf) and, for Imid != 0, the blend where integrated by both.
    """
    conv = np.asarray(table["prescaling_correction"], dtype=np.float64)
    flags = table["flags"]
    i_sum = np.asarray(table["intensity.sum.value"], dtype=np.float64)
    v_sum = np.asarray(table["intensity.sum.variance"], dtype=np.float64)
    inv_p = inverse_partiality(table)
    sum_conv = conv * inv_p if "partiality" in table else conv
    has_prf = "intensity.prf.value" in table
    if imid == SUMMATION or not has_prf:
        intensity, variance = i_sum * sum_conv, v_sum * sum_conv * sum_conv
        if has_prf:
            not_sum = ~F.has_all(flags, F.INTEGRATED_SUM)
            intensity = np.where(not_sum, np.asarray(table["intensity.prf.value"]) * conv, intensity)
            variance = np.where(not_sum, np.asarray(table["intensity.prf.variance"]) * conv * conv, variance)
        return intensity, variance
    i_prf = np.asarray(table["intensity.prf.value"], dtype=np.float64)
    v_prf = np.asarray(table["intensity.prf.variance"], dtype=np.float64)
    not_prf = ~F.has_all(flags, F.INTEGRATED_PRF)
    intensity = np.where(not_prf, i_sum * sum_conv, i_prf * conv)
    variance = np.where(not_prf, v_sum * sum_conv * sum_conv, v_prf * conv * conv)
    if imid != PROFILE:
        both = F.has_all(flags, F.INTEGRATED)
        i_c, v_c = blend(i_prf, i_sum * inv_p, v_prf, v_sum * inv_p * inv_p, imid)
        intensity = np.where(both, i_c * conv, intensity)
        variance = np.where(both, v_c * conv * conv, variance)
    return intensity, variance
