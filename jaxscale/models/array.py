"""The array model (`id "array"`): smoothed grids, no restraints.

decay: 2-D grid over (resolution 1/d^2, rotation); absorption: 3-D grid over (detector x,
detector y, rotation); modulation: 2-D grid over detector (x, y). All multiplicative with
initial value 1 (models.md §6); parameters flattened first axis fastest.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from jaxscale.basis.smoother import smooth_rows_for_component
from jaxscale.models.inputs import DatasetInput, DatasetModelState
from jaxscale.models.linear import ComponentEntry, ConfiguredComponent, apply_grid, assemble
from jaxscale.models.physical import shift_range
from jaxscale.models.rules import (
    fixed_components,
    initialise_smooth_input,
    n_param_from_bins,
    new_parameter_offset,
    option,
    reduced_osc_range,
    update_fixed_components,
)

MODEL_ID = "array"
COMPONENT_ORDER = ("decay", "absorption", "modulation")
NULL_VALUES = {"decay": 1.0, "absorption": 1.0, "modulation": 1.0}
CONSECUTIVE_ORDER = [["decay"], ["absorption"], ["modulation"]]

if TYPE_CHECKING:  # build imports the registry, which imports this module
    from jaxscale.models.build import ScalingModel


def grid_entry(params: np.ndarray, coords: Sequence[np.ndarray], shape: Sequence[int]) -> ComponentEntry:
    """One data set's rows of an N-D smoothed grid with the given shape (first axis fastest)."""
    if int(np.prod(shape)) != len(params):
        raise ValueError("grid shape does not match the number of parameters")
    rows = smooth_rows_for_component(list(coords), list(shape))
    return ComponentEntry(np.asarray(params, dtype=np.float64), rows.idx, rows.w)


def configure_grid(name: str, entries: Sequence[ComponentEntry | None], n_obs: Sequence[int],
                   shared: bool = False) -> ConfiguredComponent:
    return assemble(name, apply_grid, entries, n_obs, shared)



def from_data(data: DatasetInput, options: Any) -> DatasetModelState:
    """New array model; grid extents from the rows with d > 0 (DIALS ArrayScalingModel.from_data)."""
    expt = data.experiment
    xyz = data.xyz_px if data.config_xyz_px is None else data.config_xyz_px
    d_all = data.d if data.config_d is None else data.config_d
    keep = np.asarray(d_all) > 0.0
    xyz, d_all = np.asarray(xyz)[keep], np.asarray(d_all)[keep]
    osc_range, width = expt.osc_range, expt.oscillation[1]
    config: dict = {"corrections": [], "valid_osc_range": list(osc_range)}
    n_time, time_norm_fac, time_rot = initialise_smooth_input(
        osc_range, width, float(option(options, "array.decay_interval", 20.0)))
    xmax, xmin = float(xyz[:, 0].max()) + 0.001, float(xyz[:, 0].min()) - 0.001
    ymax, ymin = float(xyz[:, 1].max()) + 0.001, float(xyz[:, 1].min()) - 0.001
    params: dict[str, np.ndarray] = {}
    if option(options, "array.decay_correction", True):
        config["corrections"].append("decay")
        resmax = (1.0 / float(d_all.min()) ** 2) + 1e-6
        resmin = (1.0 / float(d_all.max()) ** 2) - 1e-6
        n_res, res_width = n_param_from_bins(resmin, resmax, int(option(options, "array.n_resolution_bins", 10)))
        config.update(n_res_param=n_res, n_time_param=n_time, resmin=resmin, res_bin_width=res_width,
                      time_norm_fac=time_norm_fac, time_rot_interval=time_rot)
        params["decay"] = np.ones(n_res * n_time)
    if option(options, "array.absorption_correction", True):
        config["corrections"].append("absorption")
        n_bins = int(option(options, "array.n_absorption_bins", 3))
        n_x, x_width = n_param_from_bins(xmin, xmax, n_bins)
        n_y, y_width = n_param_from_bins(ymin, ymax, n_bins)
        config.update(n_x_param=n_x, n_y_param=n_y, xmin=xmin, ymin=ymin, x_bin_width=x_width,
                      y_bin_width=y_width, n_time_param=n_time, time_norm_fac=time_norm_fac,
                      time_rot_interval=time_rot)
        params["absorption"] = np.ones(n_x * n_y * n_time)
    if option(options, "array.modulation_correction", False):
        config["corrections"].append("modulation")
        n_bins = int(option(options, "array.n_modulation_bins", 20))
        n_xm, xm_width = n_param_from_bins(xmin, xmax, n_bins)
        n_ym, ym_width = n_param_from_bins(ymin, ymax, n_bins)
        config.update(n_x_mod_param=n_xm, n_y_mod_param=n_ym, xmin=xmin, ymin=ymin,
                      x_det_bin_width=xm_width, y_det_bin_width=ym_width)
        params["modulation"] = np.ones(n_xm * n_ym)
    if not params:
        raise ValueError("the array model needs at least one of decay or absorption corrections")
    return DatasetModelState(MODEL_ID, config, params,
                             fixed_components=fixed_components(options, MODEL_ID))


update = update_fixed_components  # new options on a loaded array model change only its fixed components


def entries(state: DatasetModelState, data: DatasetInput, options: Any,
            exact_harmonics: bool | None = None) -> dict[str, ComponentEntry]:
    c, p = state.config, state.params
    xyz = np.asarray(data.xyz_px, dtype=np.float64)
    out = {}
    if "decay" in p or "absorption" in p:
        time = xyz[:, 2] * c["time_norm_fac"]
    if "decay" in p:
        d = np.asarray(data.d, dtype=np.float64)
        res = ((1.0 / (d * d)) - c["resmin"]) / c["res_bin_width"]
        out["decay"] = grid_entry(p["decay"], [res, time], [c["n_res_param"], c["n_time_param"]])
    if "absorption" in p:
        x = (xyz[:, 0] - c["xmin"]) / c["x_bin_width"]
        y = (xyz[:, 1] - c["ymin"]) / c["y_bin_width"]
        out["absorption"] = grid_entry(p["absorption"], [x, y, time],
                                       [c["n_x_param"], c["n_y_param"], c["n_time_param"]])
    if "modulation" in p:
        x = (xyz[:, 0] - c["xmin"]) / c["x_det_bin_width"]
        y = (xyz[:, 1] - c["ymin"]) / c["y_det_bin_width"]
        out["modulation"] = grid_entry(p["modulation"], [x, y], [c["n_x_mod_param"], c["n_y_mod_param"]])
    return out


def limit_image_range(state: DatasetModelState, new_range: tuple[int, int]) -> None:
    """Keep a contiguous block of time planes for a reduced image range (DIALS limit_image_range)."""
    c = state.config
    first0 = c["valid_image_range"][0]
    osc, new_osc_range = reduced_osc_range(c, new_range)
    n_time, time_norm_fac, time_rot = initialise_smooth_input(new_osc_range, osc, c["time_rot_interval"])
    offset = new_parameter_offset(first0, new_range[0], time_norm_fac, c["n_time_param"], n_time)
    if "absorption" in state.params:
        plane = c["n_x_param"] * c["n_y_param"]
        state.params["absorption"] = state.params["absorption"][offset * plane:(offset + n_time) * plane].copy()
    if "decay" in state.params:
        plane = c["n_res_param"]
        state.params["decay"] = state.params["decay"][offset * plane:(offset + n_time) * plane].copy()
    for name in ("absorption", "decay"):
        state.esds.pop(name, None)
    c.update(n_time_param=n_time, time_norm_fac=time_norm_fac, time_rot_interval=time_rot)
    shift_range(c, new_range, osc)


def _geometric_mean(factor: np.ndarray) -> float:
    """exp(mean log f) over the rows with f > 0 (1.0 when there are none)."""
    pos = factor[factor > 0.0]
    return float(np.exp(np.mean(np.log(pos)))) if pos.size else 1.0


def scale_gauge_factors(model: "ScalingModel", params: Mapping[str, np.ndarray],
                        free: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
    """Per-parameter multipliers that remove the undetermined gauge of array models.

    Every array grid is multiplicative and unrestrained, so g -> c g on all rows (absorbed
    by I_h) and, within a data set, decay -> c decay with absorption -> absorption / c
    (g unchanged) leave the objective exactly unchanged: the data do not fix them and the
    minimisers drift along them (quartz, 259 parameters on 298 unique reflections: median g
    3e-4 after the full-matrix round, then 1095 of 1512 rows cut by g < small_scale_cutoff).
    With the multipliers applied, per data set every free grid but the first (decay,
    absorption, modulation order) has geometric mean 1 over the data set's rows and the
    first takes the compensating factor; then the first grids of all data sets share one
    factor that gives g geometric mean 1 over all rows (relative data-set scales are kept).
    g changes by one overall factor only, so I_h g, outliers and the error model do not.

    params: key -> f[n_params_key] (data sets concatenated, as `ScalingModel.params`);
    free: key -> bool[n_params_key] (default all free). Returns key -> f[n_params_key]
    multipliers, or None unless every data set has an array model with all grids of some
    key free (a fixed grid point, or a data set of another model, anchors the scale).
    """
    states = model.states
    if not states or any(s.model_id != MODEL_ID for s in states.values()):
        return None
    keys = [f"{MODEL_ID}.{name}" for name in COMPONENT_ORDER if f"{MODEL_ID}.{name}" in params]
    movable = [k for k in keys if free is None or bool(np.all(np.asarray(free[k])))]
    carriers = {i: next((k for k in movable if i in model.param_slices[k]), None) for i in states}
    if not movable or any(c is None for c in carriers.values()):
        return None
    current = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    factors = {k: np.ones(np.shape(v)) for k, v in current.items()}
    grid = {k: np.asarray(model.components[k].apply(current[k], model.bases[k])) for k in movable}  # f[n_obs]
    for i, carrier in carriers.items():  # loop over data sets (few)
        rows = model.obs_slices[i]
        for k in movable:
            if k == carrier or i not in model.param_slices[k]:
                continue
            c = _geometric_mean(grid[k][rows])  # k / c, carrier * c: g unchanged
            factors[k][model.param_slices[k][i]] /= c
            factors[carrier][model.param_slices[carrier][i]] *= c
    g = np.asarray(model.inverse_scale({k: current[k] * factors[k] for k in current}))  # f[n_obs]
    c_all = _geometric_mean(g)
    for i, carrier in carriers.items():  # loop over data sets: one common factor
        factors[carrier][model.param_slices[carrier][i]] /= c_all
    return factors
