"""Build the scaling model of all data sets: choose/configure/load each data set's DIALS
model, then assemble one flat parameter array and one per-observation basis per component.

`build_model(datasets, options) -> ScalingModel`. The observations of all data sets are
concatenated in the order of `datasets`; a component that a data set's model lacks gives
its observations the factor 1. Component keys are '<model id>.<DIALS name>' (e.g.
'physical.scale'), so mixed models (physical + KB) are a union of components.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jaxscale.exceptions import ParameterError
from jaxscale.models.component import Basis, Component, inverse_scale, restraint_penalty
from jaxscale.models.inputs import DatasetInput, DatasetModelState
from jaxscale.models.linear import ComponentEntry
from jaxscale.models.registry import COMPONENTS, MODEL_TYPES, component_key
from jaxscale.models.rules import is_auto, option, shared_components

__all__ = ["DatasetInput", "DatasetModelState", "ScalingModel", "build_model", "choose_model_id",
           "dataset_state", "state_from_dials_json"]


@dataclass
class ScalingModel:
    """All data sets' scaling models as pure components over precomputed bases."""

    components: dict[str, Component]  # key '<model>.<name>' -> Component
    params: dict[str, jax.Array]  # key -> f[n_params_key], data sets concatenated
    bases: dict[str, dict[str, jax.Array]]  # key -> basis arrays over all observations
    fixed_mask: dict[str, np.ndarray]  # key -> bool[n_params_key]: not refined (correction.fix)
    final_fixed_mask: dict[str, np.ndarray]  # fixed_mask + fix_initial (final full-matrix round)
    param_slices: dict[str, dict[int, slice]]  # key -> dataset_index -> slice of params[key]
    obs_slices: dict[int, slice]  # dataset_index -> rows of the concatenated observations
    states: dict[int, DatasetModelState]  # dataset_index -> DIALS model id/config/component names
    dataset_indices: list[int] = field(default_factory=list)  # in observation order
    consecutive_order: list[list[str]] = field(default_factory=list)  # keys per consecutive cycle
    # LM iterations of the final full-matrix pass with final_fixed_mask (0: that pass only
    # gives the covariance, conditional on the extra fixed parameters)
    final_iterations: int = 1

    @property
    def n_obs(self) -> int:
        return max((s.stop for s in self.obs_slices.values()), default=0)

    def inverse_scale(self, params: Mapping[str, jax.Array] | None = None,
                      bases: Mapping[str, Basis] | None = None) -> jax.Array:
        """g f[n_obs] = product of the component factors (pure; jit/grad through params)."""
        return inverse_scale(self.components, self.params if params is None else params,
                             self.bases if bases is None else bases)

    def restraint_penalty(self, params: Mapping[str, jax.Array] | None = None) -> jax.Array:
        return restraint_penalty(self.components, self.params if params is None else params)

    def select(self, rows: np.ndarray) -> dict[str, dict[str, jax.Array]]:
        """Bases for a subset of observations (bool mask or integer rows)."""
        return jax.tree.map(lambda a: a[rows], self.bases)

    def dataset_parameters(self, dataset_index: int, params: Mapping[str, Any] | None = None
                           ) -> dict[str, np.ndarray]:
        """DIALS component name -> this data set's parameters (numpy), DIALS order."""
        params = self.params if params is None else params
        state = self.states[dataset_index]
        out = {}
        for name in state.params:
            key = component_key(state.model_id, name)
            out[name] = np.asarray(params[key])[self.param_slices[key][dataset_index]]
        return out

    def updated_states(self, params: Mapping[str, Any] | None = None) -> dict[int, DatasetModelState]:
        """Copies of the per-data-set states carrying the given parameters."""
        out = {}
        for i, state in self.states.items():
            new = copy.deepcopy(state)
            new.params = self.dataset_parameters(i, params)
            out[i] = new
        return out

    def to_dials_json(self, dataset_index: int, params: Mapping[str, Any] | None = None,
                      esds: Mapping[str, Any] | None = None,
                      error_model: tuple[float, float] | None = None,
                      imid: float | None = None) -> dict:
        """The .expt `scaling_model` dict of one data set (models.md §8).

        esds: like params (flat per key), or None (no est_standard_devs written); a fixed
        first scale parameter should carry esd 0.0. error_model: basic (a, b). imid: 0 for
        profile, 1 for summation, else the combination Imid.
        """
        state = self.states[dataset_index]
        values = self.dataset_parameters(dataset_index, params)
        module = MODEL_TYPES[state.model_id]
        out: dict[str, Any] = {"__id__": state.model_id}
        for name in module.COMPONENT_ORDER:
            if name not in values:
                continue
            entry = {"n_parameters": int(len(values[name])),
                     "parameters": [float(v) for v in values[name]],
                     "null_parameter_value": module.NULL_VALUES[name]}
            if esds is not None:
                key = component_key(state.model_id, name)
                sl = self.param_slices[key][dataset_index]
                values_esd = np.array(esds[key], dtype=np.float64)
                values_esd[self.final_fixed_mask[key] & ~self.fixed_mask[key]] = 0.0  # fix_initial
                entry["est_standard_devs"] = [float(v) for v in values_esd[sl]]
            elif name in state.esds:
                entry["est_standard_devs"] = [float(v) for v in state.esds[name]]
            out[name] = entry
        config = copy.deepcopy(state.config)
        if error_model is not None:
            config["error_model_type"] = "BasicErrorModel"
            config["error_model_parameters"] = [float(error_model[0]), float(error_model[1])]
        if imid is not None:
            config["Imid"] = float(imid) if imid not in (0, 1) else int(imid)
        out["configuration_parameters"] = config
        return out


def state_from_dials_json(obj: Mapping[str, Any]) -> DatasetModelState:
    """A saved .expt `scaling_model` dict -> state (to continue scaling: incremental mode)."""
    model_id = obj.get("__id__")
    if model_id not in MODEL_TYPES:
        raise ParameterError(f"unknown scaling model type {model_id!r} in the input experiments")
    module = MODEL_TYPES[model_id]
    config = copy.deepcopy(dict(obj["configuration_parameters"]))
    params, esds = {}, {}
    for name in module.COMPONENT_ORDER:
        if name in config["corrections"]:
            params[name] = np.asarray(obj[name]["parameters"], dtype=np.float64)
            if "est_standard_devs" in obj[name]:
                esds[name] = np.asarray(obj[name]["est_standard_devs"], dtype=np.float64)
    return DatasetModelState(model_id, config, params, esds, [], is_scaled=True)


def choose_model_id(experiment: Any, options: Any) -> str:
    """`model=` or auto: stills or sweeps narrower than 1 degree -> KB, else physical."""
    model = option(options, "model", None)
    if not is_auto(model):
        if model not in MODEL_TYPES:
            raise ParameterError(f"model={model} is not one of {', '.join(MODEL_TYPES)}")
        return model
    if experiment.is_still:
        return "KB"
    start, end = experiment.osc_range
    return "KB" if abs(end - start) < 1.0 else "physical"


def _dataset_state(data: DatasetInput, options: Any) -> DatasetModelState:
    expt = data.experiment
    saved = getattr(expt, "scaling_model", None)
    if saved and not option(options, "overwrite_existing_models", False):
        state = state_from_dials_json(saved)
        MODEL_TYPES[state.model_id].update(state, options)
        return state
    model_id = choose_model_id(expt, options)
    if model_id != "KB" and expt.is_still:
        raise ParameterError(f"model={model_id} needs a rotation scan; data set {data.dataset_index} "
                             "has none (use model=KB)")
    state = MODEL_TYPES[model_id].from_data(data, options)
    if not expt.is_still:  # DIALS set_image_ranges_in_scaling_models
        state.config.setdefault("valid_image_range", list(expt.image_range))
    return state


def dataset_state(data: DatasetInput, options: Any) -> DatasetModelState:
    """Data set's model state before the bases are built: loaded from its scaled .expt
    (unless overwrite_existing_models), else chosen by `choose_model_id` and configured
    from its data. Callers may adjust it (e.g. limit the image range) and pass the states
    to `build_model(states=...)`."""
    return _dataset_state(data, options)


def build_model(datasets: Sequence[DatasetInput], options: Any, *,
                states: Sequence[DatasetModelState] | None = None,
                exact_harmonics: bool | None = None) -> ScalingModel:
    """Scaling model of all data sets over their suitable observations.

    options: any object with DIALS option attributes (jaxscale.params.ScaleParams).
    states: per-data-set model states to use instead of creating/loading them (e.g. after
    `limit_image_range`). exact_harmonics: None = DIALS (lookup table above 100000 rows),
    True = always exact, False = always the lookup table.
    """
    if not datasets:
        raise ParameterError("no data sets to scale")
    if states is None:
        states = [_dataset_state(data, options) for data in datasets]
    indices = [int(data.dataset_index) for data in datasets]
    if len(set(indices)) != len(indices):
        raise ValueError("dataset_index values must be unique")
    n_obs = [data.n_obs for data in datasets]
    # per data set: component entries, keyed by '<model>.<name>' (first-appearance order)
    per_key: dict[str, list[ComponentEntry | None]] = {}
    shared_keys: set[str] = set()
    for pos, (data, state) in enumerate(zip(datasets, states)):
        module = MODEL_TYPES[state.model_id]
        for name, entry in module.entries(state, data, options, exact_harmonics).items():
            key = component_key(state.model_id, name)
            per_key.setdefault(key, [None] * len(datasets))[pos] = entry
        shared_keys |= {component_key(state.model_id, n) for n in shared_components(state)}

    components, params, bases, slices = {}, {}, {}, {}
    for key, entries in per_key.items():
        model_id, name = key.split(".", 1)
        configured = COMPONENTS[(model_id, name)](key, entries, n_obs, key in shared_keys)
        components[key] = configured.component
        # device_put: a plain host-to-device copy (jnp.asarray compiles a program per dtype/shape)
        params[key] = jax.device_put(np.asarray(configured.params))
        bases[key] = {k: jax.device_put(np.asarray(v)) for k, v in configured.basis.items()}
        slices[key] = {indices[pos]: sl for pos, sl in configured.slices.items()}

    fixed = {key: np.zeros(len(p), dtype=bool) for key, p in params.items()}
    for index, state in zip(indices, states):
        for name in state.fixed_components:
            key = component_key(state.model_id, name)
            if key in slices and index in slices[key]:
                fixed[key][slices[key][index]] = True
    final_fixed = {key: mask.copy() for key, mask in fixed.items()}
    for index, state in zip(indices, states):  # DIALS: the first physical/dose_decay model decides
        if state.model_id in ("physical", "dose_decay"):
            key = component_key(state.model_id, "scale")
            if option(options, f"{state.model_id}.fix_initial", True) and key in slices:
                final_fixed[key][slices[key][index].start] = True
            break

    bounds = np.concatenate([[0], np.cumsum(n_obs)])
    obs_slices = {index: slice(int(bounds[p]), int(bounds[p + 1])) for p, index in enumerate(indices)}
    consecutive: list[list[str]] = []
    for state in states:
        for cycle, names in enumerate(MODEL_TYPES[state.model_id].CONSECUTIVE_ORDER):
            keys = [component_key(state.model_id, n) for n in names if component_key(state.model_id, n) in params]
            while len(consecutive) <= cycle:
                consecutive.append([])
            consecutive[cycle] += [k for k in keys if k not in consecutive[cycle]]
    consecutive = [c for c in consecutive if c]
    return ScalingModel(components, params, bases, fixed, final_fixed, slices, obs_slices,
                        dict(zip(indices, states)), indices, consecutive)
