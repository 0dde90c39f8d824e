"""The dose_decay model (`id "dose_decay"`): smooth scale x relative B x dose decay [x SH].

Dose decay: g = exp(C z / d^2) (quadratic, default) or exp(C z / d) (linear), z the raw
image coordinate; with share.decay (default) one C for all sweeps.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxscale.models import absorption, kb, scale
from jaxscale.models.inputs import DatasetInput, DatasetModelState
from jaxscale.models.linear import (
    ComponentEntry,
    ConfiguredComponent,
    apply_exp,
    assemble,
    single_parameter_rows,
)
from jaxscale.models.physical import limit_smoothed_components
from jaxscale.models.rules import (
    fixed_components,
    initialise_smooth_input,
    option,
    update_fixed_components,
)

MODEL_ID = "dose_decay"
COMPONENT_ORDER = ("scale", "decay", "relative_B", "absorption")
NULL_VALUES = {"scale": 1.0, "decay": 0.0, "relative_B": 0.0, "absorption": 0.0}
CONSECUTIVE_ORDER = [["scale", "relative_B", "decay"], ["absorption"]]


def dose_entry(params: np.ndarray, z_px: np.ndarray, d: np.ndarray, dependence: str) -> ComponentEntry:
    """Rows of exp(C x / d^n): one parameter with weight z / d^2 (quadratic) or z / d (linear)."""
    d = np.asarray(d, dtype=np.float64)
    z = np.asarray(z_px, dtype=np.float64)
    weight = z / d if dependence == "linear" else z / (d ** 2)
    idx, w = single_parameter_rows(len(d), weight)
    return ComponentEntry(np.asarray(params, dtype=np.float64), idx, w)


def configure_dose(name: str, entries: Sequence[ComponentEntry | None], n_obs: Sequence[int],
                   shared: bool = False) -> ConfiguredComponent:
    return assemble(name, apply_exp, entries, n_obs, shared)



def from_data(data: DatasetInput, options: Any) -> DatasetModelState:
    expt = data.experiment
    osc_range, width = expt.osc_range, expt.oscillation[1]
    config: dict = {"corrections": ["scale"], "valid_osc_range": list(osc_range)}
    if option(options, "dose_decay.share.decay", True):
        config["shared"] = ["decay"]
    n_scale, s_norm_fac, scale_rot = initialise_smooth_input(
        osc_range, width, float(option(options, "dose_decay.scale_interval", 2.0)))
    config.update(s_norm_fac=s_norm_fac, scale_rot_interval=scale_rot)
    params: dict[str, np.ndarray] = {"scale": np.ones(n_scale)}
    if option(options, "dose_decay.relative_B_correction", True):
        config["corrections"].append("relative_B")
        params["relative_B"] = np.zeros(1)
    if option(options, "dose_decay.decay_correction", True):
        config["corrections"].append("decay")
        config["resolution_dependence"] = option(options, "dose_decay.resolution_dependence", "quadratic")
        params["decay"] = np.zeros(1)
    if option(options, "dose_decay.absorption_correction", False):
        config["corrections"].append("absorption")
        lmax = int(option(options, "dose_decay.lmax", 4))
        config.update(lmax=lmax, abs_surface_weight=float(option(options, "dose_decay.surface_weight", 1e6)))
        params["absorption"] = np.zeros(lmax * (2 + lmax))
    params = {name: params[name] for name in COMPONENT_ORDER if name in params}
    return DatasetModelState(MODEL_ID, config, params,
                             fixed_components=fixed_components(options, MODEL_ID))


update = update_fixed_components  # new options on a loaded dose_decay model change only its fixed components


def entries(state: DatasetModelState, data: DatasetInput, options: Any,
            exact_harmonics: bool | None = None) -> dict[str, ComponentEntry]:
    c, p = state.config, state.params
    out = {}
    if "scale" in p:
        out["scale"] = scale.entry(p["scale"], data.z_px, c["s_norm_fac"])
    if "decay" in p:
        out["decay"] = dose_entry(p["decay"], data.z_px, data.d, c.get("resolution_dependence", "quadratic"))
    if "relative_B" in p:
        out["relative_B"] = kb.single_b_entry(p["relative_B"], data.d)
    if "absorption" in p:
        harmonics = absorption.harmonics_for_dataset(data.experiment, data.z_px, data.s1, c["lmax"],
                                                     exact_harmonics)
        out["absorption"] = absorption.entry(p["absorption"], harmonics, c["abs_surface_weight"])
    return out


def limit_image_range(state: DatasetModelState, new_range: tuple[int, int]) -> None:
    """Slice the scale parameters for a reduced image range (DIALS DoseDecay.limit_image_range)."""
    limit_smoothed_components(state, new_range, (("scale", "s_norm_fac", "scale_rot_interval"),))
