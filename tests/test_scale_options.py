"""dials.scale options of `jaxscale.scale.run` that the default runs do not touch:
exclude_images over several data sets (vs DIALS 3.12), unusable data sets, unmerged MTZ
input without orientation, FRACTIONCALC = 0, weighting.likelihood, consistent indexing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxscale.data import flags as F
from jaxscale.exceptions import InputError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lcys"
REFERENCE = json.loads((Path(__file__).parent / "reference" / "scale_options.json").read_text())


def _sweeps(*names: str) -> list[str]:
    return [str(EXAMPLE / f"lcys_{n}_integrated.{ext}") for n in names for ext in ("refl", "expt")]


def _params(out: Path, *overrides):
    from jaxscale.params import ScaleParams, apply_overrides

    return apply_overrides(ScaleParams(), [
        ("output.reflections", str(out / "scaled.refl")), ("output.experiments", str(out / "scaled.expt")),
        ("output.html", "None"), ("output.log", "None"), ("scaling_options.full_matrix", "False"), *overrides])


def test_exclude_images_two_sweeps_as_dials(tmp_path):
    """exclude_images=1:10:20 and 0:1700:1800 over two sweeps: flags, valid ranges, the
    models limited to the valid range, the error model and the observation count all equal
    DIALS 3.12's (the per-data-set call used to fail with 'no experiment with dataset id 1')."""
    from jaxscale.io.refl import read_refl
    from jaxscale.scale import run

    ref = REFERENCE["exclude_images_two_sweeps"]
    res = run(_params(tmp_path, ("exclude_images", "1:10:20"), ("exclude_images", "0:1700:1800")), _sweeps("20", "25"))
    table = read_refl(tmp_path / "scaled.refl")
    flags, ids = np.asarray(table["flags"]), np.asarray(table["id"])
    assert [int((F.has_any(flags, F.USER_EXCLUDED_IN_SCALING) & (ids == k)).sum()) for k in (0, 1)] == ref["user_excluded"]
    assert [int((F.has_any(flags, F.SCALED) & (ids == k)).sum()) for k in (0, 1)] == ref["scaled"]
    expt = json.loads((tmp_path / "scaled.expt").read_text())
    assert [list(s["valid_image_ranges"].values())[0] for s in expt["scan"]] == ref["valid_image_ranges"]
    models = expt["scaling_model"]
    assert [m["configuration_parameters"]["valid_image_range"] for m in models] == ref["model_valid_image_range"]
    np.testing.assert_allclose([m["configuration_parameters"]["valid_osc_range"] for m in models],
                               ref["model_valid_osc_range"], atol=1e-9)
    assert [len(m["scale"]["parameters"]) for m in models] == ref["n_scale_parameters"]
    np.testing.assert_allclose(res.error_model, ref["error_model"], rtol=1e-3)
    assert int(res.statistics.overall.n_obs[0]) == ref["n_obs_overall"]
    # the log gives the initial outliers per data set (DIALS: one line per sweep) and each model's reason
    text = "\n".join(res.log)
    for k, n in enumerate(ref["initial_outliers_per_dataset"]):
        assert f"  data set {k}: {n} outliers" in text
    for k, width in enumerate(("180.00", "170.00")):
        line = f"Data set {k}: physical model (auto: sweep of {width} deg >= 1 deg); components scale 14,"
        assert line in text and text.index(line) < text.index("Round 1")
    assert text.count("absorption on (auto: sweep > 60 deg)") == 2


def _one_file(where: Path, names) -> list[str]:
    """lcys sweeps in one .refl/.expt (ids 0, 1, ... with identifiers), as dials.combine_experiments."""
    from jaxscale.data.table import ReflectionTable
    from jaxscale.io.expt import ExperimentList, read_expt, write_expt
    from jaxscale.io.refl import read_refl, write_refl

    tables, experiments = [], ExperimentList()
    for k, name in enumerate(names):  # a few sweeps
        table = read_refl(EXAMPLE / f"lcys_{name}_integrated.refl")
        expt = read_expt(EXAMPLE / f"lcys_{name}_integrated.expt")[0]
        expt.identifier = f"00000000-0000-0000-0000-{k + 1:012d}"
        ids = np.asarray(table["id"])
        table["id"] = np.where(ids < 0, -1, k).astype(np.int32)
        table.identifiers = {k: expt.identifier}
        tables.append(table)
        experiments.append(expt)
    where.mkdir(parents=True, exist_ok=True)
    write_refl(ReflectionTable.concatenate(tables), where / "combined.refl")
    write_expt(experiments, where / "combined.expt")
    return [str(where / "combined.refl"), str(where / "combined.expt")]


def test_exclude_images_names_datasets_by_input_id(tmp_path):
    """use_datasets=1 exclude_images=1:100:200: the range names data set 1 of the input (its
    id), not the first data set left after selection; flags, valid ranges, model and error
    model as DIALS 3.12."""
    from jaxscale.io.refl import read_refl
    from jaxscale.scale import run

    ref = REFERENCE["use_datasets_exclude_images"]
    res = run(_params(tmp_path / "out", ("dataset_selection.use_datasets", "1"), ("exclude_images", "1:100:200")),
              _one_file(tmp_path, ["20", "25"]))
    table = read_refl(tmp_path / "out" / "scaled.refl")
    flags = np.asarray(table["flags"])
    assert list(table.identifiers.values()) == ["00000000-0000-0000-0000-000000000002"]
    assert len(table) == ref["n_rows"]
    assert int(F.has_any(flags, F.USER_EXCLUDED_IN_SCALING).sum()) == ref["user_excluded"]
    assert int(F.has_any(flags, F.SCALED).sum()) == ref["scaled"]
    expt = json.loads((tmp_path / "out" / "scaled.expt").read_text())
    assert [list(s["valid_image_ranges"].values())[0] for s in expt["scan"]] == ref["valid_image_ranges"]
    models = expt["scaling_model"]
    assert [m["configuration_parameters"]["valid_image_range"] for m in models] == ref["model_valid_image_range"]
    assert [len(m["scale"]["parameters"]) for m in models] == ref["n_scale_parameters"]
    np.testing.assert_allclose(res.error_model, ref["error_model"], rtol=2e-2)
    assert int(res.statistics.overall.n_obs[0]) == ref["n_obs_overall"]
    # an input id that use_datasets leaves out is ignored (as DIALS); an unknown one is an error
    res = run(_params(tmp_path / "other", ("dataset_selection.use_datasets", "1"), ("exclude_images", "0:100:200")),
              [str(tmp_path / "combined.refl"), str(tmp_path / "combined.expt")])
    assert int(F.has_any(np.asarray(res.table["flags"]), F.USER_EXCLUDED_IN_SCALING).sum()) < ref["user_excluded"]
    from jaxscale.exceptions import ParameterError

    with pytest.raises(ParameterError, match="dataset id 5"):
        run(_params(tmp_path / "bad", ("dataset_selection.use_datasets", "1"), ("exclude_images", "5:100:200")),
            [str(tmp_path / "combined.refl"), str(tmp_path / "combined.expt")])


def test_unusable_dataset_names_the_file(tmp_path):
    from jaxscale.scale import run

    with pytest.raises(InputError) as err:
        run(_params(tmp_path, ("cut_data.d_min", "100")), _sweeps("20"))
    assert "lcys_20_integrated.refl" in str(err.value)
    assert not (tmp_path / "scaled.refl").exists()


def test_unusable_dataset_dropped_in_multi_dataset_run(tmp_path):
    """Every image of data set 0 excluded: it is dropped with a log line, the rest is scaled."""
    from jaxscale.scale import run

    res = run(_params(tmp_path, ("exclude_images", "0:1:1800"), ("error_model", "None")), _sweeps("20", "25"))
    assert len(res.experiments) == 1
    assert any("removed: every image is excluded" in line for line in res.log)
    assert np.unique(np.asarray(res.table["id"])).tolist() == [0]


def test_fractioncalc_zero_means_full(shared_data):
    from jaxscale.io.mtz import read_unmerged_mtz

    table, _ = read_unmerged_mtz(shared_data / "smallmol_xia2_dials_unmerged_mtz" / "AUTOMATIC_DEFAULT_scaled_unmerged.mtz")
    assert np.all(np.asarray(table["partiality"]) == 1.0)


def test_mtz_without_orientation(shared_data, tmp_path, monkeypatch):
    """Unmerged MTZ without orientation (no s1): KB scaling works (Laue off.mtz); a
    physical model with absorption asks for s1 (one line, no output)."""
    import jaxscale.io.mtz as mtz_io
    from jaxscale.scale import run

    res = run(_params(tmp_path, ("model", "KB"), ("cut_data.d_min", "2.0")),
              [str(shared_data / "pyp_laue_unmerged_mtz" / "off.mtz")])
    assert res.statistics is not None and res.statistics.overall.cc_half[0] > 0.5
    assert (tmp_path / "scaled.refl").exists()

    reader = mtz_io.read_unmerged_mtz

    def without_s1(path):
        table, experiments = reader(path)
        del table["s1"]
        return table, experiments

    monkeypatch.setattr(mtz_io, "read_unmerged_mtz", without_s1)
    path = str(shared_data / "smallmol_xia2_dials_unmerged_mtz" / "AUTOMATIC_DEFAULT_scaled_unmerged.mtz")
    with pytest.raises(InputError) as err:
        run(_params(tmp_path / "phys", ("model", "physical")), [path])
    assert "s1" in str(err.value) and "AUTOMATIC_DEFAULT_scaled_unmerged.mtz" in str(err.value)
    assert not (tmp_path / "phys").exists()


def _sim_sweep(j: int, space_group: str, cell, outlier_fraction: float = 0.0, n_obs: int = 1500):
    import dataclasses
    import uuid

    from jaxscale.sim.rotation import simulate_rotation_sweep

    table, experiments, truth = simulate_rotation_sweep(
        n_obs, space_group=space_group, cell=cell, osc_start=30.0 * j, n_images=60, osc_width=0.5, seed=0,
        d_min=1.5, outlier_fraction=outlier_fraction, absorption_strength=0.0, mean_intensity=1e4,
        scale_profile=lambda t: np.full_like(t, 1.0 - 0.3 * j), B_profile=lambda t: np.full_like(t, -1.0 * j))
    ident = str(uuid.UUID(int=j + 1))
    table.identifiers = {0: ident}
    return table, dataclasses.replace(experiments[0], identifier=ident), truth


def _ratio_to_truth(table, k: int, planted, truth) -> np.ndarray:
    """Fitted g / planted g of data set k's scaled rows, matched by (miller index, z)."""
    def key(t):
        hkl = np.asarray(t["miller_index"]).astype(np.float64)
        return np.round(np.asarray(t["xyzobs.px.value"])[:, 2], 6) + 1e3 * (hkl @ np.array([1e6, 1e3, 1.0]))

    rows = np.flatnonzero((np.asarray(table["id"]) == k) & F.has_any(np.asarray(table["flags"]), F.SCALED))
    ref = key(planted)
    order = np.argsort(ref)
    pos = order[np.searchsorted(ref[order], key(table)[rows])]
    assert np.all(ref[pos] == key(table)[rows])
    return np.asarray(table["inverse_scale_factor"])[rows] / truth["inverse_scale"][pos]


def _write_sweeps(where: Path, sweeps) -> list[str]:
    from jaxscale.io.expt import ExperimentList, write_expt
    from jaxscale.io.refl import write_refl

    paths = []
    for j, (table, expt, _) in enumerate(sweeps):
        write_refl(table, where / f"s{j}.refl")
        write_expt(ExperimentList([expt]), where / f"s{j}.expt")
        paths += [str(where / f"s{j}.refl"), str(where / f"s{j}.expt")]
    return paths


@pytest.mark.parametrize("likelihood", ["student_t", "huber"])
def test_robust_likelihood_recovers_planted_scales(tmp_path, likelihood):
    """weighting.likelihood wired to target.robust: with 3 % planted outliers and outlier
    rejection off, the robust fit still recovers the planted relative scales (g / g_true
    constant within 1 % up to the common scale and B), better than least squares."""
    from jaxscale.io.refl import read_refl
    from jaxscale.scale import run

    sweeps = [_sim_sweep(j, "P 21 21 21", (20, 25, 30, 90, 90, 90), outlier_fraction=0.03) for j in range(2)]
    paths = _write_sweeps(tmp_path, sweeps)

    def spread(name, *extra):
        out = tmp_path / name
        run(_params(out, ("model", "KB"), ("scaling_options.outlier_zmax", "1000"), ("scaling_options.emax", "0"),
                    *extra), paths)
        table = read_refl(out / "scaled.refl")
        ratio = np.concatenate([_ratio_to_truth(table, k, planted, truth)
                                for k, (planted, _, truth) in enumerate(sweeps)])
        d = np.concatenate([np.asarray(table["d"])[(np.asarray(table["id"]) == k)
                                                   & F.has_any(np.asarray(table["flags"]), F.SCALED)]
                            for k in range(len(sweeps))])
        # all-KB scaling determines g only up to a common scale and B (absorbed by I_h): remove them
        design = np.column_stack([np.ones_like(d), 1.0 / (2.0 * d * d)])
        coef, *_ = np.linalg.lstsq(design, np.log(ratio), rcond=None)
        return float(np.max(np.abs(np.log(ratio) - design @ coef)))

    robust = spread(likelihood, ("weighting.likelihood", likelihood))
    assert robust < 0.01
    assert spread("ls") > robust


def _rlp_misfit(table, crystal: dict, expt: dict) -> float:
    """max |S R(phi) F A h - (s1 - s0)| over a data set's rows (1/Å): the crystal model with the
    miller indices reproduces each reflection's diffraction vector."""
    hkl = np.asarray(table["miller_index"], dtype=np.float64)
    A = np.linalg.inv(np.array([crystal["real_space_a"], crystal["real_space_b"], crystal["real_space_c"]]))
    r0 = hkl @ A.T  # (n, 3) A h
    axis = np.asarray(expt["goniometer"]["rotation_axis"], dtype=np.float64)
    axis /= np.linalg.norm(axis)
    phi = np.asarray(table["xyzcal.mm"])[:, 2][:, None]
    r = r0 * np.cos(phi) + np.cross(axis, r0) * np.sin(phi) + np.outer(r0 @ axis, axis) * (1 - np.cos(phi))
    s0 = -np.asarray(expt["beam"]["direction"]) / expt["beam"]["wavelength"]
    return float(np.max(np.abs(r - (np.asarray(table["s1"]) - s0))))


def test_check_consistent_indexing(tmp_path):
    """P 4 with a ~ b: sweep 1 of the same crystal indexed in the other setting, h' = (k, h, -l)
    with its crystal model to match (A' = A M^-T, also at the scan points). With
    check_consistent_indexing it is reindexed and the data merge (CC1/2 ~ 1); without, not.
    The written crystal of each data set, with the written miller indices, still gives each
    reflection's s1 - s0 (to 1e-6 1/Å), statically and at every scan point."""
    from jaxscale.io.refl import read_refl
    from jaxscale.scale import run

    sweeps = [_sim_sweep(j, "P 4", (20, 20, 30, 90, 90, 90)) for j in range(2)]
    t1, e1, _ = sweeps[1]
    m = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])  # h' = h M
    t1["miller_index"] = (np.asarray(t1["miller_index"]) @ m).astype(np.int32)
    rows = np.array([e1.crystal["real_space_a"], e1.crystal["real_space_b"], e1.crystal["real_space_c"]])
    rows_other = m.T @ rows  # A' = inv(R') = A M^-T: A' h' = A h
    e1.crystal = {**e1.crystal, "real_space_a": rows_other[0].tolist(), "real_space_b": rows_other[1].tolist(),
                  "real_space_c": rows_other[2].tolist(),
                  "A_at_scan_points": [np.linalg.inv(rows_other).ravel().tolist()] * 61}
    assert _rlp_misfit(t1, e1.crystal, {"beam": e1.beam, "goniometer": e1.goniometer}) < 1e-9
    paths = _write_sweeps(tmp_path, sweeps)
    res = run(_params(tmp_path / "ci", ("model", "KB"), ("scaling_options.check_consistent_indexing", "True")), paths)
    assert any("1 data set(s) reindexed" in line for line in res.log)
    assert res.statistics.overall.cc_half[0] > 0.99
    table = read_refl(tmp_path / "ci" / "scaled.refl")
    doc = json.loads((tmp_path / "ci" / "scaled.expt").read_text())
    flipped = 0
    for k, entry in enumerate(doc["experiment"]):  # two data sets
        crystal = doc["crystal"][entry["crystal"]]
        expt = {"beam": doc["beam"][entry["beam"]], "goniometer": doc["goniometer"][entry["goniometer"]]}
        sub = table.select(np.flatnonzero(np.asarray(table["id"]) == k))
        assert _rlp_misfit(sub, crystal, expt) < 1e-6
        for a_sp in crystal.get("A_at_scan_points", []):  # the same A h at every scan point
            hkl = np.asarray(sub["miller_index"], dtype=np.float64)
            np.testing.assert_allclose(hkl @ np.reshape(a_sp, (3, 3)).T, hkl @ np.linalg.inv(
                np.array([crystal["real_space_a"], crystal["real_space_b"], crystal["real_space_c"]])).T, atol=1e-9)
        flipped += "A_at_scan_points" in crystal
    assert flipped == 1  # sweep 1's crystal carries its (reindexed) scan points
    plain = run(_params(tmp_path / "plain", ("model", "KB")), paths)
    assert plain.statistics.overall.cc_half[0] < res.statistics.overall.cc_half[0] - 0.1


def test_model_choice_text_gives_the_auto_rule():
    """The log line per data set names the model and the rule that chose it (models.md: KB for
    stills and sweeps under 1 degree, physical otherwise; absorption only above 60 degrees)."""
    from jaxscale.io.expt import Experiment
    from jaxscale.models.build import DatasetModelState, choose_model_id
    from jaxscale.params import ScaleParams, apply_overrides
    from jaxscale.scale import model_choice_text

    def sweep(width_deg: float, n_images: int = 10) -> Experiment:
        return Experiment(identifier="x", goniometer={"rotation_axis": [1.0, 0.0, 0.0]},
                          scan={"image_range": [1, n_images], "oscillation": [0.0, width_deg / n_images]})

    def state(model: str, *names: str) -> DatasetModelState:
        return DatasetModelState(model, {}, {n: np.zeros(3) for n in names})

    auto = ScaleParams()
    narrow, still, mid, wide = sweep(0.5), Experiment(identifier="s"), sweep(30.0), sweep(90.0)
    assert [choose_model_id(e, auto) for e in (narrow, still, mid, wide)] == ["KB", "KB", "physical", "physical"]
    assert model_choice_text(0, narrow, state("KB", "scale", "decay"), auto) == (
        "Data set 0: KB model (auto: sweep of 0.50 deg < 1 deg); components scale 3, decay 3 parameters")
    assert "KB model (auto: still images)" in model_choice_text(1, still, state("KB", "scale"), auto)
    assert model_choice_text(2, mid, state("physical", "scale", "decay"), auto).endswith(
        "absorption off (auto: sweep <= 60 deg)")
    assert model_choice_text(3, wide, state("physical", "scale", "decay", "absorption"), auto).endswith(
        "absorption on (auto: sweep > 60 deg)")
    forced = apply_overrides(ScaleParams(), [("model", "physical"), ("physical.absorption_correction", "False")])
    assert model_choice_text(0, wide, state("physical", "scale"), forced) == (
        "Data set 0: physical model (model=physical); components scale 3 parameters; absorption off "
        "(physical.absorption_correction=False)")
    loaded = DatasetModelState("KB", {}, {"scale": np.ones(1)}, is_scaled=True)
    assert "loaded from the input's scaled model" in model_choice_text(0, wide, loaded, auto)
