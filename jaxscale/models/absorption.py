"""Spherical-harmonic absorption surface (SHScaleComponent): g = 1 + sum_lm C_lm a_lm.

a_lm is the mean of the real harmonics of the crystal-frame reversed-incident and
diffracted directions (basis.md §3); every C_lm is restrained to 0 with the surface weight.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxscale.basis.harmonics import (
    LOOKUP_ROW_LIMIT,
    absorption_harmonics,
    crystal_frame_vectors,
    n_harmonics,
)
from jaxscale.models.linear import ComponentEntry, ConfiguredComponent, apply_one_plus, assemble

NULL_VALUE = 0.0


def harmonics_for_dataset(experiment, z_px: np.ndarray, s1: np.ndarray, lmax: int,
                          exact: bool | None = None) -> np.ndarray:
    """a_lm f[n_obs, lmax^2 + 2 lmax] of one sweep. exact=None: DIALS' rule (lookup table
    above 100000 rows)."""
    if exact is None:
        exact = len(z_px) <= LOOKUP_ROW_LIMIT
    s0c, s1c = crystal_frame_vectors(
        s1, z_px, experiment.s0_direction, experiment.rotation_axis, experiment.fixed_rotation,
        experiment.setting_rotation, experiment.oscillation, experiment.image_range[0])
    return absorption_harmonics(s0c, s1c, lmax, exact=exact)


def entry(params: np.ndarray, harmonics: np.ndarray, surface_weight: float) -> ComponentEntry:
    n_obs, n_coef = harmonics.shape
    if len(params) != n_coef or n_coef != n_harmonics(int(round(np.sqrt(n_coef + 1))) - 1):
        raise ValueError("absorption parameters do not match the harmonic basis")
    idx = np.broadcast_to(np.arange(n_coef, dtype=np.int32), (n_obs, n_coef)).copy()
    return ComponentEntry(np.asarray(params, dtype=np.float64), idx, np.asarray(harmonics),
                          None, np.full(n_coef, float(surface_weight)))


def configure(name: str, entries: Sequence[ComponentEntry | None], n_obs: Sequence[int],
              shared: bool = False) -> ConfiguredComponent:
    return assemble(name, apply_one_plus, entries, n_obs, shared)
