"""Gaussian smoothers (DIALS 3.12 GaussianSmoother 1D/2D/3D), as sparse per-observation rows.

A smoother interpolates a grid of parameter values at a normalised coordinate with a
truncated, normalised Gaussian kernel. Because the kernel is truncated to a window of at
most 3 grid points per axis, each observation touches <= 3 / 9 / 27 parameters: we
precompute once, in numpy, the window's parameter indices and the normalised weights
``w_k / sum_j w_j`` so that the value is ``sum_k w[:, k] * params[idx[:, k]]``.
Rows whose window is smaller than K are padded with index 0 and weight 0.
Conventions and constants follow spec/basis.md §1-2 exactly (Boost ``iround`` with halves
away from zero, sigma 0.65/0.70, positions -0.5.. for >= 4 values, first axis fastest).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

N_AVERAGE = 3  # DIALS set_smoothing(3, -1)


class SmootherAxis(NamedTuple):
    """One axis of a Gaussian smoother grid (normalised units: grid spacing 1)."""

    x0: float  # coordinate of normalised position 0
    spacing: float  # coordinate units per grid interval
    n_values: int  # number of grid points (parameters) along this axis
    positions: np.ndarray  # f[n_values] grid positions in normalised units
    n_average: int  # window width (points) = min(3, n_values)


class SmootherRows(NamedTuple):
    """Per-observation sparse smoother rows: value = sum(w * params[idx], axis=1)."""

    idx: np.ndarray  # int32[n_obs, K] flat grid index (first axis fastest)
    w: np.ndarray  # f64[n_obs, K] normalised weights (rows sum to 1; padding 0)


def n_values_from_intervals(n_intervals: int) -> int:
    """Grid points for n_intervals: 1 -> 2, 2 -> 3, otherwise n_intervals + 2."""
    if n_intervals < 1:
        raise ValueError("a smoother needs at least one interval")
    return {1: 2, 2: 3}.get(n_intervals, n_intervals + 2)


def n_intervals_from_n_params(n_params: int) -> int:
    """Inverse of `n_values_from_intervals`: 2 -> 1, 3 -> 2, n >= 4 -> n - 2."""
    if n_params < 2:
        raise ValueError("a smoothed component needs at least 2 parameters")
    return n_params - 1 if n_params <= 3 else n_params - 2


def smoother_axis(x_lo: float, x_hi: float, n_intervals: int) -> SmootherAxis:
    """Axis of a smoother spanning [x_lo, x_hi] with n_intervals intervals (basis.md §1.1)."""
    n_values = n_values_from_intervals(n_intervals)
    spacing = (x_hi - x_lo) / n_intervals
    if not spacing > 0:
        raise ValueError("smoother range must have x_hi > x_lo")
    positions = np.arange(n_values, dtype=np.float64) - (0.5 if n_values >= 4 else 0.0)
    return SmootherAxis(float(x_lo), float(spacing), n_values, positions, min(N_AVERAGE, n_values))


def axis_for_coordinates(x_raw: np.ndarray, n_params: int) -> tuple[SmootherAxis, np.ndarray]:
    """The axis DIALS builds for a component's coordinates, and the shifted coordinates.

    basis.md §1.3: shift by the minimum over the held reflections, range
    [floor(round(min, 10)), max(ceil(round(max, 10)), 1)].
    x_raw: f[n_obs] -> (axis, x: f[n_obs] shifted coordinates)
    """
    x = np.asarray(x_raw, dtype=np.float64)
    x = x - x.min()
    x_lo = math.floor(round(float(x.min()), 10))
    x_hi = max(math.ceil(round(float(x.max()), 10)), 1)
    return smoother_axis(x_lo, x_hi, n_intervals_from_n_params(n_params)), x


def boost_iround(v: np.ndarray) -> np.ndarray:
    """Round to nearest integer, halves away from zero (boost::math::iround). f[n] -> int[n]."""
    a = np.abs(v)
    t = np.floor(a)
    t = t + (a - t >= 0.5)
    return (np.sign(v) * t).astype(np.int64)


def axis_window(axis: SmootherAxis, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window of grid points used for each coordinate along one axis (basis.md §1.2).

    x: f[n_obs] raw axis coordinates -> (idx int[n_obs, 3], dz f[n_obs, 3] = z - position,
    valid bool[n_obs, 3]); invalid slots are padding.
    """
    z = (np.asarray(x, dtype=np.float64) - axis.x0) / axis.spacing
    n_v = axis.n_values
    if n_v <= 3:
        i1 = np.zeros(z.shape, dtype=np.int64)
        i2 = np.full(z.shape, n_v, dtype=np.int64)
    else:
        i1 = boost_iround(z - axis.n_average / 2.0) + 1
        i2 = i1 + axis.n_average
        low = i1 < 0
        i1 = np.where(low, 0, i1)
        i2 = np.where(low, np.maximum(2, i2), i2)
        high = i2 > n_v
        i2 = np.where(high, n_v, i2)
        i1 = np.where(high, np.minimum(i1, n_v - 2), i1)
    slots = np.arange(N_AVERAGE)
    idx = i1[:, None] + slots[None, :]  # int[n_obs, 3]
    valid = idx < i2[:, None]
    idx = np.where(valid, idx, 0)
    dz = z[:, None] - axis.positions[idx]
    return idx, dz, valid


def smoother_sigma(axes: Sequence[SmootherAxis]) -> float:
    """sigma = 0.65 + 0.05 (min n_average - 2): 0.70 normally, 0.65 with a 2-point axis."""
    return 0.65 + 0.05 * (min(a.n_average for a in axes) - 2)


def smoother_rows(axes: Sequence[SmootherAxis], coords: Sequence[np.ndarray]) -> SmootherRows:
    """Sparse normalised weight rows of an N-D (N = 1, 2, 3) truncated Gaussian smoother.

    Window = Cartesian product of per-axis windows; weight exp(-|dz|^2 / sigma^2);
    flat index i + j n_x + k n_x n_y (first axis fastest). coords: N arrays f[n_obs].
    """
    sigma = smoother_sigma(axes)
    n_obs = len(coords[0])
    idx = np.zeros((n_obs, 1), dtype=np.int64)
    dist_sq = np.zeros((n_obs, 1))
    valid = np.ones((n_obs, 1), dtype=bool)
    stride = 1
    for axis, x in zip(axes, coords):
        a_idx, a_dz, a_valid = axis_window(axis, x)
        # product with previous axes: new slot index = previous + 3 * this axis slot
        idx = (idx[:, None, :] + stride * a_idx[:, :, None]).reshape(n_obs, -1)
        dist_sq = (dist_sq[:, None, :] + a_dz[:, :, None] ** 2).reshape(n_obs, -1)
        valid = (valid[:, None, :] & a_valid[:, :, None]).reshape(n_obs, -1)
        stride *= axis.n_values
    ds = np.sqrt(dist_sq) / sigma  # DIALS: pow(dx^2 + dy^2, 0.5) / sigma, then exp(-ds*ds)
    w = np.where(valid, np.exp(-ds * ds), 0.0)
    w = w / w.sum(axis=1, keepdims=True)
    idx = np.where(valid, idx, 0)
    return SmootherRows(idx.astype(np.int32), w)


def smooth_rows_for_component(coords_raw: Sequence[np.ndarray], shape: Sequence[int]) -> SmootherRows:
    """Rows of a DIALS smooth component with grid `shape` over raw coordinates.

    Each axis coordinate is shifted by its own minimum and gets the range rule of basis.md
    §1.3 (the min is over the observations given, i.e. all suitable reflections of the
    dataset). coords_raw: N arrays f[n_obs]; shape: parameters per axis (first fastest).
    """
    axes, coords = [], []
    for x_raw, n_params in zip(coords_raw, shape):
        axis, x = axis_for_coordinates(x_raw, n_params)
        axes.append(axis)
        coords.append(x)
    return smoother_rows(axes, coords)


def smoother_value(rows: SmootherRows, params: np.ndarray) -> np.ndarray:
    """Interpolated values f[n_obs] = sum_k w_k params[idx_k] (numpy, for checks/plots)."""
    return np.sum(rows.w * np.asarray(params)[rows.idx], axis=1)
