"""The parameter schema against DIALS 3.12's own definitions and command-line rules.

Reference: tests/cli/reference/dials_defaults.json, written by make_dials_defaults.py from
``dials.scale -c -a 2 -e 10`` and DIALS' libtbx command-line interpreter.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxscale.exceptions import ParameterError
from tests.conftest import requires_dials
from jaxscale.params import (AUTO, ScaleParams, apply_overrides, check_conflicts, diff_from_defaults,
                             explain_conflicts, format_phil, is_auto, iter_parameters, params_from_dict,
                             resolve_key, resolve_key_verbose, _leaves)

REFERENCE = json.loads((Path(__file__).parent / "reference" / "dials_defaults.json").read_text())
DIALS = REFERENCE["parameters"]
OURS = {info.path: info for info in iter_parameters()}


def _normalise(value):
    if isinstance(value, tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, list):
        return [_normalise(v) for v in value] or None
    return value


def test_every_dials_parameter_present_and_nothing_invented():
    assert set(DIALS) <= set(OURS), sorted(set(DIALS) - set(OURS))
    extras = set(OURS) - set(DIALS)
    assert extras == {"weighting.likelihood", "weighting.student_t_dof", "weighting.huber_delta",
                      "compute.precision", "compute.n_devices", "compute.serial"}
    assert all(_leaves()[p].jaxscale for p in extras)
    assert not any(_leaves()[p].jaxscale for p in DIALS)
    assert [p for p in OURS if p in DIALS] == list(DIALS)  # same order as DIALS


RENAMED_OUTPUTS = {"output.log": "jaxscale.log", "output.html": "jaxscale.html"}


@pytest.mark.parametrize("path", list(DIALS))
def test_default_type_choices_level_match_dials(path):
    ref, ours, leaf = DIALS[path], OURS[path], _leaves()[path]
    assert ours.type == ref["type"]
    if path in RENAMED_OUTPUTS:  # our own program's file names, deliberately not DIALS'
        assert ours.default == RENAMED_OUTPUTS[path] and ref["default"].startswith("dials.scale.")
    else:
        assert _normalise(ours.default) == _normalise(ref["default"])
    assert ours.expert_level == ref["expert_level"]
    assert leaf.own_level == ref["own_expert_level"]
    assert leaf.multiple == ref["multiple"]
    if ref["type"] == "choice":
        assert list(ours.choices) == ref["choices"]
    else:
        assert ours.choices is None


@pytest.mark.parametrize("path", [p for p in DIALS if "value_min" in DIALS[p]["type"]])
def test_value_min_enforced_like_dials(path):
    low = float(DIALS[path]["type"].split("value_min=")[1].split(",")[0].rstrip(")"))
    below = low - 1 if "int" in DIALS[path]["type"] else low - 0.5 * max(abs(low), 1e-6)
    at = int(low) if "int(" in DIALS[path]["type"] else low
    assert apply_overrides(ScaleParams(), {path: str(at)})  # the bound itself is allowed
    with pytest.raises(ParameterError, match=path.replace(".", r"\.")):
        apply_overrides(ScaleParams(), {path: str(below)})


@pytest.mark.parametrize("key", list(REFERENCE["key_resolution"]))
def test_partial_keys_resolve_as_in_dials(key):
    ref = REFERENCE["key_resolution"][key]
    if "path" in ref:
        assert resolve_key(key) == ref["path"]
    elif ref["error"] == "ambiguous":
        with pytest.raises(ParameterError, match="ambiguous") as exc:
            resolve_key(key)
        for candidate in ref["candidates"]:
            assert candidate in str(exc.value)
    else:
        with pytest.raises(ParameterError, match="unknown parameter"):
            resolve_key(key)


def test_tie_broken_by_expert_level_is_reported():
    path, note = resolve_key_verbose("lmax")
    assert path == "physical.lmax" and "dose_decay.lmax" in note


def test_unknown_key_suggests_close_names():
    with pytest.raises(ParameterError, match=r"did you mean cut_data\.d_min"):
        resolve_key("dmin")
    with pytest.raises(ParameterError, match=r"physical\.absorption_correction"):
        apply_overrides(ScaleParams(), {"physical.absorbtion_correction": "False"})


def test_dials_command_line_value_forms():
    p = apply_overrides(ScaleParams(), [
        ("d_min", "1.4"), ("physical.absorption_correction", "False"), ("physical.scale_interval", "10"),
        ("exclude_images", "0:101:200"), ("exclude_images", "1:1:50,2:30:40"), ("exclude_datasets", "0 2"),
        ("model", "KB"), ("error_model", "None"), ("Imid", "0 1 0.5"), ("E2_range", "0.5,4"),
        ("best_unit_cell", "10 11 12 90 95 90"), ("output.json", "None"), ("nproc", "4"),
        ("error_model_group", "0 1"), ("error_model_group", "2,3"), ("intensity", "sum")])
    assert p.cut_data.d_min == 1.4
    assert p.physical.absorption_correction is False
    assert p.physical.scale_interval == 10.0
    assert p.exclude_images == ["0:101:200", "1:1:50", "2:30:40"]
    assert p.dataset_selection.exclude_datasets == [0, 2]
    assert p.model == "KB"
    assert p.weighting.error_model.error_model is None
    assert p.reflection_selection.combine.Imid == [0.0, 1.0, 0.5]
    assert p.reflection_selection.E2_range == (0.5, 4.0)
    assert p.reflection_selection.best_unit_cell == (10, 11, 12, 90, 95, 90)
    assert p.output.json is None and p.scaling_options.nproc == 4
    assert p.weighting.error_model.error_model_group == [[0, 1], [2, 3]]
    assert p.reflection_selection.intensity_choice == "sum"


def test_auto_convention():
    p = ScaleParams()
    for name in ("scale_interval", "decay_interval", "absorption_correction", "lmax", "surface_weight"):
        assert getattr(p.physical, name) == AUTO and is_auto(getattr(p.physical, name))
    q = apply_overrides(p, {"physical.lmax": "None", "physical.scale_interval": "Auto", "surface_weight": "1e4"})
    assert q.physical.lmax == AUTO and q.physical.scale_interval == AUTO and q.physical.surface_weight == 1e4
    assert params_from_dict({"physical": {"decay_interval": None}}).physical.decay_interval == AUTO
    with pytest.raises(ParameterError):  # auto is only for options whose DIALS default is auto
        apply_overrides(p, {"array.decay_interval": "auto"})


@pytest.mark.parametrize("key,value,expected", [
    ("reflection_selection.method", "everything",
     "one of quasi_random, intensity_ranges, use_all, random"),
    ("model", "physicall", "one of KB, array, dose_decay, physical"),
    ("d_min", "high", "a number, or None"),
    ("physical.scale_interval", "0.5", "a number >= 1, or auto"),
    ("outlier_zmax", "2", "a number >= 3"),
    ("nproc", "1.5", "an integer >= 1"),
    ("anomalous", "maybe", "True or False"),
    ("exclude_images", "0:200:100", "start > end"),
    ("exclude_images", "0-100", "exp:start:end"),
    ("E2_range", "0.8", "2 numbers"),
    ("E2_range", "5 1", "min < max"),
    ("min_completeness", "120", "<= 100"),
])
def test_bad_values_give_one_line_with_what_is_allowed(key, value, expected):
    with pytest.raises(ParameterError) as exc:
        apply_overrides(ScaleParams(), {key: value})
    message = str(exc.value)
    assert "\n" not in message and expected in message and resolve_key(key) in message, message


def test_conflicts():
    with pytest.raises(ParameterError, match="use_datasets and dataset_selection.exclude_datasets"):
        apply_overrides(ScaleParams(), {"use_datasets": "0 1", "exclude_datasets": "2"})
    with pytest.raises(ParameterError, match="d_min=3 must be smaller than cut_data.d_max=2"):
        apply_overrides(ScaleParams(), {"d_min": "3", "d_max": "2"})
    with pytest.raises(ParameterError, match="grouping=grouped needs"):
        apply_overrides(ScaleParams(), {"grouping": "grouped"})
    ok = apply_overrides(ScaleParams(), {"full_matrix": "False", "full_matrix_engine": "GaussNewton"})
    assert not check_conflicts(ok)
    assert any("full_matrix_engine" in n or "full_matrix_*" in n for n in explain_conflicts(ok))


def test_typed_yaml_values_and_scopes():
    p = params_from_dict({"physical": {"lmax": 6.0, "absorption_correction": True},
                          "cut_data": {"d_min": 2}, "dataset_selection.use_datasets": [0, 1],
                          "weighting": {"error_model": {"error_model_group": [[0, 1], [2]]}}})
    assert p.physical.lmax == 6 and isinstance(p.physical.lmax, int)
    assert p.cut_data.d_min == 2.0 and p.dataset_selection.use_datasets == [0, 1]
    assert p.weighting.error_model.error_model_group == [[0, 1], [2]]
    with pytest.raises(ParameterError, match="unknown parameter 'physicl"):
        params_from_dict({"physicl": {"lmax": 4}})
    with pytest.raises(ParameterError, match="True or False"):
        params_from_dict({"anomalous": 3})
    with pytest.raises(ParameterError, match="a number"):
        params_from_dict({"cut_data": {"d_min": True}})


def test_phil_text_round_trip():
    from jaxscale.cli.config import parse_phil_text

    p = apply_overrides(ScaleParams(), {
        "model": "array", "d_min": "1.8", "exclude_images": "0:1:10 1:5:9", "error_model_group": "0 1",
        "output.project_name": "my project", "filtering.method": "deltacchalf", "E2_range": "0.5 3"})
    for text in (format_phil(p), format_phil(p, diff_only=True), format_phil(p, attributes_level=2)):
        assert apply_overrides(ScaleParams(), parse_phil_text(text)) == p
    assert set(diff_from_defaults(p)) == {
        "model", "cut_data.d_min", "exclude_images", "weighting.error_model.error_model_group",
        "output.project_name", "filtering.method", "reflection_selection.E2_range"}


def test_validate_assignment_and_attribute_paths():
    p = ScaleParams()
    assert p.scaling_refinery.full_matrix_engine == "LevMar" and p.scaling_options.full_matrix is True
    assert p.weighting.error_model.error_model == "basic" and p.weighting.likelihood == "least_squares"
    assert p.compute.precision == "float64" and p.output.merging.nbins == 20
    with pytest.raises(Exception):
        p.reflection_selection.method = "nonsense"


def test_image_ranges_helper():
    from jaxscale.params import image_ranges

    p = apply_overrides(ScaleParams(), [("exclude_images", "0:101:200,1:1:5"), ("exclude_images", "30:40")])
    assert image_ranges(p.exclude_images) == [(0, 101, 200), (1, 1, 5), (None, 30, 40)]


@requires_dials
def test_committed_reference_matches_installed_dials():
    """The JSON fixture is what make_dials_defaults.py gets from the installed DIALS today."""
    import importlib.util
    import subprocess

    spec = importlib.util.spec_from_file_location("make_ref", Path(__file__).parent / "reference" /
                                                  "make_dials_defaults.py")
    make_ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_ref)
    text = subprocess.run(["dials.scale", "-c", "-a", "2", "-e", "10"], check=True, capture_output=True,
                          text=True, timeout=120).stdout
    assert make_ref.parse(text) == DIALS
    assert make_ref.resolve_keys() == REFERENCE["key_resolution"]


def test_compute_serial_choice():
    """[jaxscale] compute.serial: auto (default) | true | false; anything else is refused."""
    assert ScaleParams().compute.serial == "auto"
    assert apply_overrides(ScaleParams(), {"compute.serial": "true"}).compute.serial == "true"
    assert apply_overrides(ScaleParams(), {"serial": "false"}).compute.serial == "false"
    with pytest.raises(ParameterError, match="compute.serial"):
        apply_overrides(ScaleParams(), {"compute.serial": "maybe"})
