"""XDS INTEGRATE.HKL / XDS_ASCII.HKL readers on the small real fixtures.

Expected values are the literal numbers of the files' first records and headers, and a
geometric identity: s1 predicted from the crystal axes, beam, rotation axis and scan
(s0 + R(φ)·A·h) must point where the detector position XD, YD puts the reflection.
"""
from __future__ import annotations

import numpy as np
import pytest

from jaxscale.data import flags as F
from jaxscale.exceptions import InputError
from jaxscale.io.xds import read_xds, read_xds_ascii, read_xds_integrate

FILES = {"careless_INTEGRATE.HKL": 468, "careless_XDS_ASCII.HKL": 453, "gemmi_INTEGRATE-tiny.HKL": 129}


def _rotation(axis: np.ndarray, angles: np.ndarray) -> np.ndarray:
    a = axis / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    s, c = np.sin(angles)[:, None, None], np.cos(angles)[:, None, None]
    return np.eye(3) + s * K + (1 - c) * (K @ K)


@pytest.mark.parametrize("name", sorted(FILES))
def test_rows_and_geometry(shared_data, name):
    table, experiments = read_xds(shared_data / "small_fixtures" / name)
    assert len(table) == FILES[name] and len(experiments) == 1
    e = experiments[0]
    assert table.identifiers == {0: e.identifier}
    z = table["xyzcal.px"][:, 2] if "xyzcal.px" in table else table["xyzobs.px.value"][:, 2]
    start, width = e.oscillation
    phi = np.radians(start + (z - (e.image_range[0] - 1)) * width)
    s0 = -e.s0_direction / e.wavelength
    s1_pred = s0 + np.einsum("nij,nj->ni", _rotation(e.rotation_axis, phi), table["miller_index"] @ e.A_matrix.T)
    s1 = table["s1"]
    cos = np.sum(s1_pred * s1, 1) / np.linalg.norm(s1_pred, axis=1) / np.linalg.norm(s1, axis=1)
    assert np.median(np.arccos(np.clip(cos, -1, 1))) < 3e-3  # radians
    np.testing.assert_allclose(np.linalg.norm(s1, axis=1) * e.wavelength, 1.0, rtol=1e-12)
    # d from the header cell
    d = 1 / np.linalg.norm(table["miller_index"] @ e.A_matrix.T, axis=1)
    np.testing.assert_allclose(table["d"], d, rtol=2e-3)  # header cell vs refined axes, 3 decimals


def test_integrate_first_record(shared_data):
    # " -44 -8 0 2.009E+01 1.095E+01 43.3 369.7 65.1 1.09389 98.71764 38 4 43.1 369.1 65.5 ... -18.65 1"
    t, ex = read_xds_integrate(shared_data / "small_fixtures" / "careless_INTEGRATE.HKL")
    np.testing.assert_array_equal(t["miller_index"][0], [-44, -8, 0])
    assert t["intensity.prf.value"][0] == pytest.approx(20.09 * 1.09389)
    assert t["intensity.prf.variance"][0] == pytest.approx((10.95 * 1.09389) ** 2)
    assert t["lp"][0] * t["intensity.prf.value"][0] == pytest.approx(20.09)
    assert t["intensity.cor.value"][0] == pytest.approx(20.09)
    np.testing.assert_allclose(t["xyzcal.px"][0], [43.3, 369.7, 65.1])
    np.testing.assert_allclose(t["xyzobs.px.value"][0], [43.1, 369.1, 65.5])
    assert t["peak"][0] == pytest.approx(0.9871764) and t["corr"][0] == pytest.approx(0.38)
    assert t["psi"][0] == pytest.approx(-18.65)
    # record 4 was not observed (XOBS = YOBS = ZOBS = 0): calculated position used
    np.testing.assert_allclose(t["xyzobs.px.value"][3], [37.6, 397.2, 72.8])
    assert np.all(t["flags"] == F.INTEGRATED)
    e = ex[0]
    assert e.space_group.number == 96 and e.wavelength == pytest.approx(1.892)
    assert e.oscillation == (0.0, 0.5) and e.image_range[0] == 1
    np.testing.assert_allclose(e.unit_cell.parameters, [79.395, 79.395, 37.840, 90, 90, 90], atol=0.02)
    panel = e.detector["panels"][0]
    assert panel["image_size"] == [2463, 2527] and panel["pixel_size"] == [0.172, 0.172]


def test_xds_ascii_header_and_misfits(shared_data):
    path = shared_data / "small_fixtures" / "careless_XDS_ASCII.HKL"
    t, ex = read_xds_ascii(path)
    e = ex[0]
    assert e.image_range == (1, 1439) and e.oscillation == (0.0, 0.5)
    assert e.space_group.number == 96
    # "0 0 1  3.047E+00  5.176E-01  1316.4  1732.8    504.6   0.04920 100  65  177.54"
    np.testing.assert_array_equal(t["miller_index"][0], [0, 0, 1])
    assert t["intensity.sum.value"][0] == pytest.approx(3.047)
    assert t["intensity.sum.variance"][0] == pytest.approx(0.5176**2)
    np.testing.assert_allclose(t["xyzobs.px.value"][0], [1316.4, 1732.8, 504.6])
    records = [ln.split() for ln in path.read_text().splitlines() if not ln.startswith("!")]
    negative = np.array([float(r[4]) < 0 for r in records])
    assert negative.sum() > 0
    np.testing.assert_array_equal(F.has_any(t["flags"], F.EXCLUDED_FOR_SCALING), negative)


def test_bad_xds_inputs(shared_data, tmp_path):
    src = (shared_data / "small_fixtures" / "careless_XDS_ASCII.HKL").read_text()
    cut = tmp_path / "XDS_ASCII.HKL"
    cut.write_text(src[: len(src) // 2])
    with pytest.raises(InputError, match="XDS_ASCII.HKL.*truncated"):
        read_xds(cut)
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    with pytest.raises(InputError, match="notes.txt"):
        read_xds(other)
    with pytest.raises(InputError, match="missing.HKL"):
        read_xds(tmp_path / "missing.HKL")
    broken = tmp_path / "broken.HKL"
    broken.write_text(src.replace("!ITEM_PSI=12\n", ""))
    with pytest.raises(InputError, match="broken.HKL"):
        read_xds(broken)
