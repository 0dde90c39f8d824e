"""The undetermined gauge of array models (models/array.py `scale_gauge_factors`).

Array grids are multiplicative and unrestrained: an overall factor on g (absorbed by I_h) and
the decay/absorption exchange within a data set leave the objective unchanged. On quartz
(259 parameters, 298 unique reflections) the full-matrix round drifted along them to median
g 3e-4, and g < small_scale_cutoff (0.001) then removed 1095 of 1512 rows (DIALS 3.12: 163).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxscale.data import flags
from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.models import array
from jaxscale.models.build import DatasetInput, build_model
from jaxscale.params import ScaleParams, apply_overrides

LCYS = "lcys_4sweep_dials/reference_dials3.12_scale"
QUARTZ = "quartz_3ded_dials/integrated"
DIALS_QUARTZ_SMALL_SCALE = 163  # dials.scale 3.12 model=array on quartz: "163 reflections excluded: scale factor < 0.001"
DIALS_QUARTZ_N_OBS = 1251  # its merged observations (reference_numbers.md §1.3)


@pytest.fixture(scope="module")
def two_sweeps(shared_data) -> list[DatasetInput]:
    """Suitable rows of two l-cysteine sweeps."""
    table = read_refl(shared_data / LCYS / "scaled.refl")
    experiments = read_expt(shared_data / LCYS / "scaled.expt")
    ok = ~flags.has_any(table["flags"], flags.USER_EXCLUDED_IN_SCALING | flags.EXCLUDED_FOR_SCALING)
    out = []
    for i, expt in enumerate(experiments[:2]):
        rows = ok & (table["id"] == i)
        xyz = table["xyzobs.px.value"][rows]
        out.append(DatasetInput(expt, xyz[:, 2], table["d"][rows], table["s1"][rows], xyz, i))
    return out


@pytest.fixture(scope="module")
def drifted(two_sweeps):
    """Array model of two sweeps with planted grids, shifted far along the gauge (decay x 1e-4)."""
    options = apply_overrides(ScaleParams(), [("model", "array"), ("overwrite_existing_models", "True")])
    model = build_model(two_sweeps, options)
    rng = np.random.default_rng(7)
    params = {k: np.asarray(v) * rng.lognormal(0.0, 0.3, np.shape(v)) for k, v in model.params.items()}
    params["array.decay"] *= 1e-4
    return model, params


def _geometric_mean(v: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(v))))


def test_gauge_factors_change_g_by_one_overall_factor(drifted):
    """g_new / g_old is one constant (so I_h g and every merged ratio are unchanged), g has
    geometric mean 1, each data set's absorption grid geometric mean 1."""
    model, params = drifted
    factors = array.scale_gauge_factors(model, params)
    new = {k: params[k] * factors[k] for k in params}
    g_old = np.asarray(model.inverse_scale(params))
    g_new = np.asarray(model.inverse_scale(new))
    ratio = g_new / g_old
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
    assert ratio[0] > 1e3  # the planted 1e-4 is taken out
    assert _geometric_mean(g_new) == pytest.approx(1.0, rel=1e-12)
    absorption = np.asarray(model.components["array.absorption"].apply(new["array.absorption"],
                                                                       model.bases["array.absorption"]))
    for rows in model.obs_slices.values():
        assert _geometric_mean(absorption[rows]) == pytest.approx(1.0, rel=1e-12)


def test_gauge_factors_respect_fixed_grids_and_other_models(drifted, two_sweeps):
    """A grid with a fixed point is left alone (the other grid carries the factor); nothing
    moves when every grid has one, or for models whose scale is anchored otherwise."""
    model, params = drifted
    free = {k: np.ones(np.shape(v), dtype=bool) for k, v in params.items()}
    free["array.decay"][0] = False
    factors = array.scale_gauge_factors(model, params, free)
    assert np.all(factors["array.decay"] == 1.0)
    g_new = np.asarray(model.inverse_scale({k: params[k] * factors[k] for k in params}))
    assert _geometric_mean(g_new) == pytest.approx(1.0, rel=1e-12)
    free["array.absorption"][3] = False
    assert array.scale_gauge_factors(model, params, free) is None
    physical = build_model(two_sweeps, apply_overrides(ScaleParams(), [("overwrite_existing_models", "True")]))
    assert array.scale_gauge_factors(physical, dict(physical.params)) is None


def _planted_quartz(shared_data, tmp_path, params) -> list[str]:
    """Quartz inputs whose .expt carries an array model with decay grid 1e-4 (a state as far
    along the overall scale as the full-matrix round had drifted)."""
    from jaxscale.io.expt import write_expt

    table = read_refl(shared_data / f"{QUARTZ}.refl")
    experiments = read_expt(shared_data / f"{QUARTZ}.expt")
    expt = experiments[0]
    keep = np.asarray(table["d"]) > 0
    xyz = np.asarray(table["xyzobs.px.value"])[keep]
    data = DatasetInput(expt, xyz[:, 2], np.asarray(table["d"])[keep], np.asarray(table["s1"])[keep], xyz, 0)
    state = array.from_data(data, params)
    state.config["valid_image_range"] = list(expt.image_range)
    stored = {"__id__": "array", "configuration_parameters": state.config}
    for name, values in state.params.items():
        values = values * (1e-4 if name == "decay" else 1.0)
        stored[name] = {"n_parameters": int(values.size), "parameters": [float(v) for v in values],
                        "null_parameter_value": 1.0}
    experiments[0] = dataclasses.replace(expt, scaling_model=stored)
    write_expt(experiments, tmp_path / "planted.expt")
    return [str(shared_data / f"{QUARTZ}.refl"), str(tmp_path / "planted.expt")]


def test_quartz_drifted_overall_scale_is_not_cut_by_small_scale_cutoff(shared_data, tmp_path):
    """model=array on quartz started 1e-4 along the overall scale (L-BFGS rounds only, to be
    fast): without the normalisation every row is below 0.001 and excluded; with it fewer
    rows are cut than DIALS' 163, and more observations are merged than DIALS' 1251."""
    from jaxscale.scale import run

    params = apply_overrides(ScaleParams(), [
        ("model", "array"), ("scaling_options.full_matrix", "False"), ("output.html", "None"),
        ("output.reflections", str(tmp_path / "scaled.refl")), ("output.experiments", str(tmp_path / "scaled.expt")),
        ("output.log", str(tmp_path / "scaled.log"))])
    result = run(params, _planted_quartz(shared_data, tmp_path, params))
    t = result.table
    g = np.asarray(t["inverse_scale_factor"])
    suitable = ~flags.has_any(np.asarray(t["flags"]), flags.USER_EXCLUDED_IN_SCALING) & (np.asarray(t["d"]) > 0)
    n_small = int(np.count_nonzero(suitable & (g < 0.001)))
    assert n_small <= DIALS_QUARTZ_SMALL_SCALE
    assert _geometric_mean(g[suitable & (g > 0)]) == pytest.approx(1.0, rel=0.05)
    assert result.statistics is not None
    assert float(np.ravel(result.statistics.overall.n_obs)[0]) > DIALS_QUARTZ_N_OBS
