"""Input preparation vs DIALS 3.12: row survival, flags, intensities, log counts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxscale.data import flags as F
from jaxscale.data.prepare import UnusableDatasetError, choose_initial_intensities, prepare_dataset
from jaxscale.data.table import ReflectionTable
from jaxscale.io.refl import read_refl

REF = Path(__file__).parent / "reference"
COUNTS = json.loads((REF / "prepare_reference.json").read_text())
FILES = {
    "quartz": "quartz_3ded_dials/integrated.refl",
    "lcys_20": "lcys_4sweep_dials/integrated/lcys_20_integrated.refl",
}


@pytest.mark.parametrize("name", list(FILES))
def test_prepare_matches_dials(shared_data, name):
    prepared = prepare_dataset(read_refl(shared_data / FILES[name]))
    ref = np.load(REF / f"prepare_{name}.npz")
    expect = COUNTS[name]
    c = prepared.counts
    assert (c.n_input, c.n_rows) == (expect["n_input"], expect["n_after_partials"])
    assert c.n_user_excluded == expect["n_user_excluded"]
    assert c.n_excluded == expect["n_excluded"]
    assert c.n_user_excluded_or_excluded == expect["n_user_excluded_or_excluded"]
    assert c.n_suitable == expect["n_suitable"]
    assert np.array_equal(prepared.kept_rows, ref["row_index"])
    t = prepared.table
    assert np.array_equal(F.has_any(t["flags"], F.USER_EXCLUDED_IN_SCALING), ref["user_excluded"])
    assert np.array_equal(F.has_any(t["flags"], F.EXCLUDED_FOR_SCALING), ref["excluded"])
    for ours, theirs in [
        ("intensity", "intensity"), ("variance", "variance"),
        ("prescaling_correction", "prescaling_correction"), ("partiality", "partiality"),
        ("intensity.sum.value", "intensity_sum"), ("intensity.sum.variance", "variance_sum"),
        ("intensity.prf.value", "intensity_prf"), ("intensity.prf.variance", "variance_prf"),
    ]:
        np.testing.assert_allclose(t[ours], ref[theirs], rtol=1e-14, atol=0, err_msg=ours)


def test_quartz_numbers_from_reference_run(shared_data):
    """reference_numbers.md §1: 1653 -> 1620 rows, 108 unsuitable, 67 below partiality 0.4."""
    c = prepare_dataset(read_refl(shared_data / FILES["quartz"])).counts
    assert (c.n_rows, c.n_partials_combined, c.n_user_excluded_or_excluded) == (1620, 33, 108)
    assert c.n_user_excluded_partiality == 67 and c.n_suitable == 1512


def test_flags_match_dials_scaled_refl_of_four_sweeps(shared_data):
    """Our user_excluded / excluded flags equal those in DIALS 3.12's scaled.refl, row for row."""
    scaled = read_refl(shared_data / "lcys_4sweep_dials/reference_dials3.12_scale/scaled.refl")
    for dataset_id, sweep in enumerate((20, 25, 30, 35)):
        prepared = prepare_dataset(read_refl(shared_data / f"lcys_4sweep_dials/integrated/lcys_{sweep}_integrated.refl"))
        theirs = scaled.select(scaled["id"] == dataset_id)
        assert len(theirs) == len(prepared.table)
        assert np.array_equal(theirs["miller_index"], prepared.table["miller_index"])
        for bit in (F.USER_EXCLUDED_IN_SCALING, F.EXCLUDED_FOR_SCALING):
            assert np.array_equal(F.has_any(prepared.table["flags"], bit), F.has_any(theirs["flags"], bit)), (sweep, bit)
    # log: "Excluding 2279/5549 reflections" for sweep 25
    assert prepared.counts.n_rows == 5452


def _synthetic(n=6) -> ReflectionTable:
    t = ReflectionTable()
    t["miller_index"] = np.tile(np.array([[1, 2, 3]], dtype=np.int32), (n, 1))
    t["id"] = np.zeros(n, dtype=np.int32)
    t["flags"] = np.full(n, F.INTEGRATED_SUM | F.INTEGRATED_PRF, dtype=np.uint64)
    t["intensity.sum.value"] = np.array([100.0, 50, -200, 10, 80, 90])
    t["intensity.sum.variance"] = np.array([100.0, 25, 100, 4, 64, 0])
    t["intensity.prf.value"] = np.array([110.0, 60, -10, 12, 70, 95])
    t["intensity.prf.variance"] = np.array([81.0, 16, 100, 4, 49, 81])
    t["partiality"] = np.array([0.5, 1.0, 1.0, 0.3, 1.0, 1.0])
    t["lp"] = np.array([2.0, 1, 1, 1, 1, 1])
    t["dqe"] = np.array([0.5, 1, 1, 1, 0.0, 1])
    return t


def test_filter_rules_on_planted_rows():
    p = prepare_dataset(_synthetic(), min_isigi=-5.0)
    flags = p.table["flags"]
    excluded = F.has_any(flags, F.EXCLUDED_FOR_SCALING)
    user = F.has_any(flags, F.USER_EXCLUDED_IN_SCALING)
    # row 2: sum I/sigma = -20 < -5; row 3: partiality 0.3; row 4: dqe 0; row 5: sum variance 0
    assert excluded.tolist() == [False, False, True, True, True, True]
    assert user.tolist() == [False, False, False, True, False, False]
    # combine: profile values where integrated_prf, conv = lp/dqe = 4 on row 0
    assert p.table["intensity"][0] == pytest.approx(110 * 4) and p.table["variance"][0] == pytest.approx(81 * 16)
    assert p.counts.n_suitable == 2


def test_sum_choice_divides_by_partiality_and_profile_requires_prf():
    t = _synthetic()
    choose_initial_intensities(t, "sum")
    assert t["intensity"][0] == pytest.approx(100 * 4 / 0.5)
    assert t["variance"][0] == pytest.approx(100 * (4 / 0.5) ** 2)
    bad = _synthetic()
    bad["flags"] = np.full(len(bad), F.INTEGRATED_SUM, dtype=np.uint64)
    with pytest.raises(UnusableDatasetError):
        prepare_dataset(bad, intensity_choice="profile")


def test_resolution_cut_uses_best_cell():
    import gemmi

    t = _synthetic()
    t["miller_index"] = np.array([[1, 0, 0], [2, 0, 0], [4, 0, 0], [8, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=np.int32)
    p = prepare_dataset(t, best_cell=gemmi.UnitCell(10, 10, 10, 90, 90, 90), d_min=2.0, d_max=9.0, partiality_cutoff=0.0)
    # d = 10, 5, 2.5, 1.25, 7.07, 10 -> outside [2, 9]: rows 0, 3, 5
    assert F.has_any(p.table["flags"], F.USER_EXCLUDED_IN_SCALING).tolist() == [True, False, False, True, False, True]
    assert p.counts.n_user_excluded_resolution == 3
