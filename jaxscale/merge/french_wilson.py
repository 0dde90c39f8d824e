"""French–Wilson (1978) amplitudes from merged intensities, by direct quadrature.

Model: Wilson prior on the true intensity J ≥ 0 with expected intensity Σ,
acentric p(J) = exp(−J/Σ)/Σ, centric p(J) ∝ J^(−1/2) exp(−J/(2Σ)); Gaussian likelihood
N(I; J, σ²). The posterior is then ∝ exp(−(J − hσ)²/(2σ²)) (acentric, h = I/σ − σ/Σ) or
∝ J^(−1/2) exp(−(J − hσ)²/(2σ²)) (centric, h = I/σ − σ/(2Σ)). With J = σ x² both become
∝ x^a exp(−(x² − h)²/2) dx (a = 1 acentric, 0 centric), whose moments E[x], E[x²], E[x⁴]
are computed by Gauss–Legendre quadrature over x ∈ [sqrt(max(0, h − 10)), sqrt(h + 10)]
(±10 posterior widths), vectorised over reflections. F = √σ E[x], σF = √σ sd(x),
J = σ E[x²], σJ = σ sd(x²).

Σ as in DIALS 3.12's own French–Wilson: reflections sorted by d*³ in counting bins
(≥ 20 per bin, ≤ 60 bins); per bin median(I)/ln 2 (a robust mean of an exponential);
linear interpolation between bin centres in d*³, constant beyond. Rejected (F = NaN), as
DIALS rejects them: σ ≤ 0, Σ = 0, I/σ < −3.7 or h < −4.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@functools.cache
def _gauss_legendre() -> tuple[np.ndarray, np.ndarray]:
    """96-point Gauss-Legendre nodes and weights on [−1, 1] (numpy.polynomial is imported
    on first use: ~10 ms that runs without MTZ output need not pay)."""
    return np.polynomial.legendre.leggauss(96)


@dataclass(frozen=True)
class FrenchWilson:
    F: np.ndarray        # (n,) posterior mean amplitude; NaN where rejected
    sigF: np.ndarray     # (n,)
    J: np.ndarray        # (n,) posterior mean intensity
    sigJ: np.ndarray     # (n,)
    valid: np.ndarray    # (n,) bool


def expected_intensity(d_star_cubed: np.ndarray, intensity: np.ndarray, max_bins: int = 60,
                       min_bin_size: int = 20) -> np.ndarray:
    """Wilson Σ(d*³) (n,): per-bin median(I)/ln2 on counting bins, interpolated."""
    n = d_star_cubed.shape[0]
    per_bin = max(n // max_bins, min_bin_size)
    n_bins = max(n // per_bin, 1)
    edges = np.interp(np.linspace(0, n, n_bins + 1), np.arange(n), np.sort(d_star_cubed))
    b = np.clip(np.searchsorted(edges, d_star_cubed, side="right") - 1, 0, n_bins - 1)
    order = np.lexsort((intensity, b))                       # intensities sorted within bins
    counts = np.bincount(b, minlength=n_bins)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_i = intensity[order]
    lo = starts + (counts - 1) // 2
    hi = starts + counts // 2
    filled = counts > 0
    median = np.where(filled, 0.5 * (sorted_i[np.minimum(lo, n - 1)] + sorted_i[np.minimum(hi, n - 1)]), np.nan)
    centres = 0.5 * (edges[:-1] + edges[1:])
    means = median / np.log(2)
    return np.interp(d_star_cubed, centres[filled], means[filled])


def _moments(h: np.ndarray, a: np.ndarray, chunk: int = 1 << 15):
    """E[x], E[x²], E[x⁴] (n,) under ∝ x^a exp(−(x² − h)²/2), x ≥ 0."""
    out = np.empty((3, h.shape[0]))
    nodes, weights = _gauss_legendre()
    for s in range(0, h.shape[0], chunk):                     # row blocks bound memory
        hh, aa = h[s:s + chunk, None], a[s:s + chunk, None]
        lo, hi = np.sqrt(np.maximum(hh - 10.0, 0.0)), np.sqrt(hh + 10.0)
        x = 0.5 * (hi - lo) * nodes[None, :] + 0.5 * (hi + lo)          # (m, nodes)
        logw = aa * np.log(np.maximum(x, 1e-300)) - 0.5 * (x * x - hh) ** 2
        w = weights[None, :] * np.exp(logw - logw.max(axis=1, keepdims=True))
        z = w.sum(axis=1)
        x2 = x * x
        out[0, s:s + chunk] = (w * x).sum(axis=1) / z
        out[1, s:s + chunk] = (w * x2).sum(axis=1) / z
        out[2, s:s + chunk] = (w * x2 * x2).sum(axis=1) / z
    return out


def french_wilson(intensity: np.ndarray, sigma: np.ndarray, d_star_sq: np.ndarray,
                  centric: np.ndarray) -> FrenchWilson:
    """Posterior amplitudes of merged intensities (n,) with Wilson prior (module docstring)."""
    I = np.asarray(intensity, float)
    s = np.asarray(sigma, float)
    centric = np.asarray(centric, bool)
    expected = expected_intensity(np.asarray(d_star_sq, float) ** 1.5, I)
    ok = (s > 0) & (expected != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = I / s - np.abs(s / np.where(centric, 2 * expected, expected))
        valid = ok & (I / s >= -3.7) & (h >= -4.0)
    m = np.full((3, I.shape[0]), np.nan)
    if valid.any():
        m[:, valid] = _moments(h[valid], np.where(centric[valid], 0.0, 1.0))
    rs = np.sqrt(np.where(valid, s, np.nan))
    F = m[0] * rs
    sigF = np.sqrt(np.maximum(m[1] - m[0] ** 2, 0.0)) * rs
    J = m[1] * s
    sigJ = np.sqrt(np.maximum(m[2] - m[1] ** 2, 0.0)) * s
    return FrenchWilson(F, sigF, J, sigJ, valid)
