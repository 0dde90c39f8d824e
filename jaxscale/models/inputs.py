"""Inputs and per-data-set state shared by the model modules (no JAX here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DatasetInput:
    """The suitable-for-scaling observations of one data set, as the model needs them.

    experiment: a `jaxscale.io.expt.Experiment` (uses oscillation, image_range, osc_range,
    is_still, s0_direction, rotation_axis, fixed_rotation, setting_rotation, scaling_model).
    config_xyz_px / config_d: rows from which the array model takes its grid extents
    (DIALS: every row of the input table with d > 0, including unobserved ones); default
    the suitable rows.
    """

    experiment: Any
    z_px: np.ndarray  # f[n_i] z centroid, image array-index units (xyzobs.px.value[:, 2])
    d: np.ndarray  # f[n_i] d-spacing, Angstrom
    s1: np.ndarray  # f[n_i, 3] diffracted beam vectors
    xyz_px: np.ndarray  # f[n_i, 3] xyzobs.px.value
    dataset_index: int = 0
    config_xyz_px: np.ndarray | None = None  # f[m_i, 3]
    config_d: np.ndarray | None = None  # f[m_i]

    @property
    def n_obs(self) -> int:
        return len(self.d)


@dataclass
class DatasetModelState:
    """One data set's scaling model in DIALS terms (what a .expt `scaling_model` holds)."""

    model_id: str  # "physical" | "KB" | "array" | "dose_decay"
    config: dict  # DIALS configuration_parameters
    params: dict[str, np.ndarray]  # DIALS component name -> parameters, DIALS component order
    esds: dict[str, np.ndarray] = field(default_factory=dict)
    fixed_components: list[str] = field(default_factory=list)  # <model>.correction.fix
    is_scaled: bool = False  # loaded from a previously scaled .expt
