"""Smoothly varying relative B along rotation (SmoothBScaleComponent1D).

g = exp(B(z) / (2 d^2)), B smoothed like the scale; restrained towards 0 with weight
`physical.decay_restraint` per parameter. DIALS' B is minus the conventional B-factor.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxscale.basis.smoother import smooth_rows_for_component
from jaxscale.models.linear import ComponentEntry, ConfiguredComponent, apply_b_factor, assemble

NULL_VALUE = 0.0


def entry(params: np.ndarray, z_px: np.ndarray, norm_fac: float, d: np.ndarray,
          restraint_weight: float | None) -> ComponentEntry:
    rows = smooth_rows_for_component([np.asarray(z_px) * norm_fac], [len(params)])
    d = np.asarray(d, dtype=np.float64)
    restraint = None if restraint_weight is None else np.full(len(params), float(restraint_weight))
    return ComponentEntry(np.asarray(params, dtype=np.float64), rows.idx, rows.w,
                          {"inv_two_d_sq": 1.0 / (2.0 * (d * d))}, restraint)


def configure(name: str, entries: Sequence[ComponentEntry | None], n_obs: Sequence[int],
              shared: bool = False) -> ConfiguredComponent:
    return assemble(name, apply_b_factor, entries, n_obs, shared, extra_fill={"inv_two_d_sq": 0.0})
