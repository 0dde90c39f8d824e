"""ASU mapping, centric flags, epsilons, absences and d against cctbx (fixture from make_dials_reference.py)."""
from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import pytest

from jaxscale.data.symmetry import (
    best_unit_cell,
    d_spacing,
    epsilon,
    group_ids,
    is_centric,
    is_systematically_absent,
    map_to_asu,
)

REF = np.load(Path(__file__).parent / "reference" / "asu_cctbx.npz")


def _space_group(hall: str) -> gemmi.SpaceGroup:
    return gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(hall))


def test_asu_and_flags_match_cctbx_in_every_setting():
    hkl = REF["hkl"]
    halls = REF["hall"]
    assert len(halls) > 500
    for k, hall in enumerate(halls):
        sg = _space_group(str(hall))
        asu, isym = map_to_asu(hkl, sg, anomalous=False)
        asu_anom, _ = map_to_asu(hkl, sg, anomalous=True)
        assert np.array_equal(asu, REF["asu"][k]), sg.xhm()
        assert np.array_equal(asu_anom, REF["asu_anom"][k]), sg.xhm()
        assert np.array_equal(is_centric(hkl, sg), REF["centric"][k]), sg.xhm()
        assert np.array_equal(epsilon(hkl, sg), REF["epsilon"][k]), sg.xhm()
        assert np.array_equal(is_systematically_absent(hkl, sg), REF["absent"][k]), sg.xhm()
        assert isym.min() >= 1 and isym.max() <= 2 * len(sg.operations().sym_ops)


@pytest.mark.parametrize("symbol", ["P 31 2 1", "P 1 21/n 1", "I 41 3 2", "R 3 :H", "P 6 2 2"])
def test_isym_matches_gemmi_scalar(symbol):
    sg = gemmi.SpaceGroup(symbol)
    hkl = np.random.default_rng(3).integers(-15, 16, size=(400, 3))
    asu, isym = map_to_asu(hkl, sg)
    ra = gemmi.ReciprocalAsu(sg)
    ops = sg.operations()
    for row, a, s in zip(hkl, asu, isym):
        expect, expect_isym = ra.to_asu([int(v) for v in row], ops)
        assert list(a) == expect and s == expect_isym


def test_group_ids_and_friedel_split():
    sg = gemmi.SpaceGroup("P 2 2 2")
    hkl = np.array([[1, 2, 3], [1, -2, -3], [-1, 2, 3], [1, 2, 3], [2, 0, 0]])
    asu, _ = map_to_asu(hkl, sg)
    gid, uniq = group_ids(asu)
    assert gid.tolist() == [0, 0, 0, 0, 1]
    assert uniq.tolist() == [[1, 2, 3], [2, 0, 0]]
    asu_a, _ = map_to_asu(hkl, sg, anomalous=True)
    gid_a, _ = group_ids(asu_a)
    # (1,-2,-3) is a 2-fold image of (1,2,3): I+; (-1,2,3) is the Friedel mate of one: I-
    assert gid_a[0] == gid_a[1] == gid_a[3] != gid_a[2]
    plus = np.all(asu_a == asu, axis=1)
    gid_p, _ = group_ids(asu, plus_minus=plus)
    assert np.array_equal(gid_p == gid_p[0], gid_a == gid_a[0])


def test_d_spacing_matches_gemmi_and_median_cell():
    cell = gemmi.UnitCell(4.9249, 4.9249, 5.4014, 90, 90, 120)
    hkl = np.random.default_rng(0).integers(-9, 10, size=(200, 3))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    assert np.allclose(d_spacing(hkl, cell), cell.calculate_d_array(hkl.astype(np.int32)), rtol=1e-14)

    class E:
        def __init__(self, *p):
            self.unit_cell = gemmi.UnitCell(*p)

    best = best_unit_cell([E(5, 8, 12, 90, 90, 90), E(5.2, 8.1, 12, 90, 90, 90), E(5.1, 8.4, 12.3, 90, 90, 90), E(5.3, 8, 12, 90, 90, 90)])
    assert np.allclose(best.parameters, (5.15, 8.05, 12.0, 90, 90, 90))
