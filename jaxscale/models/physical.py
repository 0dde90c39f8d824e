"""The physical model (`id "physical"`): smooth scale x smooth B decay x SH absorption."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxscale.models import absorption, decay, scale
from jaxscale.models.inputs import DatasetInput, DatasetModelState
from jaxscale.models.linear import ComponentEntry
from jaxscale.models.rules import (
    absorption_level_params,
    auto_intervals,
    fixed_components,
    initialise_smooth_input,
    is_auto,
    new_parameter_offset,
    option,
    reduced_osc_range,
    update_fixed_components,
)

MODEL_ID = "physical"
COMPONENT_ORDER = ("scale", "decay", "absorption")
NULL_VALUES = {"scale": 1.0, "decay": 0.0, "absorption": 0.0}
CONSECUTIVE_ORDER = [["scale", "decay"], ["absorption"]]

def from_data(data: DatasetInput, options: Any) -> DatasetModelState:
    """New physical model for a sweep (DIALS PhysicalScalingModel.from_data + image range)."""
    expt = data.experiment
    osc_range = expt.osc_range
    width = expt.oscillation[1]
    abs_range = abs(osc_range[1] - osc_range[0])
    scale_interval = option(options, "physical.scale_interval", "auto")
    decay_interval = option(options, "physical.decay_interval", "auto")
    auto_scale, auto_decay = auto_intervals(abs_range)
    scale_interval = auto_scale if is_auto(scale_interval) else float(scale_interval)
    decay_interval = auto_decay if is_auto(decay_interval) else float(decay_interval)

    config: dict = {"corrections": ["scale"], "valid_osc_range": list(osc_range)}
    params: dict[str, np.ndarray] = {}
    n_scale, s_norm_fac, scale_rot = initialise_smooth_input(osc_range, width, scale_interval)
    config.update(s_norm_fac=s_norm_fac, scale_rot_interval=scale_rot)
    params["scale"] = np.ones(n_scale)
    if option(options, "physical.decay_correction", True):
        config["corrections"].append("decay")
        n_decay, d_norm_fac, decay_rot = initialise_smooth_input(osc_range, width, decay_interval)
        config.update(d_norm_fac=d_norm_fac, decay_rot_interval=decay_rot)
        params["decay"] = np.zeros(n_decay)
    absorption_on = option(options, "physical.absorption_correction", "auto")
    absorption_on = abs_range > 60.0 if is_auto(absorption_on) else bool(absorption_on)
    level = option(options, "physical.absorption_level", None)
    if absorption_on or level:
        config["corrections"].append("absorption")
        if option(options, "physical.share.absorption", False):
            config["shared"] = ["absorption"]
        if level:
            lmax, surface_weight = absorption_level_params(level)
        else:
            lmax = option(options, "physical.lmax", "auto")
            surface_weight = option(options, "physical.surface_weight", "auto")
            lmax = 4 if is_auto(lmax) else int(lmax)
            surface_weight = 5e5 if is_auto(surface_weight) else float(surface_weight)
        config.update(lmax=lmax, abs_surface_weight=surface_weight)
        params["absorption"] = np.zeros(lmax * lmax + 2 * lmax)
    return DatasetModelState(MODEL_ID, config, params,
                             fixed_components=fixed_components(options, MODEL_ID))


def update(state: DatasetModelState, options: Any) -> None:
    """Apply new options to a loaded model (DIALS PhysicalScalingModel.update)."""
    update_fixed_components(state, options)
    if "absorption" not in state.params:
        return
    config = state.config
    level = option(options, "physical.absorption_level", None)
    new_lmax = None
    if level:
        lmax, surface_weight = absorption_level_params(level)
        config["abs_surface_weight"] = surface_weight
        new_lmax = lmax if lmax != config["lmax"] else None
    else:
        surface_weight = option(options, "physical.surface_weight", "auto")
        if not is_auto(surface_weight):
            config["abs_surface_weight"] = float(surface_weight)
        lmax = option(options, "physical.lmax", "auto")
        if not is_auto(lmax) and int(lmax) != config["lmax"]:
            new_lmax = int(lmax)
    if new_lmax:
        old = state.params["absorption"]
        new = np.zeros(new_lmax * (2 + new_lmax))
        n = min(len(new), len(old))
        new[:n] = old[:n]
        config["lmax"] = new_lmax
        state.params["absorption"] = new
        state.esds.pop("absorption", None)
    if option(options, "physical.share.absorption", False):
        config["shared"] = ["absorption"]


def entries(state: DatasetModelState, data: DatasetInput, options: Any,
            exact_harmonics: bool | None = None) -> dict[str, ComponentEntry]:
    """Per-observation basis rows of each component for this data set's suitable rows."""
    config, p = state.config, state.params
    out = {}
    if "scale" in p:
        out["scale"] = scale.entry(p["scale"], data.z_px, config["s_norm_fac"])
    if "decay" in p:
        out["decay"] = decay.entry(p["decay"], data.z_px, config["d_norm_fac"], data.d,
                                   option(options, "physical.decay_restraint", 0.1))
    if "absorption" in p:
        harmonics = absorption.harmonics_for_dataset(data.experiment, data.z_px, data.s1,
                                                     config["lmax"], exact_harmonics)
        out["absorption"] = absorption.entry(p["absorption"], harmonics, config["abs_surface_weight"])
    return out


def limit_image_range(state: DatasetModelState, new_range: tuple[int, int]) -> None:
    """Re-parameterise for a reduced image range (models.md §4.5, DIALS limit_image_range)."""
    limit_smoothed_components(state, new_range, (("scale", "s_norm_fac", "scale_rot_interval"),
                                                 ("decay", "d_norm_fac", "decay_rot_interval")))


def limit_smoothed_components(state: DatasetModelState, new_range: tuple[int, int],
                              components: Sequence[tuple[str, str, str]]) -> None:
    """Keep the parameter slice of each rotation-smoothed component covering new_range.

    components: (name, norm_fac config key, rot_interval config key); the valid ranges shift too.
    """
    config = state.config
    first0 = config["valid_image_range"][0]
    osc, new_osc_range = reduced_osc_range(config, new_range)
    for name, fac_key, int_key in components:
        if name not in state.params:
            continue
        n_new, norm_fac, rot_int = initialise_smooth_input(new_osc_range, osc, config[int_key])
        old = state.params[name]
        offset = new_parameter_offset(first0, new_range[0], norm_fac, len(old), n_new)
        config[int_key], config[fac_key] = rot_int, norm_fac
        state.params[name] = old[offset: offset + n_new].copy()
        state.esds.pop(name, None)
    shift_range(config, new_range, osc)


def shift_range(config: dict, new_range: tuple[int, int], osc: float) -> None:
    """Update valid_osc_range / valid_image_range for a new image range."""
    (i0, i1), (o0, o1) = config["valid_image_range"], config["valid_osc_range"]
    config["valid_osc_range"] = [o0 + (new_range[0] - i0) * osc, o1 + (new_range[1] - i1) * osc]
    config["valid_image_range"] = [int(new_range[0]), int(new_range[1])]
