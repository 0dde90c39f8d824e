"""Merged MTZ export vs dials.merge, and French–Wilson against closed forms."""
from __future__ import annotations

import math
import subprocess

import gemmi
import numpy as np
import pytest

from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.merge.french_wilson import french_wilson
from tests.conftest import requires_dials

COLUMNS = ["H", "K", "L", "IMEAN", "SIGIMEAN", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)", "N(+)", "N(-)",
           "F", "SIGF", "F(+)", "SIGF(+)", "F(-)", "SIGF(-)", "DANO", "SIGDANO"]


def _table(mtz: gemmi.Mtz) -> dict[str, np.ndarray]:
    data = np.array(mtz, copy=False)
    return {c.label: data[:, i].astype(float) for i, c in enumerate(mtz.columns)}


@requires_dials
def test_merged_mtz_matches_dials_merge(shared_data, tmp_path):
    from jaxscale.export import write_merged_mtz_from_scaled

    ref_dir = shared_data / "lcys_4sweep_dials" / "reference_dials3.12_scale"
    subprocess.run(["dials.merge", str(ref_dir / "scaled.expt"), str(ref_dir / "scaled.refl"),
                    "output.mtz=dials.mtz", "output.html=None"], cwd=tmp_path, check=True,
                   capture_output=True)
    write_merged_mtz_from_scaled(tmp_path / "ours.mtz", read_refl(ref_dir / "scaled.refl"),
                                 read_expt(ref_dir / "scaled.expt"), anomalous=True)
    theirs = gemmi.read_mtz_file(str(tmp_path / "dials.mtz"))
    ours = gemmi.read_mtz_file(str(tmp_path / "ours.mtz"))
    assert [c.label for c in ours.columns] == COLUMNS == [c.label for c in theirs.columns]
    assert [c.type for c in ours.columns] == [c.type for c in theirs.columns]
    assert ours.spacegroup.hm == theirs.spacegroup.hm
    assert ours.datasets[-1].wavelength == pytest.approx(theirs.datasets[-1].wavelength)
    a, b = _table(ours), _table(theirs)
    for col in ("H", "K", "L"):
        np.testing.assert_array_equal(a[col], b[col])               # same reflections, same order
    for col in ("IMEAN", "SIGIMEAN", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)", "N(+)", "N(-)"):
        np.testing.assert_array_equal(np.isnan(a[col]), np.isnan(b[col]), err_msg=col)
        np.testing.assert_allclose(a[col], b[col], rtol=1e-6, equal_nan=True, err_msg=col)
    # French–Wilson: same accepted set; amplitudes close (DIALS interpolates tables and uses
    # a normal approximation from h >= 3, we integrate the posterior exactly)
    for col in ("F", "F(+)", "F(-)"):
        np.testing.assert_array_equal(np.isnan(a[col]), np.isnan(b[col]), err_msg=col)
        ok = ~np.isnan(b[col])
        rel = np.abs(a[col][ok] - b[col][ok]) / b[col][ok]
        assert np.median(rel) < 1e-3 and rel.max() < 0.03, col


def test_french_wilson_acentric_truncated_normal():
    """Acentric posterior of J is a normal truncated at 0: E[J] = σ(h + φ(h)/Φ(h))."""
    rng = np.random.default_rng(2)
    n = 400
    d_star_sq = np.full(n, 0.25)                        # one resolution: Σ = median(I)/ln 2
    intensity = rng.exponential(100.0, n)
    sigma = np.full(n, 10.0)
    fw = french_wilson(intensity, sigma, d_star_sq, np.zeros(n, bool))
    expected = np.median(intensity) / math.log(2)
    h = intensity / sigma - sigma / expected
    phi = np.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    ok = fw.valid
    np.testing.assert_allclose(fw.J[ok], sigma[ok] * (h[ok] + phi[ok] / Phi[ok]), rtol=1e-8)
    # strong reflections: F -> sqrt(I), σF -> σ / (2F)
    strong = h > 30
    np.testing.assert_allclose(fw.F[strong], np.sqrt(sigma[strong] * h[strong]), rtol=2e-3)
    np.testing.assert_allclose(fw.sigF[strong], sigma[strong] / (2 * fw.F[strong]), rtol=2e-2)


def test_french_wilson_centric_large_h_series():
    """Centric E[F] for large h follows √(hσ)(1 − 3/(8h²) − ...) (French & Wilson 1978)."""
    h = np.array([6.0, 10.0, 20.0])
    sigma = np.ones(3)
    fw = french_wilson(h, sigma, np.full(3, 0.25), np.ones(3, bool))
    # bypass the data-derived Σ: with three strong reflections Σ = median/ln2, h shifts by σ/(2Σ)
    hh = h - sigma / (2 * np.median(h) / math.log(2))
    series = np.sqrt(hh) * (1 - 3 / 8 / hh**2 - 87 / 128 / hh**4)
    np.testing.assert_allclose(fw.F, series, rtol=2e-3)
