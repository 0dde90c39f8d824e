"""Simulated stills: per-still truth, geometry on the Ewald sphere, ambiguity, round trip."""
from __future__ import annotations

import numpy as np
import pytest

from jaxscale.sim import simulate_stills
from tests.sim.test_rotation import merge_by_group, write_and_read_back


@pytest.fixture(scope="module")
def quiet_stills():
    return simulate_stills(300, 80, seed=4, error_model=(1.0, 0.0), outlier_fraction=0.0, mean_intensity=1e6,
                           background_per_pixel=0.01)


@pytest.fixture(scope="module")
def ambiguous_stills():
    return simulate_stills(200, 60, seed=6, space_group="P 4", ambiguity_fraction=0.5, anomalous_signal=0.05)


def test_counts_ids_and_truth_shapes(quiet_stills):
    table, experiments, truth = quiet_stills
    assert len(experiments) == 300
    counts = np.bincount(table["id"], minlength=300)
    assert np.all(counts == 80)
    assert table.identifiers == {k: e.identifier for k, e in enumerate(experiments)}
    assert len(set(table.identifiers.values())) == 300
    assert truth["still_scale"].shape == (300,) and truth["still_B"].shape == (300,)
    assert truth["inverse_scale"].shape == (len(table),)
    assert all(e.is_still and e.scan is None and e.goniometer is None for e in experiments)
    # one beam and one detector model shared by all stills
    assert len({id(e.detector) for e in experiments}) == 1 and len({id(e.beam) for e in experiments}) == 1
    assert np.all(table["partiality"] >= 0.1) and np.all(table["partiality"] <= 1)
    assert np.all(table["d"] >= 2.0)
    # no reflection twice on one still
    key = table["id"].astype(np.int64) * 10**9 + (table["miller_index"] + 500) @ np.array([10**6, 10**3, 1])
    assert len(np.unique(key)) == len(table)


def test_kb_truth_per_still(quiet_stills):
    table, _, truth = quiet_stills
    sid = table["id"]
    g = truth["still_scale"][sid] * np.exp(truth["still_B"][sid] / (2 * table["d"] ** 2))
    np.testing.assert_allclose(truth["inverse_scale"], g, rtol=1e-12)
    assert 0.15 < np.std(np.log(truth["still_scale"])) < 0.45


def test_known_scales_recover_true_intensities(quiet_stills):
    table, _, truth = quiet_stills
    conv = table["lp"] / table["qe"] / table["partiality"] / truth["inverse_scale"]
    I = table["intensity.sum.value"] * conv
    V = table["intensity.sum.variance"] * conv**2
    merged = merge_by_group(I, V, truth["unique_index"], len(truth["i_mean"]))
    seen = np.isfinite(merged)
    assert seen.sum() > 1000
    assert np.corrcoef(merged[seen], truth["i_mean"][seen])[0, 1] > 0.99
    assert abs(np.median(merged[seen] / truth["i_mean"][seen]) - 1) < 0.01


def test_reflections_lie_on_the_ewald_sphere_of_their_still(ambiguous_stills):
    """|s0 + A h| = |s0| within the excitation width, using each still's (re-indexed) crystal model."""
    table, experiments, _ = ambiguous_stills
    A = np.stack([e.A_matrix for e in experiments])[table["id"]]
    s0 = -experiments[0].s0_direction / experiments[0].wavelength
    r = np.einsum("nij,nj->ni", A, table["miller_index"].astype(float))
    excitation = np.linalg.norm(s0 + r, axis=1) - np.linalg.norm(s0)
    assert np.max(np.abs(excitation)) < 3e-3
    s1_dir = table["s1"] / np.linalg.norm(table["s1"], axis=1, keepdims=True)
    r_dir = (s0 + r) / np.linalg.norm(s0 + r, axis=1, keepdims=True)
    assert np.max(np.linalg.norm(s1_dir - r_dir, axis=1)) < 1e-9


def test_indexing_ambiguity_is_planted_and_recorded(ambiguous_stills):
    table, experiments, truth = ambiguous_stills
    M = truth["ambiguity_matrix"]
    assert not np.array_equal(M, np.eye(3))
    assert 0.3 < truth["reindexed"].mean() < 0.7
    flipped = truth["reindexed"][table["id"]]
    true_hkl = truth["miller_index_true"]
    np.testing.assert_array_equal(table["miller_index"][flipped], true_hkl[flipped] @ M)
    np.testing.assert_array_equal(table["miller_index"][~flipped], true_hkl[~flipped])
    assert np.any(table["miller_index"][flipped] != true_hkl[flipped])
    # anomalous truth: Bijvoet mates differ on acentrics only
    ratio = truth["i_plus"] / truth["i_minus"]
    np.testing.assert_allclose(ratio[truth["centric"]], 1.0)
    assert np.std(np.log(ratio[~truth["centric"]])) > 0.05


def test_no_ambiguity_in_a_group_without_one():
    with pytest.raises(ValueError, match="no indexing ambiguity"):
        simulate_stills(5, 10, space_group="P 21 21 21", ambiguity_fraction=0.5)


def test_files_round_trip(tmp_path, ambiguous_stills):
    table, experiments, truth = ambiguous_stills
    exps, t = write_and_read_back(tmp_path, table, experiments, truth)
    assert len(exps) == 200
    np.testing.assert_allclose(exps[7].A_matrix, experiments[7].A_matrix)
    assert exps[0].space_group.hm == "P 4"
    np.testing.assert_array_equal(t["reindexed"], truth["reindexed"])
