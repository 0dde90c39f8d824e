"""The KB model (`id "KB"`): one scale k and one B per data set, g = k exp(B / (2 d^2)).

Also the single-value components reused by dose_decay (relative_B). For 10^5 stills each
still is a data set with its own k and B; the basis indexes them, no per-still Python
in the hot path.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxscale.models.inputs import DatasetInput, DatasetModelState
from jaxscale.models.linear import (
    ComponentEntry,
    ConfiguredComponent,
    apply_b_factor,
    apply_grid,
    assemble,
    single_parameter_rows,
)
from jaxscale.models.rules import fixed_components, option, update_fixed_components

MODEL_ID = "KB"
COMPONENT_ORDER = ("scale", "decay")
NULL_VALUES = {"scale": 1.0, "decay": 0.0}
CONSECUTIVE_ORDER = [["scale", "decay"]]


def single_scale_entry(params: np.ndarray, n_obs: int) -> ComponentEntry:
    idx, w = single_parameter_rows(n_obs)
    return ComponentEntry(np.asarray(params, dtype=np.float64), idx, w)


def single_b_entry(params: np.ndarray, d: np.ndarray) -> ComponentEntry:
    d = np.asarray(d, dtype=np.float64)
    idx, w = single_parameter_rows(len(d))
    return ComponentEntry(np.asarray(params, dtype=np.float64), idx, w,
                          {"inv_two_d_sq": 1.0 / (2.0 * (d * d))})


def configure_scale(name: str, entries: Sequence[ComponentEntry | None], n_obs: Sequence[int],
                    shared: bool = False) -> ConfiguredComponent:
    return assemble(name, apply_grid, entries, n_obs, shared)


def configure_b(name: str, entries: Sequence[ComponentEntry | None], n_obs: Sequence[int],
                shared: bool = False) -> ConfiguredComponent:
    return assemble(name, apply_b_factor, entries, n_obs, shared, extra_fill={"inv_two_d_sq": 0.0})



def from_data(data: DatasetInput, options: Any) -> DatasetModelState:
    """New KB model (DIALS lists corrections as ["decay", "scale"])."""
    config: dict = {"corrections": []}
    params: dict[str, np.ndarray] = {"scale": np.ones(1)}
    if option(options, "KB.decay_correction", True):
        config["corrections"].append("decay")
        params["decay"] = np.zeros(1)
    config["corrections"].append("scale")
    return DatasetModelState(MODEL_ID, config, params,
                             fixed_components=fixed_components(options, MODEL_ID))


update = update_fixed_components  # new options on a loaded KB model change only its fixed components


def entries(state: DatasetModelState, data: DatasetInput, options: Any,
            exact_harmonics: bool | None = None) -> dict[str, ComponentEntry]:
    out = {}
    if "scale" in state.params:
        out["scale"] = single_scale_entry(state.params["scale"], data.n_obs)
    if "decay" in state.params:
        out["decay"] = single_b_entry(state.params["decay"], data.d)
    return out


def limit_image_range(state: DatasetModelState, new_range: tuple[int, int]) -> None:
    """KB has no rotation dependence: nothing to re-parameterise."""
