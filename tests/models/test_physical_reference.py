"""Decisive check: rebuild g from the parameters DIALS 3.12 stored for the 4-sweep lcys run
and compare with the inverse_scale_factor column of its scaled.refl (suitable rows)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxscale.data import flags
from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.models.build import DatasetInput, build_model

RUN = "lcys_4sweep_dials/reference_dials3.12_scale"


def suitable_inputs(table, experiments):
    """Per-sweep DatasetInputs of rows that are neither user-excluded nor excluded for scaling."""
    ok = ~flags.has_any(table["flags"], flags.USER_EXCLUDED_IN_SCALING | flags.EXCLUDED_FOR_SCALING)
    out, g_ref = [], []
    for i, expt in enumerate(experiments):
        rows = ok & (table["id"] == i)
        xyz = table["xyzobs.px.value"][rows]
        out.append(DatasetInput(expt, xyz[:, 2], table["d"][rows], table["s1"][rows], xyz, i))
        g_ref.append(table["inverse_scale_factor"][rows])
    return out, np.concatenate(g_ref)


@pytest.fixture(scope="module")
def lcys_run(shared_data):
    table = read_refl(shared_data / RUN / "scaled.refl")
    experiments = read_expt(shared_data / RUN / "scaled.expt")
    return table, experiments


def test_inverse_scale_matches_dials_four_sweeps(lcys_run):
    table, experiments = lcys_run
    datasets, g_ref = suitable_inputs(table, experiments)
    model = build_model(datasets, options=None)  # saved models are continued
    assert list(model.components) == ["physical.scale", "physical.decay", "physical.absorption"]
    sl = model.param_slices["physical.scale"]
    assert [sl[i].stop - sl[i].start for i in range(4)] == [14] * 4
    g = np.asarray(jax.jit(model.inverse_scale)(model.params))
    rel = np.abs(g - g_ref) / np.abs(g_ref)
    assert len(g) == len(g_ref) > 11914  # every suitable row (11914 were finally scaled)
    assert rel.max() < 1e-9, rel.max()


def test_round_trip_to_dials_json(lcys_run):
    _, experiments = lcys_run
    table, _ = lcys_run
    datasets, _ = suitable_inputs(table, experiments)
    model = build_model(datasets, options=None)
    for i, expt in enumerate(experiments):
        saved = expt.scaling_model
        cfg = saved["configuration_parameters"]
        out = model.to_dials_json(i, error_model=tuple(cfg["error_model_parameters"]), imid=cfg["Imid"])
        assert out["__id__"] == "physical"
        assert out["configuration_parameters"] == cfg
        for name in ("scale", "decay", "absorption"):
            assert out[name]["parameters"] == saved[name]["parameters"]
            assert out[name]["est_standard_devs"] == saved[name]["est_standard_devs"]
            assert out[name]["null_parameter_value"] == saved[name]["null_parameter_value"]
