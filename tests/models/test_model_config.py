"""Model creation rules against DIALS 3.12 `from_data` (quartz, lcys_20) and reference_numbers.md."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.models.build import DatasetInput, build_model, choose_model_id
from jaxscale.models.rules import initialise_smooth_input
from jaxscale.params import ScaleParams, apply_overrides

REFERENCE = Path(__file__).resolve().parent / "reference" / "dials_reference.json"
STEMS = {"quartz": "quartz_3ded_dials/integrated",
         "lcys_20": "lcys_4sweep_dials/integrated/lcys_20_integrated"}


@pytest.fixture(scope="module")
def inputs(shared_data):
    """Per data set: a DatasetInput over all rows with d > 0 (DIALS passes the input table)."""
    out = {}
    for name, stem in STEMS.items():
        table = read_refl(shared_data / f"{stem}.refl")
        expt = read_expt(shared_data / f"{stem}.expt")[0]
        rows = table["d"] > 0
        xyz = table["xyzobs.px.value"][rows]
        out[name] = DatasetInput(expt, xyz[:, 2], table["d"][rows], table["s1"][rows], xyz, 0)
    return out


def assert_config_close(ours: dict, dials: dict) -> None:
    assert list(ours) == list(dials)
    for key, value in dials.items():
        if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
            np.testing.assert_allclose(ours[key], value, rtol=1e-12, atol=1e-12, err_msg=key)
        else:
            assert ours[key] == value, key


def test_models_match_dials_from_data(inputs):
    for case in json.loads(REFERENCE.read_text())["models"]:
        options = apply_overrides(ScaleParams(), [opt.split("=") for opt in case["options"]])
        data = inputs[case["data"]]
        model = build_model([data], options)
        ours = model.to_dials_json(0)
        dials = case["model"]
        config = dict(ours["configuration_parameters"])
        assert config.pop("valid_image_range") == list(data.experiment.image_range)
        assert_config_close(config, dials["configuration_parameters"])
        names = [k for k in dials if k not in ("__id__", "configuration_parameters")]
        assert [k for k in ours if k not in ("__id__", "configuration_parameters")] == names
        for name in names:
            assert ours[name] == dials[name], (case["options"], name)


def test_reference_numbers(inputs):
    """reference_numbers.md: parameter counts and norm_facs of quartz and lcys_20."""
    expect = {"quartz": {"physical": (9, 7, 24, 0.06993, 0.04995), "array": (84, 175)},
              "lcys_20": {"physical": (14, 11, 24, 0.00666, 0.004995), "array": (132, 275)}}
    for name, data in inputs.items():
        model = build_model([data], ScaleParams())
        assert choose_model_id(data.experiment, ScaleParams()) == "physical"
        cfg = model.states[0].config
        n = [len(model.params[f"physical.{c}"]) for c in ("scale", "decay", "absorption")]
        assert tuple(n) == expect[name]["physical"][:3]
        np.testing.assert_allclose([cfg["s_norm_fac"], cfg["d_norm_fac"]], expect[name]["physical"][3:], rtol=1e-12)
        array = build_model([data], apply_overrides(ScaleParams(), {"model": "array"}))
        assert (len(array.params["array.decay"]), len(array.params["array.absorption"])) == expect[name]["array"]
    assert inputs["lcys_20"].experiment is not None


def test_smooth_input_rule():
    assert initialise_smooth_input((0, 100), 1.0, 15.0)[0] == 9
    assert initialise_smooth_input((0, 100), 1.0, 20.0)[:2] == (7, pytest.approx(0.04995))
    assert initialise_smooth_input((0, 10), 1.0, 15.0)[0] == 2
    assert initialise_smooth_input((0, 20), 1.0, 15.0)[0] == 3


def test_auto_model_choice(inputs):
    class Narrow:
        is_still = False
        osc_range = (0.0, 0.5)

    class Still:
        is_still = True

    assert choose_model_id(Narrow(), ScaleParams()) == "KB"
    assert choose_model_id(Still(), ScaleParams()) == "KB"
    assert choose_model_id(inputs["quartz"].experiment, apply_overrides(ScaleParams(), {"model": "array"})) == "array"
