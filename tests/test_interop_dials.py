"""DIALS 3.12 reads our scaled.refl/.expt: dials.show, dials.merge and dials.export succeed,
and dials.merge's merged intensities equal those of our merged MTZ (same scaled data).

Shares the lcys_20 scaling run of tests/test_pipeline_outputs.py.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tests.conftest import requires_dials
from tests.test_pipeline_outputs import scaled_lcys

pytestmark = requires_dials


@pytest.fixture(scope="module")
def lcys(tmp_path_factory):
    return scaled_lcys(tmp_path_factory)


def _dials(cwd, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _mtz_columns(path, labels):
    import gemmi

    mtz = gemmi.read_mtz_file(str(path))
    hkl = np.asarray(mtz.make_miller_array())
    order = np.lexsort(hkl.T[::-1])
    return hkl[order], {c: np.asarray(mtz.column_with_label(c))[order] for c in labels}


def test_dials_show(lcys, tmp_path):
    out, _ = lcys
    proc = _dials(tmp_path, "dials.show", str(out / "scaled.expt"))
    assert "Scaling model" in proc.stdout or "scaling model" in proc.stdout.lower()


def test_dials_merge_agrees_with_our_merged_mtz(lcys, tmp_path):
    out, _ = lcys
    _dials(tmp_path, "dials.merge", str(out / "scaled.refl"), str(out / "scaled.expt"), "output.mtz=dials.mtz",
           "output.html=None")
    hkl_d, dials = _mtz_columns(tmp_path / "dials.mtz", ["IMEAN", "SIGIMEAN", "I(+)", "I(-)"])
    hkl_o, ours = _mtz_columns(out / "merged.mtz", ["IMEAN", "SIGIMEAN", "I(+)", "I(-)"])
    np.testing.assert_array_equal(hkl_d, hkl_o)
    for label in ("IMEAN", "SIGIMEAN", "I(+)", "I(-)"):
        d, o = dials[label], ours[label]
        np.testing.assert_array_equal(np.isnan(d), np.isnan(o))
        ok = ~np.isnan(d)
        np.testing.assert_allclose(o[ok], d[ok], rtol=1e-5, atol=1e-3)


def test_dials_export(lcys, tmp_path):
    import gemmi

    out, res = lcys
    _dials(tmp_path, "dials.export", str(out / "scaled.refl"), str(out / "scaled.expt"),
           "mtz.hklout=dials_unmerged.mtz")
    theirs = gemmi.read_mtz_file(str(tmp_path / "dials_unmerged.mtz"))
    ours = gemmi.read_mtz_file(str(out / "unmerged.mtz"))
    assert theirs.nreflections == ours.nreflections == int(res.statistics.overall.n_obs[0])
