"""MTZ reader and writers against DIALS 3.12 `dials.export` (reference/mtz_dials_export.json,
made by reference/make_mtz_reference.py) and against planted truth."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gemmi
import numpy as np
import pytest

from jaxscale.data import flags as F
from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError
from jaxscale.io.expt import Experiment, read_expt
from jaxscale.io.mtz import (
    _combine_partials,
    _next_epoch,
    calculate_batch_offsets,
    read_unmerged_mtz,
    write_merged_mtz,
    write_unmerged_mtz,
)
from jaxscale.io.refl import read_refl
from tests.conftest import DIALS_PYTHON, requires_dials

REF = json.loads((Path(__file__).parent / "reference" / "mtz_dials_export.json").read_text())
LCYS_SCALED = "lcys_4sweep_dials/reference_dials3.12_scale/scaled"
LCYS20_INTEGRATED = "lcys_4sweep_dials/integrated/lcys_20_integrated"
# iotbx field -> (first float word, count) in the gemmi batch header
FIELDS = {"cell": (0, 6), "umat": (6, 9), "phistt": (36, 1), "phiend": (37, 1), "scanax": (38, 3),
          "phirange": (47, 1), "e1": (59, 3), "source": (80, 3), "so": (83, 3), "alambd": (86, 1),
          "dx": (111, 1), "detlm": (113, 4)}
INTS = {"lbcell": (4, 6), "ncryst": (12, 1), "ldtype": (14, 1), "jsaxs": (15, 1), "ngonax": (17, 1),
        "ndet": (19, 1), "nbsetid": (20, 1)}


@pytest.fixture(scope="module")
def written(shared_data, tmp_path_factory):
    """Our unmerged MTZ of the two reference cases, read back with gemmi."""
    out = {}
    for name, stem in (("lcys_scaled", LCYS_SCALED), ("lcys20_integrated", LCYS20_INTEGRATED)):
        table = read_refl(shared_data / f"{stem}.refl")
        experiments = read_expt(shared_data / f"{stem}.expt")
        path = tmp_path_factory.mktemp("mtz") / f"{name}.mtz"
        n = write_unmerged_mtz(path, table, experiments)
        out[name] = (path, n, table, experiments)
    return out


def _columns(mtz: gemmi.Mtz) -> dict[str, np.ndarray]:
    data = np.array(mtz, dtype=np.float64)
    return {c.label.replace("M/ISYM", "M_ISYM"): data[:, i] for i, c in enumerate(mtz.columns)}


@pytest.mark.parametrize("case", ["lcys_scaled", "lcys20_integrated"])
def test_rows_and_columns_match_dials_export(written, case):
    ref = REF[case]
    path, n, _, _ = written[case]
    mtz = gemmi.read_mtz_file(str(path))
    assert n == ref["nrows"] == mtz.nreflections
    labels = [c.label.replace("M/ISYM", "M_ISYM") for c in mtz.columns]
    assert labels == ref["labels"]
    assert [c.type for c in mtz.columns] == ref["types"]
    cols = _columns(mtz)
    rows = np.array(ref["row_index"])
    for label in ref["labels"]:
        if label == "M_ISYM":  # ISYM numbering follows each file's own SYMM order (checked below)
            continue
        np.testing.assert_allclose(cols[label][rows], ref["rows"][label], rtol=1e-7, atol=0, err_msg=label)
        np.testing.assert_allclose(cols[label].sum(), ref["sums"][label], rtol=1e-9, err_msg=label)
    mtz.switch_to_original_hkl()
    np.testing.assert_array_equal(np.array(mtz)[rows, :3], ref["original_index"])


@pytest.mark.parametrize("case", ["lcys_scaled", "lcys20_integrated"])
def test_batch_headers_match_dials_export(written, case):
    ref = REF[case]
    path = written[case][0]
    mtz = gemmi.read_mtz_file(str(path))
    assert [b.number for b in mtz.batches] == ref["batch_numbers"]
    worst = {}
    for i, expected in zip(ref["batch_index"], ref["batches"]):
        batch = mtz.batches[i]
        f = np.array(batch.floats)
        for key, (start, count) in FIELDS.items():
            want = np.atleast_1d(expected[key])[:count]
            worst[key] = max(worst.get(key, 0.0), float(np.max(np.abs(f[start:start + count] - want))))
        for key, (start, count) in INTS.items():
            assert list(batch.ints)[start:start + count] == list(np.atleast_1d(expected[key])), key
        assert batch.title.endswith(f"Batch {batch.number}")
    # float32 precision: angles ~180 deg carry 1.5e-5 ulp
    tol = {"phistt": 2e-5, "phiend": 2e-5, "dx": 2e-5, "cell": 1e-5}
    for key, value in worst.items():
        assert value <= tol.get(key, 1e-7), (key, value)


def test_file_records(written):
    path = written["lcys_scaled"][0]
    mtz = gemmi.read_mtz_file(str(path))
    xtal = REF["lcys_scaled"]["crystals"][-1]
    assert [(d.project_name, d.crystal_name, d.dataset_name, d.id) for d in mtz.datasets] == [
        ("DIALS", "XTAL", "FROMDIALS", 1)]
    np.testing.assert_allclose(mtz.datasets[0].cell.parameters, xtal[2], rtol=1e-6)
    assert mtz.datasets[0].wavelength == pytest.approx(xtal[3][0][1])
    assert mtz.spacegroup.hm == "P 2 2 2"
    assert all(b.dataset_id == 1 for b in mtz.batches)


def test_roundtrip_reader_returns_written_data(written):
    path, n, table, experiments = written["lcys_scaled"]
    t, ex = read_unmerged_mtz(path)
    assert len(t) == n and len(ex) == 4
    mtz = gemmi.read_mtz_file(str(path))
    cols = _columns(mtz)
    mtz.switch_to_original_hkl()
    np.testing.assert_array_equal(t["miller_index"], np.array(mtz)[:, :3].astype(np.int32))
    np.testing.assert_array_equal(t["batch"], cols["BATCH"])
    np.testing.assert_array_equal(t["intensity.sum.value"], cols["I"])
    np.testing.assert_array_equal(t["intensity.sum.variance"], cols["SIGI"] ** 2)
    np.testing.assert_array_equal(t["inverse_scale_factor"], cols["SCALEUSED"])
    np.testing.assert_array_equal(t["partiality"], cols["FRACTIONCALC"])
    np.testing.assert_array_equal(t["xyzobs.px.value"][:, :2], np.stack([cols["XDET"], cols["YDET"]], 1))
    assert np.all(t["flags"] == F.INTEGRATED_SUM)
    # sweeps recovered from the batch headers: same image ranges, offsets and oscillations
    for e_in, e_out in zip(experiments, ex):
        n_img = e_in.image_range[1] - e_in.image_range[0] + 1
        assert e_out.image_range == (1, n_img)
        assert e_out.scan["batch_offset"] + 1 == ({0: 1, 1: 1901, 2: 3701, 3: 5501}[ex.index(e_out)])
        assert e_out.oscillation == pytest.approx(e_in.oscillation, abs=1e-6)
        assert e_out.wavelength == pytest.approx(e_in.wavelength, abs=1e-6)
        assert e_out.space_group.hm == "P 2 2 2"
    # floor(z) + 1 + offset = BATCH, and s1 from the header orientation lies on the Ewald sphere
    z = t["xyzobs.px.value"][:, 2]
    offset = np.array([ex[i].scan["batch_offset"] for i in t["id"]])
    np.testing.assert_array_equal(np.floor(z) + 1 + offset, t["batch"])
    lam = np.array([ex[i].wavelength for i in t["id"]])
    assert np.abs(np.linalg.norm(t["s1"], axis=1) * lam - 1).max() < 1e-3
    # d from the file's (median) cell: the resolution range dials.export reports
    np.testing.assert_allclose(np.sort(t["d"])[[0, -1]], [0.589251, 6.80511], rtol=1e-5)


def test_reader_on_dials_written_fixture(shared_data):
    path = shared_data / "small_fixtures" / "insulin_unmerged_cutted_from_ccp4.mtz"
    t, ex = read_unmerged_mtz(path)
    np.testing.assert_array_equal(t["miller_index"], REF["insulin_cutted_original_index"])
    assert len(ex) == 1 and ex[0].image_range == (1, 45) and ex[0].space_group.hm == "I 2 3"
    assert {"intensity.sum.value", "intensity.prf.value", "partiality", "lp", "s1"} <= set(t.keys())
    assert np.all(t["flags"] == (F.INTEGRATED_SUM | F.INTEGRATED_PRF))
    lam = ex[0].wavelength
    assert np.abs(np.linalg.norm(t["s1"], axis=1) * lam - 1).max() < 1e-3


@pytest.mark.parametrize("name,nrows,nsweeps", [
    ("insulin_xia2_unmerged_mtz/insulin_dials_scaled_unmerged.mtz", 45595, 1),
    ("smallmol_xia2_dials_unmerged_mtz/AUTOMATIC_DEFAULT_scaled_unmerged.mtz", 5508, 1),
    ("pyp_laue_unmerged_mtz/off.mtz", 48069, 1),
    ("small_fixtures/abismal_conventional.mtz", 839, 1),
])
def test_reader_on_other_writers(shared_data, name, nrows, nsweeps):
    t, ex = read_unmerged_mtz(shared_data / name)
    assert len(t) == nrows and len(ex) == nsweeps
    assert t["miller_index"].dtype == np.int32 and t["miller_index"].shape == (nrows, 3)
    assert np.all(np.isfinite(t["intensity.sum.value"])) or "intensity.prf.value" in t
    assert np.all(t["d"] > 0)


def test_gemmi_reads_standard_types(written):
    mtz = gemmi.read_mtz_file(str(written["lcys_scaled"][0]))
    types = {c.label: c.type for c in mtz.columns}
    assert types["I"] == "J" and types["SIGI"] == "Q" and types["BATCH"] == "B" and types["M/ISYM"] == "Y"
    assert mtz.switch_to_original_hkl()
    # ASU indices are gemmi's (= CCP4) ASU: mapping the original indices there is the identity
    asu = gemmi.ReciprocalAsu(mtz.spacegroup)
    hkl = _columns(gemmi.read_mtz_file(str(written["lcys_scaled"][0])))
    h = np.stack([hkl["H"], hkl["K"], hkl["L"]], 1).astype(int)
    assert all(asu.is_in(list(x)) for x in h[:200])


def test_merged_writer(tmp_path):
    miller = np.array([[1, 2, 3], [0, 0, 4], [2, 0, 1]])
    imean = np.array([10.5, 3.25, -1.0])
    nplus = np.array([3, 2, np.nan])
    path = tmp_path / "merged.mtz"
    write_merged_mtz(path, cell=(5.4815, 8.2158, 12.1457, 90, 90, 90), space_group="P 2 2 2", wavelength=0.6889,
                     miller=miller, columns={"IMEAN": ("J", imean), "SIGIMEAN": ("Q", imean / 10),
                                             "N(+)": ("I", nplus)})
    mtz = gemmi.read_mtz_file(str(path))
    assert [(c.label, c.type) for c in mtz.columns] == [("H", "H"), ("K", "H"), ("L", "H"), ("IMEAN", "J"),
                                                         ("SIGIMEAN", "Q"), ("N(+)", "I")]
    data = np.array(mtz)
    np.testing.assert_array_equal(data[:, :3], miller)
    np.testing.assert_allclose(data[:, 3], imean)
    assert np.isnan(data[2, 5])
    assert mtz.spacegroup.hm == "P 2 2 2" and mtz.datasets[0].dataset_name == "NATIVE"
    assert mtz.datasets[0].wavelength == pytest.approx(0.6889)
    with pytest.raises(InputError):  # merged data is not an unmerged MTZ
        read_unmerged_mtz(path)


def test_bad_inputs(shared_data, tmp_path):
    good = shared_data / "small_fixtures" / "insulin_unmerged_cutted_from_ccp4.mtz"
    truncated = tmp_path / "truncated.mtz"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(InputError, match="truncated.mtz"):
        read_unmerged_mtz(truncated)
    with pytest.raises(InputError, match="missing.mtz"):
        read_unmerged_mtz(tmp_path / "missing.mtz")
    # unmerged layout but no intensity columns
    mtz = gemmi.read_mtz_file(str(good))
    keep = [c.label for c in mtz.columns if c.type not in "JQ"]
    no_i = tmp_path / "no_intensity.mtz"
    small = gemmi.Mtz(with_base=False)
    small.spacegroup, small.cell = mtz.spacegroup, mtz.cell
    small.add_dataset("x")
    for c in mtz.columns:
        if c.label in keep:
            small.add_column(c.label, c.type)
    small.set_data(np.array(mtz)[:, [mtz.column_labels().index(k) for k in keep]])
    for b in mtz.batches:
        small.batches.append(b)
    small.write_to_file(str(no_i))
    with pytest.raises(InputError, match="no_intensity.mtz.*intensity"):
        read_unmerged_mtz(no_i)


def test_batch_offsets_rule():
    """Values as DIALS 3.12 dials.util.batch_handling gives them."""
    assert [_next_epoch(v) for v in (1800, 1799, 1899, 3600, 45, 0)] == [1901, 1801, 1901, 3701, 101, 101]
    assert calculate_batch_offsets([(1, 1800), (1, 1700), (1, 1700), (1, 1700)]) == [0, 1900, 3700, 5500]
    assert calculate_batch_offsets([(0, 9), (0, 9)]) == [1, 101]  # batches 1-10, then 101-110
    assert calculate_batch_offsets([(1, 10), (20, 30)]) == [0, 0]  # disjoint: kept
    assert calculate_batch_offsets([(1, 10), (11, 30)]) == [0, 0]  # adjacent: kept
    assert calculate_batch_offsets([(1, 10), (10, 30)]) == [0, 91]  # overlapping: moved to 101


def test_partials_combined_by_inverse_variance():
    """Planted: three partials of one reflection and one full; DIALS' rule by hand."""
    cols = {"id": np.array([0, 0, 0, 0]), "partial_id": np.array([7, 7, 7, 9], dtype=np.uint64),
            "partiality": np.array([0.3, 0.5, 0.2, 1.0]),
            "intensity.scale.value": np.array([10.0, 20.0, 5.0, 50.0]),
            "intensity.scale.variance": np.array([4.0, 1.0, 2.0, 9.0])}
    keep = _combine_partials(cols, ["scale"])
    np.testing.assert_array_equal(keep, [True, False, False, True])
    w = 1 / np.array([4.0, 1.0, 2.0])
    assert cols["intensity.scale.value"][0] == pytest.approx((w * [10.0, 20.0, 5.0]).sum() / w.sum())
    assert cols["intensity.scale.variance"][0] == pytest.approx(1 / w.sum())
    assert cols["partiality"][0] == pytest.approx(1.0)
    assert cols["intensity.scale.value"][3] == 50.0


def test_writer_selects_scaled_rows():
    """Planted table: bad_for_scaling, g <= 0, low partiality and I/σ < -5 rows are dropped."""
    n = 6
    cols = {
        "miller_index": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], np.int32),
        "id": np.zeros(n, np.int32),
        "flags": np.array([0, F.OUTLIER_IN_SCALING, 0, 0, 0, 0], np.uint64),
        "inverse_scale_factor": np.array([2.0, 1.0, 0.0, 1.0, 1.0, 1.0]),
        "intensity.scale.value": np.array([100.0, 1.0, 1.0, 1.0, -60.0, 8.0]),
        "intensity.scale.variance": np.array([16.0, 1.0, 1.0, 1.0, 100.0, 4.0]),
        "partiality": np.array([1.0, 1.0, 1.0, 0.3, 1.0, 0.9]),
        "xyzobs.px.value": np.array([[1.0, 2.0, 0.5]] * n),
    }
    table = ReflectionTable(cols, {0: "a"})
    expt = Experiment(identifier="a", beam={"direction": [0, 0, 1], "wavelength": 1.0},
                      detector={"panels": [{"fast_axis": [1, 0, 0], "slow_axis": [0, -1, 0],
                                            "origin": [-10, 10, -100], "image_size": [20, 20]}]},
                      goniometer={"rotation_axis": [1, 0, 0]},
                      scan={"image_range": [1, 3], "oscillation": [0.0, 1.0], "batch_offset": 0},
                      crystal={"real_space_a": [10, 0, 0], "real_space_b": [0, 11, 0], "real_space_c": [0, 0, 12],
                               "space_group_hall_symbol": " P 1"})
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.mtz"
        assert write_unmerged_mtz(path, table, [expt]) == 2
        mtz = gemmi.read_mtz_file(str(path))
        c = _columns(mtz)
        np.testing.assert_allclose(c["I"], [50.0, 8.0])  # I / g
        np.testing.assert_allclose(c["SIGI"], [2.0, 2.0])
        np.testing.assert_allclose(c["SCALEUSED"], [2.0, 1.0])
        np.testing.assert_allclose(c["QE"], [1.0, 1.0])
        assert len(mtz.batches) == 3 and [b.number for b in mtz.batches] == [1, 2, 3]
        f = np.array(mtz.batches[0].floats)
        np.testing.assert_allclose(f[0:6], [10, 11, 12, 90, 90, 90], rtol=1e-6)
        assert f[111] == pytest.approx(100.0)  # directed distance
        np.testing.assert_allclose(f[59:62], [0, 0, 1], atol=1e-7)  # rotation axis → Cambridge z
        np.testing.assert_allclose(f[83:86], [-1, 0, 0], atol=1e-7)  # sample → source


@requires_dials
def test_live_dials_export_full_comparison(shared_data, written, tmp_path):
    """All rows and all 6900 batch headers against a fresh dials.export run (~5 s)."""
    subprocess.run(["dials.export", str(shared_data / f"{LCYS_SCALED}.refl"), str(shared_data / f"{LCYS_SCALED}.expt"),
                    "format=mtz", f"mtz.hklout={tmp_path / 'dials.mtz'}"], check=True, cwd=tmp_path,
                   capture_output=True)
    theirs = gemmi.read_mtz_file(str(tmp_path / "dials.mtz"))
    ours = gemmi.read_mtz_file(str(written["lcys_scaled"][0]))
    a, b = _columns(ours), _columns(theirs)
    for label in b:
        if label != "M_ISYM":
            np.testing.assert_array_equal(a[label], b[label], err_msg=label)
    ours.switch_to_original_hkl()
    theirs.switch_to_original_hkl()
    np.testing.assert_array_equal(np.array(ours)[:, :3], np.array(theirs)[:, :3])
    fa = np.array([list(x.floats) for x in ours.batches])
    fb = np.array([list(x.floats) for x in theirs.batches])
    assert np.abs(fa - fb)[:, 6:15].max() <= 1.2e-7  # umat
    assert np.abs(fa - fb).max() <= 2e-5  # phistt/phiend float32 rounding at ~180 deg
    assert [list(x.ints) for x in ours.batches] == [list(x.ints) for x in theirs.batches]
    # cctbx (the reader DIALS, xia2 and phenix use) decodes our M/ISYM to the same indices
    script = ("import iotbx.mtz, json, sys; m = iotbx.mtz.object(sys.argv[1]); "
              "print(json.dumps([list(h) for h in m.extract_original_index_miller_indices()]))")
    got = subprocess.run([DIALS_PYTHON, "-c", script, str(written["lcys_scaled"][0])], check=True,
                         capture_output=True, text=True).stdout
    np.testing.assert_array_equal(json.loads(got), np.array(theirs)[:, :3])


def test_two_wavelengths_two_datasets(tmp_path):
    """Planted: experiments at 1.0 and 1.5 Å → datasets 1 and 2, columns in the last, batches
    pointing at their wavelength; identical image ranges are moved to the next epoch."""
    def expt(ident, wavelength):
        return Experiment(identifier=ident, beam={"direction": [0, 0, 1], "wavelength": wavelength},
                          detector={"panels": [{"fast_axis": [1, 0, 0], "slow_axis": [0, -1, 0],
                                                "origin": [-10, 10, -100], "image_size": [20, 20]}]},
                          goniometer={"rotation_axis": [1, 0, 0]},
                          scan={"image_range": [1, 2], "oscillation": [0.0, 1.0], "batch_offset": 0},
                          crystal={"real_space_a": [10, 0, 0], "real_space_b": [0, 11, 0],
                                   "real_space_c": [0, 0, 12], "space_group_hall_symbol": " P 1"})
    n = 4
    table = ReflectionTable({
        "miller_index": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], np.int32),
        "id": np.array([0, 0, 1, 1], np.int32), "flags": np.zeros(n, np.uint64),
        "inverse_scale_factor": np.ones(n), "intensity.scale.value": np.full(n, 10.0),
        "intensity.scale.variance": np.ones(n), "xyzobs.px.value": np.array([[1.0, 1.0, 0.5]] * 2 + [[1, 1, 1.5]] * 2),
    }, {0: "a", 1: "b"})
    path = tmp_path / "two.mtz"
    write_unmerged_mtz(path, table, [expt("a", 1.0), expt("b", 1.5)])
    mtz = gemmi.read_mtz_file(str(path))
    assert [(d.id, d.wavelength) for d in mtz.datasets] == [(1, 1.0), (2, 1.5)]
    assert {c.dataset_id for c in mtz.columns} == {2}
    assert [(b.number, b.dataset_id) for b in mtz.batches] == [(1, 1), (2, 1), (101, 2), (102, 2)]
    np.testing.assert_array_equal(_columns(mtz)["BATCH"], [1, 1, 102, 102])
    t, ex = read_unmerged_mtz(path)
    assert [e.wavelength for e in ex] == pytest.approx([1.0, 1.5])
    np.testing.assert_array_equal(t["id"], [0, 0, 1, 1])
