"""Simulated rotation sweep: planted truth is self-consistent, geometry is right, files round-trip."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxscale.data import flags as F
from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.sim import load_truth, simulate_rotation_sweep, write_simulation


def merge_by_group(value: np.ndarray, variance: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Inverse-variance weighted mean per group (NaN for empty groups)."""
    w = 1.0 / variance
    num = np.bincount(group, w * value, minlength=n_groups)
    den = np.bincount(group, w, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def write_and_read_back(out_dir, table, experiments, truth) -> tuple[list, dict[str, np.ndarray]]:
    """Write a simulation, check the .refl reads back column for column; (experiments read, truth read)."""
    written = write_simulation(out_dir, table, experiments, truth)
    back = read_refl(written["refl"])
    assert back.identifiers == table.identifiers
    for name in table:
        np.testing.assert_array_equal(back[name], table[name], err_msg=name)
    return read_expt(written["expt"]), load_truth(written["truth"])


@pytest.fixture(scope="module")
def quiet_sweep():
    """Low-noise sweep: huge counts, no proportional error, no outliers."""
    return simulate_rotation_sweep(6000, n_images=450, osc_width=0.2, seed=3, error_model=(1.0, 0.0),
                                   outlier_fraction=0.0, mean_intensity=1e6, background_per_pixel=0.01)


def test_exact_count_and_columns(quiet_sweep):
    table, experiments, truth = quiet_sweep
    assert len(table) == 6000
    for name in ("miller_index", "id", "flags", "d", "s1", "xyzobs.px.value", "xyzcal.px", "partiality", "lp", "qe",
                 "intensity.sum.value", "intensity.sum.variance", "intensity.prf.value", "intensity.prf.variance",
                 "bbox", "panel", "background.sum.value", "background.sum.variance"):
        assert name in table, name
    assert F.has_all(table["flags"], F.INTEGRATED_SUM | F.INTEGRATED_PRF).all()
    z = table["xyzobs.px.value"][:, 2]
    assert z.min() >= 0 and z.max() <= 450
    assert np.all(np.diff(z) >= 0)  # sorted by image
    assert np.all((table["partiality"] > 0) & (table["partiality"] <= 1))
    assert (table["partiality"] > 0.999).mean() > 0.9  # mostly fulls, partials at the sweep ends
    for key in ("inverse_scale", "scale", "decay", "absorption", "i_true", "outlier", "unique_index"):
        assert truth[key].shape == (6000,), key


def test_inverse_scale_factorises_in_dials_convention(quiet_sweep):
    table, _, truth = quiet_sweep
    d = table["d"]
    np.testing.assert_allclose(truth["decay"], np.exp(truth["B"] / (2 * d**2)), rtol=1e-12)
    np.testing.assert_allclose(truth["inverse_scale"], truth["scale"] * truth["decay"] * truth["absorption"], rtol=1e-12)
    assert truth["B"].max() <= 0.0 and truth["B"].min() < -3.0  # radiation damage: B more negative with dose
    assert 0.9 < truth["absorption"].min() and truth["absorption"].max() < 1.1


def test_geometry_matches_the_experiment_models(quiet_sweep):
    """s1 = s0 + R(phi) A h with the models read back from the experiment, rotation by scipy."""
    table, experiments, _ = quiet_sweep
    e = experiments[0]
    s0 = -e.s0_direction / e.wavelength
    phi = table["xyzcal.mm"][:, 2]
    R = Rotation.from_rotvec(phi[:, None] * e.rotation_axis).as_matrix()
    r = np.einsum("nij,jk,nk->ni", R, e.A_matrix, table["miller_index"].astype(float))
    np.testing.assert_allclose(table["s1"], s0 + r, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(table["s1"], axis=1), 1 / e.wavelength, rtol=1e-12)
    start, width = e.oscillation
    np.testing.assert_allclose(table["xyzcal.px"][:, 2], (np.degrees(phi) - start) / width, atol=1e-9)
    d = 1.0 / np.linalg.norm(table["miller_index"] @ e.A_matrix.T, axis=1)
    np.testing.assert_allclose(table["d"], d, rtol=1e-10)


def test_known_scales_recover_true_intensities(quiet_sweep):
    """Correct as DIALS does (lp/qe/partiality), divide by the planted g, merge: the truth comes back."""
    table, _, truth = quiet_sweep
    conv = table["lp"] / table["qe"] / table["partiality"]
    I = table["intensity.sum.value"] * conv / truth["inverse_scale"]
    V = table["intensity.sum.variance"] * (conv / truth["inverse_scale"]) ** 2
    n_unique = len(truth["i_mean"])
    merged = merge_by_group(I, V, truth["unique_index"], n_unique)
    seen = np.isfinite(merged)
    assert seen.sum() > 1000
    cc = np.corrcoef(merged[seen], truth["i_mean"][seen])[0, 1]
    assert cc > 0.99
    assert abs(np.median(merged[seen] / truth["i_mean"][seen]) - 1) < 0.01
    # and without the planted g the scatter is much larger (the scales are not trivial)
    raw = merge_by_group(table["intensity.sum.value"] * conv, V, truth["unique_index"], n_unique)
    assert np.std(np.log(np.abs(raw[seen] / truth["i_mean"][seen]) + 1e-9)) > 3 * np.std(
        np.log(np.abs(merged[seen] / truth["i_mean"][seen]) + 1e-9))


def test_planted_error_model_and_outliers():
    a = 1.4
    table, _, truth = simulate_rotation_sweep(8000, n_images=300, osc_width=0.3, seed=5, error_model=(a, 0.0),
                                              outlier_fraction=0.01)
    expected = truth["inverse_scale"] * truth["i_true"] * table["qe"] / table["lp"]
    dev = (table["intensity.prf.value"] - expected) / np.sqrt(table["intensity.prf.variance"])
    good = ~truth["outlier"] & (expected > 50)
    assert abs(np.std(dev[good]) / a - 1) < 0.06
    assert 40 < truth["outlier"].sum() < 130
    assert np.median(np.abs(dev[truth["outlier"]])) > 8


def test_wilson_statistics_and_anomalous_signal():
    _, _, truth = simulate_rotation_sweep(3000, n_images=300, seed=2, anomalous_signal=0.1)
    centric = truth["centric"]
    ratio = truth["i_plus"] / truth["i_minus"]
    np.testing.assert_allclose(ratio[centric], 1.0)
    assert np.std(np.log(ratio[~centric])) > 0.1
    # acentric normalised intensities E^2 = I / <I> follow Exp(1): <E^4> = 2
    mean = truth["mean_intensity"] * np.exp(-truth["wilson_B"] / (2 * truth["d_unique"] ** 2))
    e2 = truth["i_mean"][~centric] / mean[~centric]
    assert abs(np.mean(e2) - 1) < 0.1 and abs(np.mean(e2**2) - 2) < 0.4


def test_files_round_trip(tmp_path, quiet_sweep):
    table, experiments, truth = quiet_sweep
    exps, t = write_and_read_back(tmp_path, table, experiments, truth)
    assert len(exps) == 1 and exps[0].identifier == table.identifiers[0]
    assert not exps[0].is_still
    assert exps[0].osc_range == pytest.approx((0.0, 90.0))
    assert exps[0].space_group.hm == "P 21 21 21"
    np.testing.assert_array_equal(t["inverse_scale"], truth["inverse_scale"])
    assert str(t["kind"]) == "rotation"
