"""Every output of `jaxscale.scale.run` on one l-cysteine sweep (examples/lcys, demo size),
the all-or-nothing output writing, and the report-data helpers against analytic values.

The end-to-end numbers are compared with the DIALS 3.12 run of reference_numbers.md §2.1.
One scaling run is shared by this module and tests/test_interop_dials.py (`scaled_lcys`).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lcys"
_RUN: dict = {}


def scaled_lcys(tmp_path_factory) -> tuple[Path, object]:
    """(directory, ScaleResult) of one run on lcys_20 with every output on; run once per session."""
    if "result" not in _RUN:
        from jaxscale.params import ScaleParams, apply_overrides
        from jaxscale.scale import run

        out = tmp_path_factory.mktemp("lcys20")
        params = apply_overrides(ScaleParams(), [
            ("output.reflections", str(out / "scaled.refl")), ("output.experiments", str(out / "scaled.expt")),
            ("output.log", str(out / "jaxscale.log")), ("output.html", str(out / "jaxscale.html")),
            ("output.json", str(out / "scaled.json")), ("output.merged_mtz", str(out / "merged.mtz")),
            ("output.unmerged_mtz", str(out / "unmerged.mtz"))])
        res = run(params, [str(EXAMPLE / "lcys_20_integrated.refl"), str(EXAMPLE / "lcys_20_integrated.expt")])
        _RUN.update(dir=out, result=res)
    return _RUN["dir"], _RUN["result"]


@pytest.fixture(scope="module")
def lcys(tmp_path_factory):
    return scaled_lcys(tmp_path_factory)


def test_numbers_match_dials(lcys):
    """reference_numbers.md §2.1: outliers 38, a 0.78629, b 0.02073, 2327 obs, 526 unique."""
    _, res = lcys
    a, b = res.error_model
    assert abs(a - 0.78629) < 0.01 and abs(b - 0.02073) < 0.001
    n_out = int(re.search(r"(\d+) outliers found \(final\)", "\n".join(res.log)).group(1))
    assert abs(n_out - 38) <= 4
    st = res.statistics.overall
    assert abs(int(st.n_obs[0]) - 2327) <= 10 and int(st.n_uniq[0]) == 526
    assert abs(st.i_over_sigma_mean[0] - 73.9) < 2.0 and st.cc_half[0] > 0.999


def test_all_outputs_exist(lcys):
    out, res = lcys
    names = ["scaled.refl", "scaled.expt", "jaxscale.log", "jaxscale.html", "scaled.json", "merged.mtz",
             "unmerged.mtz"]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    assert sorted(Path(p).name for p in res.outputs.values()) == sorted(names)
    assert not list(out.glob(".*staged*")) and not list(out.glob(".*.part"))  # nothing left behind


def test_log_has_parameters_and_rounds(lcys):
    out, _ = lcys
    text = (out / "jaxscale.log").read_text()
    head = text[:text.index("Data set 0")]
    for name in ("outlier_zmax", "intensity_choice", "full_matrix", "min_Ih", "d_min", "merged_mtz"):
        assert name in head, name
    for label in ("Round 1", "Round 2", "Full-matrix round", "Error model (final)", "Saving html to",
                  "Total time taken"):
        assert label in text, label


def test_html_has_plot_data_for_each_section(lcys):
    out, _ = lcys
    page = (out / "jaxscale.html").read_text()
    for section in ("Merging statistics", "Statistics vs resolution", "Statistics vs batch", "Scaling model",
                    "Error model", "Outliers", "Intensity distribution", "Anomalous signal"):
        assert f"<h2>{section}</h2>" in page, section
    for title in ("Scale component vs rotation", "Relative B vs rotation", "Absorption surface",
                  "Normal probability plot", "Variance of normalised deviations", "Outliers on the detector",
                  "Wilson plot", "Scale and Rmerge vs batch", "Anomalous normal probability plot"):
        assert title in page, title
    n_plots = int(re.search(r"JAXSCALE_N_PLOTS=(\d+)", page).group(1))
    assert n_plots >= 15


def test_report_data_is_real(lcys):
    """Model curves from the fitted parameters; batches; outliers = flagged rows."""
    out, res = lcys
    from jaxscale.data import flags as F
    from jaxscale.io.refl import read_refl

    expt = json.loads((out / "scaled.expt").read_text())
    scale_params = np.array(expt["scaling_model"][0]["scale"]["parameters"])
    doc = json.loads((out / "scaled.json").read_text())
    curve = doc["model"]["datasets"][0]
    value = np.array(curve["scale"]["value"])
    # the smoothed curve lies within the span of its parameters and is not flat
    assert value.min() >= scale_params.min() - 1e-9 and value.max() <= scale_params.max() + 1e-9
    assert value.std() > 1e-3
    rotation = np.array(curve["scale"]["rotation_deg"])
    osc = expt["scan"][0]["oscillation"]
    n_img = expt["scan"][0]["image_range"][1] - expt["scan"][0]["image_range"][0] + 1
    assert rotation[0] == pytest.approx(osc[0]) and rotation[-1] == pytest.approx(osc[0] + n_img * osc[1])
    table = read_refl(out / "scaled.refl")
    n_flagged = int(F.has_any(np.asarray(table["flags"]), F.OUTLIER_IN_SCALING).sum())
    assert len(doc["outliers"]["x_px"]) == n_flagged > 0
    assert sum(doc["batches"]["n_obs"]) == int(res.statistics.overall.n_obs[0])
    assert doc["error_model"]["a"] == pytest.approx(res.error_model[0])


def test_json_has_documented_keys(lcys):
    out, _ = lcys
    doc = json.loads((out / "scaled.json").read_text())
    assert doc["schema"] == "jaxscale.report/1"
    ms = doc["merging_statistics"]
    for key in ("space_group", "unit_cell", "n_bins", "d_star_sq_limits", "bins", "overall", "anomalous_bins",
                "anomalous_overall", "d_min_cc_half_fit", "summary_table", "suggested"):
        assert key in ms, key
    for key in ("n_obs", "n_uniq", "multiplicity", "completeness", "i_over_sigma_mean", "r_merge", "r_meas",
                "r_pim", "cc_half", "cc_anom"):
        assert key in ms["overall"], key
    assert len(ms["bins"]["n_obs"]) == ms["n_bins"] == 20
    for key in ("run", "batches", "model", "error_model", "outliers"):
        assert key in doc, key


def test_merged_and_unmerged_mtz_readable(lcys):
    import gemmi

    out, res = lcys
    merged = gemmi.read_mtz_file(str(out / "merged.mtz"))
    labels = [c.label for c in merged.columns]
    for label in ("IMEAN", "SIGIMEAN", "I(+)", "I(-)", "F", "SIGF", "DANO"):
        assert label in labels
    assert merged.nreflections == int(res.statistics.overall.n_uniq[0])
    assert merged.spacegroup.hm == res.statistics.space_group
    unmerged = gemmi.read_mtz_file(str(out / "unmerged.mtz"))
    assert unmerged.nreflections == int(res.statistics.overall.n_obs[0])
    assert len(unmerged.batches) > 100


def test_write_all_is_all_or_nothing(tmp_path):
    """A failing writer leaves earlier outputs of the same run and old files untouched."""
    from jaxscale.outputs import write_all

    old_a, old_b = tmp_path / "a.txt", tmp_path / "b.html"
    old_a.write_text("old a")
    old_b.write_text("old b")

    def fail(path):
        Path(path).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_all([("a", old_a, lambda p: Path(p).write_text("new a")), ("b", old_b, fail)])
    assert old_a.read_text() == "old a" and old_b.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.html"]
    done = write_all([("a", old_a, lambda p: Path(p).write_text("new a")),
                      ("c", tmp_path / "sub" / "c.txt", lambda p: Path(p).write_text("c"))])
    assert old_a.read_text() == "new a" and (tmp_path / "sub" / "c.txt").read_text() == "c"
    assert done == {"a": str(old_a), "c": str(tmp_path / "sub" / "c.txt")}


def test_failed_run_leaves_outputs_untouched(tmp_path):
    """A run that fails (here: an unreadable reflection file) writes nothing."""
    from jaxscale.exceptions import JaxscaleError
    from jaxscale.params import ScaleParams, apply_overrides
    from jaxscale.scale import run

    bad = tmp_path / "broken.refl"
    bad.write_bytes(b"dials::af::reflection_table" + b"\x00" * 40)
    names = ("scaled.refl", "scaled.expt", "jaxscale.log", "jaxscale.html")
    for name in names:
        (tmp_path / name).write_text("previous " + name)
    params = apply_overrides(ScaleParams(), [
        ("output.reflections", str(tmp_path / "scaled.refl")), ("output.experiments", str(tmp_path / "scaled.expt")),
        ("output.log", str(tmp_path / "jaxscale.log")), ("output.html", str(tmp_path / "jaxscale.html"))])
    with pytest.raises((JaxscaleError, ValueError, OSError)):
        run(params, [str(bad), str(EXAMPLE / "lcys_20_integrated.expt")])
    for name in names:
        assert (tmp_path / name).read_text() == "previous " + name


def test_absorption_surface_analytic():
    """1 + C_10 Y_10 with Y_10 = sqrt(3/4pi) cos(theta) (only l = 1, m = 0 set)."""
    from jaxscale.outputs import absorption_surface

    coefficients = np.zeros(8)  # lmax 2: 3 + 5
    coefficients[1] = 0.2  # (l, m) = (1, 0)
    s = absorption_surface(coefficients, 2, n_theta=7, n_phi=5)
    expected = 1.0 + 0.2 * math.sqrt(3.0 / (4.0 * math.pi)) * np.cos(np.radians(s["theta_deg"]))
    np.testing.assert_allclose(s["correction"], np.repeat(expected[:, None], 5, axis=1), atol=1e-12)


def test_model_curves_planted_kb():
    """KB with planted k, B: flat curves at k and B for each data set."""
    from jaxscale.io.expt import read_expt
    from jaxscale.models.build import DatasetInput, build_model
    from jaxscale.outputs import model_curves
    from jaxscale.params import ScaleParams, apply_overrides

    expts = list(read_expt(EXAMPLE / "lcys_20_integrated.expt")) + list(read_expt(EXAMPLE / "lcys_25_integrated.expt"))
    params = apply_overrides(ScaleParams(), [("model", "KB")])
    inputs = [DatasetInput(experiment=e, z_px=np.linspace(0, 100, 10), d=np.full(10, 1.5),
                           s1=np.tile([0.0, 0.0, 1.0], (10, 1)), xyz_px=np.zeros((10, 3)), dataset_index=k)
              for k, e in enumerate(expts)]
    model = build_model(inputs, params)
    planted = {key: np.asarray(v).copy() for key, v in model.params.items()}
    planted["KB.scale"][:] = [1.7, 0.6]
    planted["KB.decay"][:] = [-3.5, 2.0]
    curves = model_curves(model, planted, expts, params)["datasets"]
    for k in range(2):
        np.testing.assert_allclose(curves[k]["scale"]["value"], planted["KB.scale"][k], rtol=1e-12)
        np.testing.assert_allclose(curves[k]["decay"]["b"], planted["KB.decay"][k], rtol=1e-12)
