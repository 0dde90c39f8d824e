"""Shared pieces of the simulators: lattice, symmetry, Wilson intensities, geometry, noise.

Everything works on whole arrays; gemmi owns the space-group operators, the reciprocal ASU,
systematic absences and d-spacings. Lab frame and model dicts follow DIALS (dxtbx) JSON:
beam `direction` is the unit vector sample -> source, s0 = -direction / lambda, a flat
detector panel is (fast_axis, slow_axis, origin) in mm.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import gemmi
import numpy as np
from scipy.special import erf

_PACK_BITS = 21
_PACK_OFFSET = 1 << (_PACK_BITS - 1)


# --- symmetry ------------------------------------------------------------------------
def pack_hkl(hkl: np.ndarray) -> np.ndarray:
    """One sortable int64 key per Miller index row: (n, 3) -> (n,)."""
    h = np.asarray(hkl, dtype=np.int64) + _PACK_OFFSET
    return (h[:, 0] << (2 * _PACK_BITS)) | (h[:, 1] << _PACK_BITS) | h[:, 2]


def hkl_matrix(op: gemmi.Op) -> np.ndarray:
    """Integer M (3, 3) with h' = h @ M for a symmetry or twin operation (gemmi applies it)."""
    return np.array([op.apply_to_hkl(u) for u in ([1, 0, 0], [0, 1, 0], [0, 0, 1])], dtype=np.int64)


def lattice_points(cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup, d_min: float) -> np.ndarray:
    """All allowed (not systematically absent) Miller indices with d >= d_min, full sphere: (n, 3) int32.

    |h| <= |a| / d_min bounds every index since h = a . r and |r| <= 1 / d_min.
    """
    hmax = [int(np.floor(length / d_min)) for length in (cell.a, cell.b, cell.c)]
    axes = [np.arange(-m, m + 1, dtype=np.int32) for m in hmax]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    grid = grid[np.any(grid != 0, axis=1)]
    grid = np.ascontiguousarray(grid)
    d = cell.calculate_d_array(grid)
    grid = grid[d >= d_min]
    absent = space_group.operations().systematic_absences(np.ascontiguousarray(grid))
    return np.ascontiguousarray(grid[~np.asarray(absent, dtype=bool)])


def map_to_asu(hkl: np.ndarray, space_group: gemmi.SpaceGroup) -> tuple[np.ndarray, np.ndarray]:
    """ASU index (n, 3) of each Miller index and whether it is the I(+) mate (n,) bool.

    A reflection is I(+) if a pure rotation of the point group takes it to its ASU index;
    centric reflections (both) count as I(+), as in cctbx/DIALS.
    """
    hkl = np.ascontiguousarray(np.asarray(hkl, dtype=np.int32).reshape(-1, 3))
    data = gemmi.IntAsuData(gemmi.UnitCell(1, 1, 1, 90, 90, 90), space_group, hkl, np.zeros(len(hkl), np.int32))
    data.ensure_asu()
    asu = np.asarray(data.miller_array, dtype=np.int32)
    plus = np.zeros(len(hkl), dtype=bool)
    h64 = hkl.astype(np.int64)
    for op in space_group.operations().sym_ops:  # <= 48 operators, each vectorised over rows
        plus |= np.all(h64 @ hkl_matrix(op) == asu, axis=1)
    return asu, plus


@dataclass
class UniqueSet:
    """The planted truth on the unique reflections (ASU, Friedel mates merged)."""

    asu_hkl: np.ndarray  # (n_unique, 3) int32, sorted by packed key
    d: np.ndarray  # (n_unique,)
    centric: np.ndarray  # (n_unique,) bool
    epsilon: np.ndarray  # (n_unique,) int
    i_plus: np.ndarray  # (n_unique,) true I(+) (corrected intensity units)
    i_minus: np.ndarray  # (n_unique,) true I(-); equals i_plus without anomalous signal

    @property
    def i_mean(self) -> np.ndarray:
        return 0.5 * (self.i_plus + self.i_minus)

    def lookup(self, asu_hkl: np.ndarray) -> np.ndarray:
        """Row of each ASU index (n, 3) in this set: (n,) int64."""
        keys = pack_hkl(self.asu_hkl)
        return np.searchsorted(keys, pack_hkl(asu_hkl))

    def true_intensity(self, unique_row: np.ndarray, plus: np.ndarray) -> np.ndarray:
        return np.where(plus, self.i_plus[unique_row], self.i_minus[unique_row])

    def observe(self, hkl: np.ndarray, space_group: gemmi.SpaceGroup) -> tuple[np.ndarray, np.ndarray]:
        """(unique row (n,), true intensity (n,)) of observed Miller indices hkl (n, 3), I(+) or I(-) as measured."""
        asu, plus = map_to_asu(hkl, space_group)
        unique_row = self.lookup(asu)
        return unique_row, self.true_intensity(unique_row, plus)


def unique_set_truth(unique: UniqueSet, *, error_model: tuple[float, float], wilson_B: float,
                     mean_intensity: float, anomalous_signal: float) -> dict[str, np.ndarray]:
    """The truth entries every simulator returns: the unique set and the settings that made and measured it."""
    return {
        "asu_hkl": unique.asu_hkl,
        "i_plus": unique.i_plus,
        "i_minus": unique.i_minus,
        "i_mean": unique.i_mean,
        "d_unique": unique.d,
        "centric": unique.centric,
        "error_model": np.array(error_model, dtype=float),
        "wilson_B": np.array(wilson_B),
        "mean_intensity": np.array(mean_intensity),
        "anomalous_signal": np.array(anomalous_signal),
    }


def wilson_unique_set(
    cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup, d_min: float, *,
    mean_intensity: float, wilson_B: float, anomalous_signal: float, rng: np.random.Generator,
) -> UniqueSet:
    """Wilson-distributed true intensities on the ASU to d_min.

    <I>(d) = mean_intensity * epsilon * exp(-wilson_B / (2 d^2)); acentric I ~ <I> Exp(1),
    centric I ~ <I> chi^2_1. Anomalous: I(+/-) = I (1 +/- delta), delta ~ N(0, anomalous_signal)
    on acentrics (clipped to |delta| < 0.9).
    """
    full = lattice_points(cell, space_group, d_min)
    asu, _ = map_to_asu(full, space_group)
    keys, first = np.unique(pack_hkl(asu), return_index=True)
    asu_hkl = np.ascontiguousarray(asu[first])
    ops = space_group.operations()
    d = cell.calculate_d_array(asu_hkl)
    centric = np.asarray(ops.centric_flag_array(asu_hkl), dtype=bool)
    eps = np.asarray(ops.epsilon_factor_without_centering_array(asu_hkl), dtype=np.int64)
    mean = mean_intensity * eps * np.exp(-wilson_B / (2.0 * d**2))
    n = len(asu_hkl)
    i_true = np.where(centric, mean * rng.standard_normal(n) ** 2, mean * rng.exponential(1.0, n))
    delta = np.zeros(n)
    if anomalous_signal > 0:
        delta = np.clip(rng.normal(0.0, anomalous_signal, n), -0.9, 0.9) * ~centric
    return UniqueSet(asu_hkl, d, centric, eps, i_true * (1 + delta), i_true * (1 - delta))


# --- orientation and models ----------------------------------------------------------
def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed rotation matrices (n, 3, 3) from random unit quaternions."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def rotation_about(axis: np.ndarray, angle_rad: np.ndarray) -> np.ndarray:
    """Right-handed rotations about a unit axis (3,) by angles (n,): (n, 3, 3) (Rodrigues)."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    c = np.cos(angle_rad)[:, None, None]
    s = np.sin(angle_rad)[:, None, None]
    return np.eye(3) + s * kx + (1 - c) * (kx @ kx)


def real_space_rows(cell: gemmi.UnitCell, orientation: np.ndarray) -> np.ndarray:
    """Real-space vectors a, b, c as rows (…, 3, 3) of a crystal with orientation U (…, 3, 3).

    Rows of the orthogonalised cell (gemmi's orth matrix, columns a, b, c) rotated by U.
    """
    orth = np.array(cell.orth.mat.tolist())  # columns a, b, c
    return np.swapaxes(orientation @ orth, -1, -2)


def crystal_dict(real_rows: np.ndarray, space_group: gemmi.SpaceGroup) -> dict:
    """DIALS crystal model dict (static)."""
    a, b, c = (list(map(float, v)) for v in real_rows)
    return {"__id__": "crystal", "real_space_a": a, "real_space_b": b, "real_space_c": c,
            "space_group_hall_symbol": " " + space_group.hall.strip()}


def beam_dict(wavelength: float) -> dict:
    return {"direction": [0.0, 0.0, 1.0], "wavelength": float(wavelength), "divergence": 0.0,
            "sigma_divergence": 0.0, "polarization_normal": [0.0, 1.0, 0.0],
            "polarization_fraction": 0.999, "flux": 0.0, "transmission": 1.0}


@dataclass(frozen=True)
class FlatDetector:
    """A single flat panel normal to the beam (Pilatus 6M-like), beam centre at the middle."""

    distance: float  # mm
    image_size: tuple[int, int] = (2463, 2527)  # fast, slow pixels
    pixel_size: float = 0.172  # mm
    thickness: float = 0.45  # mm (Si)
    mu: float = 3.96  # 1/mm, Si near 1 A

    @property
    def fast(self) -> np.ndarray:
        return np.array([1.0, 0.0, 0.0])

    @property
    def slow(self) -> np.ndarray:
        return np.array([0.0, -1.0, 0.0])

    @property
    def origin(self) -> np.ndarray:
        half_f = 0.5 * self.image_size[0] * self.pixel_size
        half_s = 0.5 * self.image_size[1] * self.pixel_size
        return np.array([-half_f, half_s, -self.distance])

    @property
    def half_width(self) -> float:
        """Shortest distance from the beam centre to a detector edge, mm."""
        return 0.5 * min(self.image_size) * self.pixel_size

    def to_dict(self) -> dict:
        panel = {
            "name": "Panel", "type": "SENSOR_PAD", "fast_axis": self.fast.tolist(),
            "slow_axis": self.slow.tolist(), "origin": self.origin.tolist(), "raw_image_offset": [0, 0],
            "image_size": list(self.image_size), "pixel_size": [self.pixel_size, self.pixel_size],
            "trusted_range": [-1.0, 1e6], "thickness": self.thickness, "material": "Si", "mu": self.mu,
            "identifier": "", "mask": [], "gain": 1.0, "pedestal": 0.0,
            "px_mm_strategy": {"type": "SimplePxMmStrategy"},
        }
        hierarchy = {
            "name": "", "type": "", "fast_axis": [1.0, 0.0, 0.0], "slow_axis": [0.0, 1.0, 0.0],
            "origin": [0.0, 0.0, 0.0], "raw_image_offset": [0, 0], "image_size": [0, 0],
            "pixel_size": [0.0, 0.0], "trusted_range": [0.0, 0.0], "thickness": 0.0, "material": "",
            "mu": 0.0, "identifier": "", "mask": [], "gain": 1.0, "pedestal": 0.0,
            "px_mm_strategy": {"type": "SimplePxMmStrategy"}, "children": [{"panel": 0}],
        }
        return {"panels": [panel], "hierarchy": hierarchy}

    def project(self, s1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where diffracted beams s1 (n, 3) hit the panel: (x_mm, y_mm, on_panel) each (n,)."""
        dmat = np.stack([self.fast, self.slow, self.origin], axis=1)
        v = s1 @ np.linalg.inv(dmat).T
        with np.errstate(divide="ignore", invalid="ignore"):
            x = v[:, 0] / v[:, 2]
            y = v[:, 1] / v[:, 2]
        size_f = self.image_size[0] * self.pixel_size
        size_s = self.image_size[1] * self.pixel_size
        on = (v[:, 2] > 0) & (x >= 0) & (x < size_f) & (y >= 0) & (y < size_s)
        return x, y, on

    def ray(self, x_mm: np.ndarray, y_mm: np.ndarray) -> np.ndarray:
        """Unit vectors (n, 3) from the sample to panel points (x_mm, y_mm)."""
        p = self.origin + x_mm[:, None] * self.fast + y_mm[:, None] * self.slow
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    def quantum_efficiency(self, s1: np.ndarray) -> np.ndarray:
        """Absorbed fraction 1 - exp(-mu t / cos(alpha)) for oblique incidence: (n,)."""
        normal = np.cross(self.fast, self.slow)
        cos_a = np.abs(s1 @ normal) / np.linalg.norm(s1, axis=1)
        return 1.0 - np.exp(-self.mu * self.thickness / cos_a)


def pixel_centroids(x_mm: np.ndarray, y_mm: np.ndarray, pixel_size: float, jitter_px: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(calculated x, y; observed x, y = calculated + N(0, jitter_px)), each (n,) in pixels, of spots at (x_mm, y_mm)."""
    x_px, y_px = x_mm / pixel_size, y_mm / pixel_size
    n = len(x_px)
    x_obs = x_px + rng.normal(0, jitter_px, n)
    y_obs = y_px + rng.normal(0, jitter_px, n)
    return x_px, y_px, x_obs, y_obs


def spot_bbox(x_px: np.ndarray, y_px: np.ndarray, z0: np.ndarray, z1: np.ndarray) -> np.ndarray:
    """DIALS bbox (n, 6) int32 (x0, x1, y0, y1, z0, z1): 9 x 9 pixels around each spot, images z0..z1."""
    return np.stack([np.floor(x_px) - 4, np.floor(x_px) + 5, np.floor(y_px) - 4, np.floor(y_px) + 5, z0, z1],
                    axis=1).astype(np.int32)


# DIALS column types of the integrated-table columns both simulators write that are not plain doubles
DIALS_TYPES = {"flags": "std::size_t", "panel": "std::size_t", "entering": "bool", "id": "int", "bbox": "int6",
               "miller_index": "cctbx::miller::index<>"}


def detector_for_resolution(wavelength: float, d_min: float) -> FlatDetector:
    """A panel whose nearest edge reaches d_min (the corners go further and are cut at d_min)."""
    two_theta = 2.0 * np.arcsin(wavelength / (2.0 * d_min))
    det = FlatDetector(distance=1.0)
    return FlatDetector(distance=float(det.half_width / np.tan(two_theta)))


def polarization_factor(s1: np.ndarray, beam: dict) -> np.ndarray:
    """Fraction of intensity kept after polarisation, (n,), for the beam dict's polarisation.

    The electric vector lies mostly (fraction p) along n x direction, the rest along n.
    """
    direction = np.asarray(beam["direction"], dtype=float)
    normal = np.asarray(beam["polarization_normal"], dtype=float)
    p = float(beam["polarization_fraction"])
    e_main = np.cross(normal, direction)
    u = s1 / np.linalg.norm(s1, axis=1, keepdims=True)
    return p * (1.0 - (u @ e_main) ** 2) + (1.0 - p) * (1.0 - (u @ normal) ** 2)


def new_identifiers(n: int, rng: np.random.Generator) -> list[str]:
    """Reproducible UUID4 strings from the generator."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    return [str(uuid.UUID(bytes=bytes(r), version=4)) for r in raw]


# --- measurement ---------------------------------------------------------------------
@dataclass
class Measured:
    """Simulated integration output in raw (detector) units, with the truth of the noise."""

    sum_value: np.ndarray
    sum_variance: np.ndarray
    prf_value: np.ndarray
    prf_variance: np.ndarray
    background_sum: np.ndarray
    background_variance: np.ndarray
    outlier: np.ndarray  # bool, gross outliers planted


def measure(
    raw_full: np.ndarray, partiality: np.ndarray, *, background_per_pixel: np.ndarray,
    n_foreground: int, n_background: int, error_model: tuple[float, float], outlier_fraction: float,
    rng: np.random.Generator,
) -> Measured:
    """Counting + proportional noise on expected raw intensities (n,).

    Summation records partiality * full; profile fitting estimates the full intensity with
    less background noise. Reported variances are the counting variances of the *observed*
    values; the true noise is that inflated by the error model, sigma'^2 = a^2 (sigma^2 + (b I)^2),
    so fitting DIALS' basic error model recovers (a, b). Gross outliers add 10–30 sigma
    (mostly positive, like zingers and ice).
    """
    a, b = error_model
    n = raw_full.shape[0]
    bg_sum = background_per_pixel * n_foreground
    bg_var = bg_sum * (1.0 + n_foreground / n_background)
    raw_sum = raw_full * partiality
    var_sum_true = np.maximum(raw_sum, 0) + bg_var
    var_prf_true = np.maximum(raw_full, 0) + 0.6 * bg_var
    z1 = rng.standard_normal(n)
    z2 = 0.9 * z1 + np.sqrt(1 - 0.81) * rng.standard_normal(n)
    sum_value = raw_sum + a * np.sqrt(var_sum_true + (b * raw_sum) ** 2) * z1
    prf_value = raw_full + a * np.sqrt(var_prf_true + (b * raw_full) ** 2) * z2
    outlier = rng.random(n) < outlier_fraction
    n_out = int(outlier.sum())
    if n_out:
        sign = np.where(rng.random(n_out) < 0.8, 1.0, -1.0)
        size = rng.uniform(10.0, 30.0, n_out)
        sum_value[outlier] += sign * size * np.sqrt(var_sum_true[outlier])
        prf_value[outlier] += sign * size * np.sqrt(var_prf_true[outlier])
    sum_variance = np.maximum(sum_value, 0) + bg_var
    prf_variance = np.maximum(prf_value, 0) + 0.6 * bg_var
    bg_observed = np.maximum(bg_sum + np.sqrt(bg_sum) * rng.standard_normal(n), 0.0)
    return Measured(sum_value, sum_variance, prf_value, prf_variance, bg_observed, bg_var, outlier)


def gaussian_fraction(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Mass of a standard normal between lo and hi (in sigmas)."""
    return 0.5 * (erf(hi / np.sqrt(2.0)) - erf(lo / np.sqrt(2.0)))


def absorption_surface(strength: float, rng: np.random.Generator):
    """A smooth, random crystal-frame absorption surface f(v) with RMS ~ `strength` over the sphere.

    f(v) = c . v + v^T Q v (Q symmetric traceless): exactly the span of the l = 1, 2 real
    spherical harmonics, so an lmax >= 2 harmonic model can represent it. Returns
    (f, coefficients) with f: (n, 3) unit vectors -> (n,).
    """
    c = rng.standard_normal(3)
    c *= np.sqrt(1.5) / np.linalg.norm(c)  # Var(c.v) = |c|^2/3 = 0.5
    q = rng.standard_normal((3, 3))
    q = 0.5 * (q + q.T)
    q -= np.trace(q) / 3.0 * np.eye(3)
    q *= np.sqrt(3.75 / np.sum(q * q))  # Var(v^T Q v) = 2 tr(Q^2)/15 = 0.5
    c *= strength
    q *= strength

    def f(v: np.ndarray) -> np.ndarray:
        return v @ c + np.einsum("ni,ij,nj->n", v, q, v)

    return f, {"linear": c, "quadratic": q}
