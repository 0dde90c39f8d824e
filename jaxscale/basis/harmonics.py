"""Real spherical harmonics of the DIALS absorption surface (spec/basis.md §3).

Per observation the absorption basis is ``a_lm = (Yr_lm(s0c) + Yr_lm(s1c)) / 2`` for
l = 1..lmax, m = -l..l (l ascending, m ascending), with s0c / s1c the reversed-incident and
diffracted beam directions in a crystal-fixed frame whose polar axis is lab x.
Associated Legendre functions are computed here (fully normalised recursion), no scipy.
"""
from __future__ import annotations

import math

import numpy as np

# DIALS hard-codes sqrt(2) as 1.414213562 (create_sph_harm_table); kept for fidelity.
DIALS_SQRT2 = 1.414213562
LOOKUP_POINTS_PER_DEGREE = 2
LOOKUP_ROW_LIMIT = 100_000  # DIALS uses the lookup table above this many suitable rows


def n_harmonics(lmax: int) -> int:
    """Number of coefficients for l = 1..lmax: lmax^2 + 2 lmax."""
    return lmax * lmax + 2 * lmax


def harmonic_lm(lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(l, m) of each coefficient in DIALS parameter order. -> (int[n_coef], int[n_coef])"""
    ls = np.concatenate([np.full(2 * l + 1, l) for l in range(1, lmax + 1)])
    ms = np.concatenate([np.arange(-l, l + 1) for l in range(1, lmax + 1)])
    return ls, ms


def normalised_legendre(lmax: int, theta: np.ndarray) -> np.ndarray:
    """sqrt((2l+1)/4pi (l-m)!/(l+m)!) P_l^m(cos theta) without Condon-Shortley phase.

    theta: f[n] polar angle -> f[lmax+1, lmax+1, n] indexed [l, m] (zero for m > l).
    Standard stable recursion in m along the diagonal, then upward in l.
    """
    x = np.cos(theta)
    s = np.sin(theta)
    q = np.zeros((lmax + 1, lmax + 1) + np.shape(theta))
    q[0, 0] = math.sqrt(1.0 / (4.0 * math.pi))
    for m in range(1, lmax + 1):
        q[m, m] = math.sqrt((2 * m + 1) / (2.0 * m)) * s * q[m - 1, m - 1]
    for m in range(0, lmax):
        q[m + 1, m] = math.sqrt(2 * m + 3) * x * q[m, m]
    for m in range(0, lmax + 1):
        for l in range(m + 2, lmax + 1):
            a = math.sqrt((4 * l * l - 1) / (l * l - m * m))
            b = math.sqrt(((l - 1) ** 2 - m * m) / (4 * (l - 1) ** 2 - 1))
            q[l, m] = a * (x * q[l - 1, m] - b * q[l - 2, m])
    return q


def real_harmonics(lmax: int, theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """DIALS real harmonics Yr_lm(theta, phi), basis.md §3.2. f[n], f[n] -> f[n, n_coef].

    m > 0: sqrt2 N|P| cos(m phi); m = 0: N P_l; m < 0: sqrt2 N|P| sin(|m| phi) (the explicit
    (-1)^m of DIALS cancels the Condon-Shortley phase).
    """
    q = normalised_legendre(lmax, np.asarray(theta, dtype=np.float64))
    ls, ms = harmonic_lm(lmax)
    mphi = np.arange(1, lmax + 1)[:, None] * np.asarray(phi)[None, :]  # f[lmax, n], row |m| - 1
    cos_m, sin_m = DIALS_SQRT2 * np.cos(mphi), DIALS_SQRT2 * np.sin(mphi)  # once per |m|, not per (l, m)
    out = np.empty((ls.size,) + np.shape(theta))  # f[n_coef, n]
    for j, (l, m) in enumerate(zip(ls, ms)):  # loop over coefficients (<= 80), vectorised over n
        out[j] = q[l, abs(m)] * (cos_m[m - 1] if m > 0 else sin_m[-m - 1] if m < 0 else 1.0)
    return out.T


def theta_phi(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polar angle from +z and azimuth in [0, 2pi) of vectors f[n, 3] (DIALS calc_theta_phi)."""
    theta = np.arctan2(np.sqrt(v[:, 1] ** 2 + v[:, 0] ** 2), v[:, 2])
    phi = np.fmod(np.arctan2(v[:, 1], v[:, 0]) + 2.0 * np.pi, 2.0 * np.pi)
    return theta, phi


def rotation_matrices(axis: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Right-handed rotations by angles f[n] (rad) about axis f[3] -> f[n, 3, 3].

    As scipy Rotation.from_rotvec(angle * axis): the axis is not renormalised, so the
    rotation angle is angle * |axis| (DIALS passes the goniometer datum as is).
    """
    axis = np.asarray(axis, dtype=np.float64)
    norm = np.linalg.norm(axis)
    u = axis / norm
    t = np.asarray(angles, dtype=np.float64) * norm
    c, s = np.cos(t), np.sin(t)
    k = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return (np.eye(3)[None] + s[:, None, None] * k[None]
            + (1.0 - c)[:, None, None] * (k @ k)[None])


def align_x_to_polar(v: np.ndarray) -> np.ndarray:
    """Rotate by +90 deg about (0, -1, 0): (x, y, z) -> (-z, y, x) (DIALS align_axis_along_z
    with alignment axis (1, 0, 0), keeping its cos(pi/2) = 6e-17 round-off). f[n,3] -> f[n,3]"""
    c, s = math.cos(math.acos(0.0)), math.sin(math.acos(0.0))
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    return np.stack([c * x - s * z, (c + (1.0 - c)) * y, s * x + c * z], axis=1)


def crystal_frame_vectors(
    s1: np.ndarray,
    z_px: np.ndarray,
    s0_direction: np.ndarray,
    rotation_axis: np.ndarray,
    fixed_rotation: np.ndarray,
    setting_rotation: np.ndarray,
    oscillation: tuple[float, float],
    first_image: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crystal-frame directions (s0c, s1c), basis.md §3.3. -> (f[n,3], f[n,3])

    s1: f[n,3] diffracted beam vectors; z_px: f[n] z centroid in array-index units;
    s0_direction: sample-to-source unit vector; oscillation: (start, width) in degrees.
    Rows with |s1| = 0 keep zero vectors for both (as DIALS).
    """
    s1 = np.asarray(s1, dtype=np.float64)
    lengths = np.linalg.norm(s1, axis=1)
    good = lengths > 0.0
    # dxtbx get_angle_from_array_index: start + ((z + first) - first) * width, in degrees
    z = np.asarray(z_px, dtype=np.float64)
    angle_deg = oscillation[0] + ((z + first_image) - first_image) * oscillation[1]
    angles = angle_deg * (math.pi / 180.0)
    rot = rotation_matrices(rotation_axis, angles[good])
    r = np.asarray(setting_rotation).reshape(3, 3) @ rot @ np.asarray(fixed_rotation).reshape(3, 3)
    r_inv = np.transpose(r, (0, 2, 1))
    s0 = np.asarray(s0_direction, dtype=np.float64)
    s0 = s0 / np.linalg.norm(s0)
    s0c = np.zeros_like(s1)
    s1c = np.zeros_like(s1)
    s0c[good] = r_inv @ s0
    s1c[good] = np.einsum("ijk,ik->ij", r_inv, s1[good] / lengths[good, None])
    return align_x_to_polar(s0c), align_x_to_polar(s1c)


def _lookup_index(v: np.ndarray) -> np.ndarray:
    """DIALS' lookup-table entry 720 floor(2 theta_deg) + floor(2 phi_deg) of vectors f[n, 3] -> i[n]."""
    ppd = LOOKUP_POINTS_PER_DEGREE
    theta, phi = theta_phi(v)
    return (360.0 * ppd * np.floor(theta * ppd * 180.0 / math.pi)
            + np.floor(phi * 180.0 * ppd / math.pi)).astype(np.int64)


def _grid_angles(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(theta, phi) in radians of lookup-table entries i[n] -> f[n], f[n]."""
    ppd = LOOKUP_POINTS_PER_DEGREE
    grid_theta = np.floor(index / (360.0 * ppd)) * math.pi / (180.0 * ppd)
    grid_phi = (index % (360 * ppd)) * math.pi / (180.0 * ppd)
    return grid_theta, grid_phi


def lookup_grid_angles(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles of the lookup-table entry DIALS uses for each vector (basis.md §3.5).

    Index 720 floor(2 theta_deg) + floor(2 phi_deg) (2 points per degree, lower-left corner,
    no interpolation); returns that grid point's (theta, phi) in radians, f[n] each.
    """
    return _grid_angles(_lookup_index(v))


def absorption_harmonics(s0c: np.ndarray, s1c: np.ndarray, lmax: int, exact: bool = True) -> np.ndarray:
    """a_lm = (Yr_lm(s0c) + Yr_lm(s1c)) / 2 per observation. f[n,3], f[n,3] -> f[n, n_coef]

    exact=False replicates DIALS' piecewise-constant 0.5 deg lookup table (used by DIALS
    for datasets with > 100000 suitable reflections); the harmonics are then evaluated
    once per table entry in use and gathered.
    """
    if exact:
        t0, p0 = theta_phi(s0c)
        t1, p1 = theta_phi(s1c)
        out = real_harmonics(lmax, t0, p0)
        out += real_harmonics(lmax, t1, p1)
        out *= 0.5
        return out
    n = s0c.shape[0]
    entries, which = np.unique(np.concatenate([_lookup_index(s0c), _lookup_index(s1c)]), return_inverse=True)
    table = np.ascontiguousarray(real_harmonics(lmax, *_grid_angles(entries)))  # f[n_entries, n_coef]
    out = table[which[:n]]  # in place from here: (Y0 + Y1) * 0.5, no further n x n_coef temporaries
    out += table[which[n:]]
    out *= 0.5
    return out
