"""Profile/summation combination vs DIALS 3.12's own Imid test (captured during dials.scale runs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxscale.data import flags as F
from jaxscale.data.combine import apply_imid, blend, candidate_imids, choose_imid, rmeas
from jaxscale.data.prepare import prepare_dataset
from jaxscale.data.table import ReflectionTable
from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl

REF = Path(__file__).parent / "reference"
BASES = {
    "quartz": "quartz_3ded_dials/integrated",
    "lcys_20": "lcys_4sweep_dials/integrated/lcys_20_integrated",
}
# dials.scale logs (reference_numbers.md): quartz -> profile, lcys_20 -> summation
EXPECTED = {"quartz": (0.0, [0.08715, 0.12266, 0.09394, 0.08951, 0.0999]), "lcys_20": (1.0, [0.03072, 0.02358, 0.02591, 0.02752, 0.02549])}


@pytest.mark.parametrize("name", list(BASES))
def test_imid_choice_matches_dials(shared_data, name):
    base = shared_data / BASES[name]
    prepared = prepare_dataset(read_refl(f"{base}.refl"))
    ref = np.load(REF / f"combine_{name}.npz")
    sg = read_expt(f"{base}.expt")[0].space_group
    choice = choose_imid([prepared.table], sg, [ref["inverse_scale_factor"]], [ref["outlier"]])
    assert choice.n_test == int(ref["n_test_rows"])
    np.testing.assert_allclose(choice.imids, ref["imids"], rtol=1e-12)
    np.testing.assert_allclose(choice.rmeas, ref["rmeas"], rtol=1e-10)
    imid, rounded = EXPECTED[name]
    assert choice.imid == imid
    assert np.round(choice.rmeas, 5).tolist() == rounded


def test_candidate_list_and_blend():
    raw = np.array([5.0, 20.0, 30000.0])
    # avg = 10008.33, Imid0 = 3000 <= avg -> no division
    assert candidate_imids(raw) == pytest.approx([0, 1, 10008.333333333334, 3000.0])
    raw = np.array([1.0, 2.0, 1e6])
    assert candidate_imids(raw) == pytest.approx([0, 1, 333334.3333333333, 1e5])
    raw = np.array([1.0] * 99 + [1e6])
    assert candidate_imids(raw) == pytest.approx([0, 1, 10000.99, 1e5, 1e4])
    i, v = blend(np.array([10.0, 10.0]), np.array([-5.0, 100.0]), np.array([1.0, 1.0]), np.array([4.0, 4.0]), 100.0)
    assert i.tolist() == [10.0, 0.5 * 10 + 0.5 * 100] and v.tolist() == [1.0, 2.5]


def test_rmeas_planted():
    # group 0: I = 10, 12 (equal sigma): mean 11, sqrt(2) * 2 / 22; group 1 single obs
    i = np.array([10.0, 12.0, 50.0, 0.5])
    s = np.array([1.0, 1.0, 1.0, 1.0])  # last row I/sigma = 0.5 -> dropped
    assert rmeas(i, s, np.array([0, 0, 1, 0])) == pytest.approx(np.sqrt(2) * 2 / 22)
    assert rmeas(np.array([0.5]), np.array([1.0]), np.array([0])) == -1.0


def test_apply_imid_rules():
    t = ReflectionTable()
    t["flags"] = np.array([F.INTEGRATED, F.INTEGRATED_SUM, F.INTEGRATED_PRF], dtype=np.uint64)
    t["intensity.sum.value"] = np.array([100.0, 200, 300])
    t["intensity.sum.variance"] = np.array([10.0, 20, 30])
    t["intensity.prf.value"] = np.array([110.0, 210, 310])
    t["intensity.prf.variance"] = np.array([11.0, 21, 31])
    t["partiality"] = np.array([0.5, 1.0, 1.0])
    t["prescaling_correction"] = np.array([2.0, 1.0, 1.0])
    i, v = apply_imid(t, 1.0)
    assert i.tolist() == [400.0, 200.0, 310.0] and v.tolist() == [160.0, 20.0, 31.0]
    i, v = apply_imid(t, 0.0)
    assert i.tolist() == [220.0, 200.0, 310.0] and v.tolist() == [44.0, 20.0, 31.0]
    i, _ = apply_imid(t, 200.0)
    assert i[0] == pytest.approx(2 * (0.5 * 110 + 0.5 * 200)) and i[1] == 200.0
