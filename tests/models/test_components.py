"""Non-physical components against DIALS, gradients, mixed models, masks and serialisation."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.data import flags
from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.models.build import DatasetInput, build_model, state_from_dials_json
from jaxscale.models.registry import MODEL_TYPES
from jaxscale.params import ScaleParams, apply_overrides

REFERENCE = Path(__file__).resolve().parent / "reference" / "dials_reference.json"
RUN = "lcys_4sweep_dials/reference_dials3.12_scale"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def sweeps(shared_data) -> list[DatasetInput]:
    """Suitable rows of the four lcys sweeps of the DIALS reference run."""
    table = read_refl(shared_data / RUN / "scaled.refl")
    experiments = read_expt(shared_data / RUN / "scaled.expt")
    ok = ~flags.has_any(table["flags"], flags.USER_EXCLUDED_IN_SCALING | flags.EXCLUDED_FOR_SCALING)
    out = []
    for i, expt in enumerate(experiments):
        rows = ok & (table["id"] == i)
        xyz = table["xyzobs.px.value"][rows]
        out.append(DatasetInput(expt, xyz[:, 2], table["d"][rows], table["s1"][rows], xyz, i))
    return out


def test_other_models_match_dials_scales(reference, sweeps):
    for case in [c for c in reference["scales"] if "g" in c]:
        state = state_from_dials_json(case["model"])
        model = build_model([sweeps[0]], ScaleParams(), states=[state])
        g = np.asarray(model.inverse_scale())
        np.testing.assert_allclose(g[case["rows"]], case["g"], rtol=1e-12, err_msg=str(case["options"]))


def test_limit_image_range_matches_dials(reference):
    for case in [c for c in reference["scales"] if "limit_image_range" in c]:
        state = state_from_dials_json(case["before"])
        MODEL_TYPES[state.model_id].limit_image_range(state, tuple(case["limit_image_range"]))
        after = case["after"]
        for name, values in state.params.items():
            np.testing.assert_allclose(values, after[name]["parameters"], rtol=0, atol=0)
        for key, value in after["configuration_parameters"].items():
            if isinstance(value, float) or (isinstance(value, list) and not isinstance(value[0], str)):
                np.testing.assert_allclose(state.config[key], value, rtol=1e-12, err_msg=key)
            else:
                assert state.config[key] == value, key


def perturbed(model, rng):
    return {k: p + jnp.asarray(rng.normal(0, 0.01, p.shape)) for k, p in model.params.items()}


def test_gradient_matches_finite_differences(sweeps):
    rng = np.random.default_rng(1)
    options = apply_overrides(ScaleParams(), {"overwrite_existing_models": True})
    model = build_model(sweeps[:2], options)
    params = perturbed(model, rng)
    bases = model.select(np.arange(0, model.n_obs, 37))
    weights = jnp.asarray(rng.normal(size=bases["physical.scale"]["w"].shape[0]))
    f = jax.jit(lambda p: jnp.sum(weights * model.inverse_scale(p, bases)) + model.restraint_penalty(p))
    grad = jax.grad(f)(params)
    for key in ("physical.scale", "physical.decay", "physical.absorption"):
        for j in rng.choice(len(params[key]), 4, replace=False):
            h = 1e-6
            up = dict(params, **{key: params[key].at[j].add(h)})
            down = dict(params, **{key: params[key].at[j].add(-h)})
            fd = (f(up) - f(down)) / (2 * h)
            np.testing.assert_allclose(grad[key][j], fd, rtol=1e-6, atol=1e-7)


def test_mixed_models_union(sweeps):
    """Sweep 0 physical, sweep 1 KB: each observation gets factor 1 from the other's components."""
    kb = MODEL_TYPES["KB"].from_data(sweeps[1], ScaleParams())
    phys = MODEL_TYPES["physical"].from_data(sweeps[0], ScaleParams())
    phys.config["valid_image_range"] = [1, 1800]
    model = build_model(sweeps[:2], ScaleParams(), states=[phys, kb])
    assert set(model.components) == {"physical.scale", "physical.decay", "physical.absorption",
                                     "KB.scale", "KB.decay"}
    rng = np.random.default_rng(2)
    params = perturbed(model, rng)
    params["KB.scale"] = jnp.array([2.0])
    params["KB.decay"] = jnp.array([-3.0])
    g = np.asarray(model.inverse_scale(params))
    s0, s1 = model.obs_slices[0], model.obs_slices[1]
    d1 = sweeps[1].d
    np.testing.assert_allclose(g[s1], 2.0 * np.exp(-3.0 / (2 * d1 * d1)), rtol=1e-14)
    only_phys = build_model(sweeps[:1], ScaleParams(), states=[phys])
    sub = {k: v for k, v in params.items() if k.startswith("physical")}
    np.testing.assert_allclose(g[s0], np.asarray(only_phys.inverse_scale(sub)), rtol=1e-14)
    assert model.consecutive_order == [["physical.scale", "physical.decay", "KB.scale", "KB.decay"],
                                       ["physical.absorption"]]
    kb_json = model.to_dials_json(1, params)
    assert kb_json["configuration_parameters"]["corrections"] == ["decay", "scale"]
    assert list(kb_json)[:3] == ["__id__", "scale", "decay"] and kb_json["scale"]["parameters"] == [2.0]


def test_masks_restraints_and_sharing(sweeps):
    options = apply_overrides(ScaleParams(), {"overwrite_existing_models": True,
                                              "physical.correction.fix": "decay",
                                              "physical.share.absorption": True})
    model = build_model(sweeps, options)
    n_scale = 14 * 4
    assert model.fixed_mask["physical.decay"].all() and not model.fixed_mask["physical.scale"].any()
    final = model.final_fixed_mask["physical.scale"]
    assert final[0] and final.sum() == 1 and len(final) == n_scale
    assert len(model.params["physical.absorption"]) == 24  # shared across the four sweeps
    weights = np.asarray(model.components["physical.absorption"].restraint_weights)
    np.testing.assert_array_equal(weights, np.full(24, 5e5))
    np.testing.assert_array_equal(np.asarray(model.components["physical.decay"].restraint_weights),
                                  np.full(11 * 4, 0.1))
    assert model.components["physical.scale"].restraint_weights is None


def test_continue_from_saved_model_and_lmax_update(sweeps):
    options = SimpleNamespace(physical=SimpleNamespace(lmax=6, surface_weight="auto", absorption_level=None,
                                                       correction=SimpleNamespace(fix=None)))
    model = build_model(sweeps[:1], options)
    saved = sweeps[0].experiment.scaling_model
    assert model.states[0].is_scaled and model.states[0].config["lmax"] == 6
    absorption = np.asarray(model.params["physical.absorption"])
    assert len(absorption) == 48
    np.testing.assert_array_equal(absorption[:24], saved["absorption"]["parameters"])
    assert not absorption[24:].any()


def test_lookup_mode_is_close_to_exact(sweeps):
    options = apply_overrides(ScaleParams(), {"overwrite_existing_models": True})
    exact = build_model(sweeps[:1], options, exact_harmonics=True)
    lookup = build_model(sweeps[:1], options, exact_harmonics=False)
    a_exact = np.asarray(exact.bases["physical.absorption"]["w"])
    a_lookup = np.asarray(lookup.bases["physical.absorption"]["w"])
    diff = np.abs(a_exact - a_lookup).max()
    assert 1e-6 < diff < 0.05  # piecewise-constant 0.5 degree table: different but close


def test_fixed_initial_esd_written_as_zero(sweeps):
    model = build_model(sweeps[:2], apply_overrides(ScaleParams(), {"overwrite_existing_models": True}))
    esds = {k: np.full(len(p), 0.5) for k, p in model.params.items()}
    first = model.to_dials_json(0, esds=esds, error_model=(1.1, 0.02), imid=1)
    second = model.to_dials_json(1, esds=esds)
    assert first["scale"]["est_standard_devs"][:2] == [0.0, 0.5]
    assert second["scale"]["est_standard_devs"][0] == 0.5
    cfg = first["configuration_parameters"]
    assert cfg["error_model_type"] == "BasicErrorModel" and cfg["error_model_parameters"] == [1.1, 0.02]
    assert cfg["Imid"] == 1 and "error_model_type" not in second["configuration_parameters"]
