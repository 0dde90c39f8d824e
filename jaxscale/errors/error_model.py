"""Basic two-parameter error model sigma'^2 = a^2 (sigma^2 + (b I)^2) (error_model.md).

Refined from the scatter of symmetry equivalents: "individual" alternates an a-step (slope
of the normal probability plot of the central |delta| < 1.5 normalised deviations) and a
b-step (bin variances of delta ~ 1 in log-intensity bins) until a changes by < 1 %;
"regression" fits s_obs^2/I^2 = a^2 sigma^2/I^2 + a^2 b^2 linearly. Inputs are flat arrays
of unscaled I, uncorrected variance V, inverse scale g and an anomalous group id.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

MIN_REFLECTIONS = 250
MIN_PARTIALITY = 0.4


# Wichura's AS241 (PPND16) rational approximations, as Python's statistics.NormalDist uses
_AS241_CENTRAL = (
    (2.5090809287301226727e+3, 3.3430575583588128105e+4, 6.7265770927008700853e+4, 4.5921953931549871457e+4,
     1.3731693765509461125e+4, 1.9715909503065514427e+3, 1.3314166789178437745e+2, 3.3871328727963666080e+0),
    (5.2264952788528545610e+3, 2.8729085735721942674e+4, 3.9307895800092710610e+4, 2.1213794301586595867e+4,
     5.3941960214247511077e+3, 6.8718700749205790830e+2, 4.2313330701600911252e+1, 1.0))
_AS241_INTERMEDIATE = (
    (7.74545014278341407640e-4, 2.27238449892691845833e-2, 2.41780725177450611770e-1, 1.27045825245236838258e+0,
     3.64784832476320460504e+0, 5.76949722146069140550e+0, 4.63033784615654529590e+0, 1.42343711074968357734e+0),
    (1.05075007164441684324e-9, 5.47593808499534494600e-4, 1.51986665636164571966e-2, 1.48103976427480074590e-1,
     6.89767334985100004550e-1, 1.67638483018380384940e+0, 2.05319162663775882187e+0, 1.0))
_AS241_TAIL = (
    (2.01033439929228813265e-7, 2.71155556874348757815e-5, 1.24266094738807843860e-3, 2.65321895265761230930e-2,
     2.96560571828504891230e-1, 1.78482653991729133580e+0, 5.46378491116411436990e+0, 6.65790464350110377720e+0),
    (2.04426310338993978564e-15, 1.42151175831644588870e-7, 1.84631831751005468180e-5, 7.86869131145613259100e-4,
     1.48753612908506148525e-2, 1.36929880922735805310e-1, 5.99832206555887937690e-1, 1.0))


def _horner(coefficients: tuple[float, ...], r: np.ndarray) -> np.ndarray:
    out = np.full_like(r, coefficients[0])
    for c in coefficients[1:]:  # 8 coefficients
        out = out * r + c
    return out


def normal_quantile(p: np.ndarray) -> np.ndarray:
    """Standard normal quantile Phi^-1(p) for p in (0, 1), f[n] -> f[n] (AS241, ~1e-16
    relative), vectorised; numpy only (no scipy import on the hot path of every run)."""
    p = np.asarray(p, dtype=np.float64)
    q = p - 0.5
    central = np.abs(q) <= 0.425
    r_c = 0.180625 - q * q
    x_c = q * _horner(_AS241_CENTRAL[0], r_c) / _horner(_AS241_CENTRAL[1], r_c)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(-np.log(np.where(q <= 0.0, p, 1.0 - p)))
        mid = r <= 5.0
        r_i, r_t = r - 1.6, r - 5.0
        x_t = np.where(mid, _horner(_AS241_INTERMEDIATE[0], r_i) / _horner(_AS241_INTERMEDIATE[1], r_i),
                       _horner(_AS241_TAIL[0], r_t) / _horner(_AS241_TAIL[1], r_t))
    return np.where(central, x_c, np.where(q < 0.0, -x_t, x_t))


def normal_cdf(x: float) -> float:
    """Standard normal CDF Phi(x) (scalar)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


class InsufficientReflections(ValueError):
    """Too few reflections survive the filters; the error model is left unchanged."""


@dataclasses.dataclass
class ErrorModelData:
    """Filtered reflections for error-model refinement (I_h from the unfiltered table)."""

    intensity: np.ndarray  # f[n]
    variance: np.ndarray  # f[n] uncorrected
    g: np.ndarray  # f[n]
    ih: np.ndarray  # f[n] group mean of the group each reflection belongs to
    n_h: np.ndarray  # f[n] multiplicity of the reflection's group in the filtered table
    group: np.ndarray  # i[n] compact group index


@dataclasses.dataclass
class ErrorModelResult:
    a: float
    b: float
    refined: bool
    n_reflections: int = 0
    message: str = ""
    bin_boundaries: np.ndarray | None = None  # f[n_bins + 1] in E = g I_h, descending
    bin_counts: np.ndarray | None = None  # i[n_bins]
    bin_variances_uncorrected: np.ndarray | None = None  # var(delta) with a=1, b=0
    bin_variances_corrected: np.ndarray | None = None  # var(delta) with the final a, b
    delta: np.ndarray | None = None  # normalised deviations with the final model (for plots)

    @property
    def isa(self) -> float:
        """Asymptotic I/sigma 1/(a b) (inf when b = 0)."""
        ab = abs(self.a * self.b)
        return 1.0 / ab if ab > 0 else float("inf")


def _compact(group_id: np.ndarray) -> np.ndarray:
    return np.unique(group_id, return_inverse=True)[1].astype(np.int64)


def filter_for_error_model(
    intensity: np.ndarray,
    variance: np.ndarray,
    g: np.ndarray,
    group_id: np.ndarray,
    partiality: np.ndarray | None = None,
    min_Ih: float = 25.0,
) -> ErrorModelData:
    """DIALS' filter_unsuitable_reflections (error_model.md §3), vectorised."""
    intensity, variance, g = (np.asarray(a, dtype=np.float64) for a in (intensity, variance, g))
    gid = _compact(np.asarray(group_id))
    # I_h over the full table, weights 1/V, current g; not recomputed after filtering
    w = 1.0 / variance
    num = np.bincount(gid, w * g * intensity)
    den = np.bincount(gid, w * g * g)
    ih_group = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    ih = ih_group[gid]
    keep = np.ones(intensity.size, dtype=bool)
    if partiality is not None:
        keep &= np.asarray(partiality) > MIN_PARTIALITY

    def counts(sel):
        return np.bincount(gid[sel], minlength=ih_group.size).astype(np.float64)

    n_h = counts(keep)
    i_over_v = np.bincount(gid[keep], (intensity / variance)[keep], minlength=ih_group.size)
    good_group = np.where(n_h > 0, i_over_v / np.maximum(n_h, 1), 0.0) > 0.85
    keep &= good_group[gid]
    n_h = counts(keep)
    keep &= (g * ih > min_Ih) & (n_h[gid] > 1.0) & (intensity > 0.001)
    if np.count_nonzero(keep) < MIN_REFLECTIONS:
        raise InsufficientReflections(
            f"Insufficient reflections ({np.count_nonzero(keep)} < {MIN_REFLECTIONS}) to perform error modelling."
        )
    n_h = counts(keep)
    keep &= n_h[gid] > 1.0
    n_h = counts(keep)
    sel = keep
    s2 = np.bincount(gid[sel], ((intensity / g - ih) ** 2)[sel], minlength=ih_group.size)
    group_var = s2 / np.maximum(n_h - 1.0, 1.0)
    avg_var = np.bincount(gid[sel], (variance / g**2)[sel], minlength=ih_group.size) / np.maximum(n_h, 1.0)
    mu_max = float(np.max(ih[sel]))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = group_var / avg_var
    keep &= (ratio < max(50.0, mu_max / 40.0))[gid]
    n = int(np.count_nonzero(keep))
    if n < MIN_REFLECTIONS:
        raise InsufficientReflections(f"Insufficient reflections ({n} < {MIN_REFLECTIONS}) to perform error modelling.")
    group = _compact(gid[keep])
    n_h_f = np.bincount(group).astype(np.float64)[group]
    return ErrorModelData(
        intensity=intensity[keep], variance=variance[keep], g=g[keep], ih=ih[keep], n_h=n_h_f, group=group
    )


def normalised_deviations(data: ErrorModelData, a: float, b: float) -> np.ndarray:
    """delta = sqrt((n_h-1)/n_h) (I/g - I_h) / sigma', sigma' = a sqrt(V + (bI)^2)/g."""
    sigmaprime = a * np.sqrt(data.variance + (b * data.intensity) ** 2) / data.g
    return np.sqrt((data.n_h - 1.0) / data.n_h) * (data.intensity / data.g - data.ih) / sigmaprime


@dataclasses.dataclass
class _Bins:
    index: np.ndarray  # i[n] bin of each reflection, -1 = unused
    counts: np.ndarray  # f[n_bins]
    weights: np.ndarray  # f[n_bins] mean E of the bin (objective weights)
    boundaries: np.ndarray  # f[n_bins + 1]


def intensity_bins(data: ErrorModelData, n_bins: int = 10, min_reflections: int = MIN_REFLECTIONS) -> _Bins:
    """Log-spaced bins in E = g I_h with DIALS' minimum-occupancy adjustments (§6)."""
    e = data.g * data.ih
    n = e.size
    order = np.argsort(-e, kind="stable")
    imax, emin = float(e.max()), float(e.min())
    imin = max(1.0, emin)
    spacing = (math.log(imax) - math.log(imin)) / n_bins
    bounds = [imax] + [math.exp(math.log(imax) - i * spacing) for i in range(1, n_bins + 1)]
    bounds[-1] = emin - 0.01
    if n > 100 * min_reflections:
        min_reflections = int(n / 100.0)
    min_per_bin = min(min_reflections, int(n / (3.0 * n_bins)))
    index = np.full(n, -1, dtype=np.int64)
    counts = []
    n_cumul = 0
    for i in range(n_bins):  # loop over bins (10), vectorised within
        upper = e <= bounds[i]
        sel = upper & (e > bounds[i + 1])
        n_in = int(np.count_nonzero(sel))
        if n_in < min_per_bin:
            m = n_cumul + min_per_bin
            if m < n:
                bounds[i + 1] = float(e[order[m]])
                sel = upper & (e > bounds[i + 1])
                n_in = int(np.count_nonzero(sel))
        index[sel] = i
        counts.append(n_in)
        n_cumul += n_in
    counts = np.asarray(counts, dtype=np.float64)
    bounds = np.asarray(bounds)
    keep = counts >= min_per_bin - 5
    if keep.all():
        new_bounds = bounds
    else:
        new_bounds = np.r_[bounds[:-1][keep], bounds[-1]]
        remap = np.full(n_bins, -1, dtype=np.int64)
        remap[keep] = np.arange(int(keep.sum()))
        index = np.where(index >= 0, remap[np.maximum(index, 0)], -1)
        counts = counts[keep]
    # bin weights: mean E between consecutive (new) boundaries, as DIALS
    weights = np.array(
        [np.mean(e[(e <= new_bounds[k]) & (e > new_bounds[k + 1])]) for k in range(new_bounds.size - 1)]
    )
    return _Bins(index=index, counts=counts, weights=weights, boundaries=new_bounds)


def bin_variances(delta: np.ndarray, bins: _Bins) -> np.ndarray:
    """Population variance of delta per bin."""
    sel = bins.index >= 0
    nb = bins.counts.size
    s1 = np.bincount(bins.index[sel], delta[sel], minlength=nb)
    s2 = np.bincount(bins.index[sel], delta[sel] ** 2, minlength=nb)
    return s2 / bins.counts - (s1 / bins.counts) ** 2


def _a_step(data: ErrorModelData, a: float, b: float) -> float:
    """Slope of sorted central deltas against expected normal order statistics; a <- a c1."""
    delta = np.sort(normalised_deviations(data, a, b))
    n = delta.size
    v1, v2 = normal_cdf(-1.5), normal_cdf(1.5)
    k_lo, k_hi = math.ceil(v1 * n - 0.5), math.ceil(v2 * n - 0.5)
    y = delta[k_lo:k_hi]
    x = normal_quantile(np.linspace((k_lo + 0.5) / n, (k_hi + 0.5) / n, k_hi - k_lo, endpoint=False))
    design = np.stack([np.ones_like(x), x], axis=1)
    (_, c1), *_ = np.linalg.lstsq(design, y, rcond=None)
    return a * float(c1)


class _BObjective:
    """The b-step objective for many b at once, over the binned reflections only.

    delta = num / (a sqrt(V + b^2 I^2)) with num = sqrt((n_h-1)/n_h) (I/g - I_h) g fixed, so
    per bin sum(delta) = sum(num / sqrt(t)) / a and sum(delta^2) = sum(num^2 / t) / a^2 with
    t = V + b^2 I^2: five array operations and two contiguous segment sums per b (rows
    sorted by bin once). Equals `_b_objective` to rounding (~1e-15 relative); several b
    share one pass (rows of a 2-D array, in chunks).
    """

    CHUNK_ELEMENTS = 2_000_000  # f64 elements per temporary (16 MB)

    def __init__(self, data: ErrorModelData, bins: _Bins):
        rows = np.flatnonzero(bins.index >= 0)
        rows = rows[np.argsort(bins.index[rows], kind="stable")]  # bins contiguous
        n_in = np.bincount(bins.index[rows], minlength=bins.counts.size)
        # first row of each bin (clipped: reduceat needs in-range indices; empty bins are zeroed)
        self.starts = np.minimum(np.concatenate([[0], np.cumsum(n_in)[:-1]]), max(rows.size - 1, 0)).astype(np.intp)
        self.empty = n_in == 0
        self.any_empty = bool(self.empty.any())
        self.counts, self.weights = bins.counts, bins.weights
        self.weight_sum = np.sum(self.weights)
        scaled_dev = np.sqrt((data.n_h - 1.0) / data.n_h) * (data.intensity / data.g - data.ih)
        self.num = (scaled_dev * data.g)[rows]  # f[m]
        self.num_sq = self.num**2
        self.variance = data.variance[rows]
        self.intensity_sq = data.intensity[rows] ** 2
        self._work: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # rows -> two f[rows, m] buffers

    def _segment_sums(self, x: np.ndarray) -> np.ndarray:
        """Per-bin sums along the last axis f[k, m] -> f[k, n_bins] (0 for empty bins)."""
        out = np.add.reduceat(x, self.starts, axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1] + self.starts.shape)
        if self.any_empty:
            out[..., self.empty] = 0.0
        return out

    def __call__(self, a: float, b_values: np.ndarray) -> np.ndarray:
        """f[k] objective at each b of b_values f[k] (fixed a)."""
        b_sq = np.atleast_1d(np.asarray(b_values, dtype=np.float64)) ** 2
        m = self.num.size
        rows = max(1, min(b_sq.size, self.CHUNK_ELEMENTS // max(m, 1)))
        if rows not in self._work:  # reused in place: no page faults for fresh temporaries
            self._work[rows] = (np.empty((rows, m)), np.empty((rows, m)))
        out = np.empty(b_sq.size)
        for lo in range(0, b_sq.size, rows):  # chunks of b values (one for a single b)
            k_rows = min(rows, b_sq.size - lo)
            t, u = self._work[rows][0][:k_rows], self._work[rows][1][:k_rows]
            np.multiply(b_sq[lo:lo + k_rows, None], self.intensity_sq, out=t)
            np.add(self.variance, t, out=t)  # t = V + b^2 I^2
            np.sqrt(t, out=u)
            np.divide(self.num, u, out=u)
            s1 = self._segment_sums(u) / a
            np.divide(self.num_sq, t, out=t)
            s2 = self._segment_sums(t) / (a * a)
            v = s2 / self.counts - (s1 / self.counts) ** 2  # f[k, n_bins]
            # np.add.reduce: np.sum without its wrapper (called ~400 times per refinement)
            out[lo:lo + k_rows] = (np.add.reduce(((0.5 - v) ** 2 + 1.0 / v - 1.25) * self.weights, axis=1)
                                   / self.weight_sum)
        return out


def _b_objective(data: ErrorModelData, bins: _Bins, a: float, b: float) -> float:
    v = bin_variances(normalised_deviations(data, a, b), bins)
    return float(np.sum(((0.5 - v) ** 2 + 1.0 / v - 1.25) * bins.weights) / np.sum(bins.weights))


def _b_step(data: ErrorModelData, bins: _Bins, a: float, b: float, objective: _BObjective | None = None) -> float:
    """Minimise the bin-variance objective over |b| (local search from the current b)."""
    b = abs(b)
    objective = _BObjective(data, bins) if objective is None else objective
    f = lambda bb: float(objective(a, np.array([bb]))[0])  # noqa: E731
    # coarse bracket on a grid around the start, then golden-section refinement
    hi = max(4.0 * b, 0.2)
    grid = np.linspace(0.0, hi, 81)
    values = objective(a, grid)  # 81 objective evaluations in a few vectorised passes
    k = int(np.nanargmin(values))
    lo_b, hi_b = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi_b - phi * (hi_b - lo_b), lo_b + phi * (hi_b - lo_b)
    fc, fd = f(c), f(d)
    for _ in range(60):
        if fc < fd:
            hi_b, d, fd = d, c, fc
            c = hi_b - phi * (hi_b - lo_b)
            fc = f(c)
        else:
            lo_b, c, fc = c, d, fd
            d = lo_b + phi * (hi_b - lo_b)
            fd = f(d)
    best = 0.5 * (lo_b + hi_b)
    return best if f(best) <= values[k] else float(grid[k])


def refine_error_model(
    intensity: np.ndarray,
    variance: np.ndarray,
    g: np.ndarray,
    group_id: np.ndarray,
    partiality: np.ndarray | None = None,
    a: float = 1.0,
    b: float = 0.02,
    refine_a: bool = True,
    refine_b: bool = True,
    minimisation: str | None = "individual",
    min_Ih: float = 25.0,
    n_bins: int = 10,
) -> ErrorModelResult:
    """Refine (a, b) from the current scales; returns the starting values with
    refined=False and a message if there are too few reflections."""
    try:
        data = filter_for_error_model(intensity, variance, g, group_id, partiality, min_Ih)
    except InsufficientReflections as exc:
        return ErrorModelResult(a=a, b=abs(b), refined=False, message=str(exc))
    bins = intensity_bins(data, n_bins)
    uncorrected = bin_variances(normalised_deviations(data, 1.0, 0.0), bins)
    message = ""
    if minimisation == "individual" and (refine_a or refine_b):
        a, b, message = _individual(data, bins, a, abs(b), refine_a, refine_b)
    elif minimisation == "regression" and (refine_a or refine_b):
        a, b = _regression(data, a, abs(b), refine_a, refine_b)
    delta = normalised_deviations(data, a, b)
    return ErrorModelResult(
        a=float(a),
        b=float(abs(b)),
        refined=bool(minimisation) and (refine_a or refine_b),
        n_reflections=int(data.intensity.size),
        message=message,
        bin_boundaries=bins.boundaries,
        bin_counts=bins.counts.astype(np.int64),
        bin_variances_uncorrected=uncorrected,
        bin_variances_corrected=bin_variances(delta, bins),
        delta=delta,
    )


def _individual(data, bins, a, b, refine_a, refine_b) -> tuple[float, float, str]:
    objective = _BObjective(data, bins) if refine_b else None
    if refine_a and refine_b:
        a_values = []
        converged = False
        for _ in range(20):  # cycles of the alternating fit (usually ~5)
            a = _a_step(data, a, b)
            a_values.append(a)
            b = _b_step(data, bins, a, b, objective)
            if len(a_values) > 1:
                r2, r1 = a_values[-2], a_values[-1]
                if r2 <= 0 or abs((r2 - r1) / r2) < 0.01:
                    converged = True
                    break
        if converged and a > 0.4:
            return _a_step(data, a, b), b, ""
        a, b = 1.0, 0.02
        return a, _b_step(data, bins, a, b, objective), "Two-parameter error model refinement failed; refined b with fixed a=1.0"
    if refine_a:
        return _a_step(data, a, b), b, ""
    return a, _b_step(data, bins, a, b, objective), ""


def _regression(data: ErrorModelData, a: float, b: float, refine_a: bool, refine_b: bool) -> tuple[float, float]:
    """Linear fit y = a^2 x + a^2 b^2 with y = s_obs^2/I^2, x = V/I^2 (§7)."""
    resid2 = (data.intensity - data.g * data.ih) ** 2 / (data.n_h - 1.0)
    s_obs = np.bincount(data.group, resid2)[data.group]
    isq = data.intensity**2
    y, x = s_obs / isq, data.variance / isq
    if refine_a and refine_b:
        design = np.stack([x, np.ones_like(x)], axis=1)
        (slope, intercept), *_ = np.linalg.lstsq(design, y, rcond=None)
        if not slope > 0 or not intercept > 0:
            raise ValueError("Error model regression gave a negative a^2 or b^2")
        a_new = math.sqrt(slope)
        return a_new, math.sqrt(intercept) / a_new
    if refine_a:
        a2 = float(np.sum(y * (x + b * b)) / np.sum((x + b * b) ** 2))
        if not a2 > 0:
            raise ValueError("Error model refinement resulted in a negative value for a^2")
        return math.sqrt(a2), b
    b2 = float(np.mean(y - a * a * x)) / (a * a)
    if not b2 > 0:
        raise ValueError("Error model refinement resulted in a negative value for b^2")
    return a, math.sqrt(b2)


def apply_error_model(variance: np.ndarray, intensity: np.ndarray, a: float, b: float) -> np.ndarray:
    """V' = a^2 (V + (b I)^2)."""
    return a * a * (np.asarray(variance) + (b * np.asarray(intensity)) ** 2)
