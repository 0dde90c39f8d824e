"""Smoothly varying scale along rotation (SmoothScaleComponent1D): g = f_smooth(z * norm_fac)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxscale.basis.smoother import smooth_rows_for_component
from jaxscale.models.linear import ComponentEntry, ConfiguredComponent, apply_grid, assemble

NULL_VALUE = 1.0


def entry(params: np.ndarray, z_px: np.ndarray, norm_fac: float) -> ComponentEntry:
    """One data set: 1-D smoother rows over x_raw = z_px * norm_fac (basis.md §1.3)."""
    rows = smooth_rows_for_component([np.asarray(z_px) * norm_fac], [len(params)])
    return ComponentEntry(np.asarray(params, dtype=np.float64), rows.idx, rows.w)


def configure(name: str, entries: Sequence[ComponentEntry | None], n_obs: Sequence[int],
              shared: bool = False) -> ConfiguredComponent:
    return assemble(name, apply_grid, entries, n_obs, shared)
