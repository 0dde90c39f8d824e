"""Real spherical harmonics and crystal-frame vectors against DIALS 3.12 and planted truth."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxscale.basis.harmonics import (
    absorption_harmonics,
    crystal_frame_vectors,
    harmonic_lm,
    n_harmonics,
    real_harmonics,
)

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference" / "dials_reference.json"
LCYS_EXPT = "lcys_4sweep_dials/reference_dials3.12_scale/scaled.expt"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def test_counts_and_order():
    assert n_harmonics(4) == 24 and n_harmonics(6) == 48
    ls, ms = harmonic_lm(2)
    assert list(ls) == [1, 1, 1, 2, 2, 2, 2, 2] and list(ms) == [-1, 0, 1, -2, -1, 0, 1, 2]


def test_orthonormal_on_sphere():
    # Gauss-Legendre in cos(theta) x uniform phi integrates products of degree <= 12 exactly
    x, wx = np.polynomial.legendre.leggauss(16)
    phi = np.arange(32) * 2 * np.pi / 32
    theta = np.repeat(np.arccos(x), 32)
    ph = np.tile(phi, 16)
    weight = np.repeat(wx, 32) * (2 * np.pi / 32)
    y = real_harmonics(6, theta, ph) / 1.414213562 * math.sqrt(2)
    # m = 0 columns carry no sqrt2; undo the DIALS constant only where it was applied
    _, ms = harmonic_lm(6)
    y = np.where(ms[None, :] == 0, real_harmonics(6, theta, ph), y)
    gram = (y * weight[:, None]).T @ y
    np.testing.assert_allclose(gram, np.eye(48), atol=1e-12)


def test_planted_low_orders():
    rng = np.random.default_rng(0)
    theta, phi = rng.uniform(0, np.pi, 50), rng.uniform(0, 2 * np.pi, 50)
    y = real_harmonics(2, theta, phi)
    c = math.sqrt(3 / (4 * math.pi))
    s2 = 1.414213562
    np.testing.assert_allclose(y[:, 1], c * np.cos(theta), rtol=1e-14)  # l=1, m=0
    np.testing.assert_allclose(y[:, 2], s2 * c / math.sqrt(2) * np.sin(theta) * np.cos(phi), rtol=1e-13)
    np.testing.assert_allclose(y[:, 0], s2 * c / math.sqrt(2) * np.sin(theta) * np.sin(phi), rtol=1e-13)
    c20 = math.sqrt(5 / (16 * math.pi))
    np.testing.assert_allclose(y[:, 5], c20 * (3 * np.cos(theta) ** 2 - 1), rtol=1e-12, atol=1e-15)


def test_matches_dials(reference, shared_data):
    expt = json.loads((shared_data / LCYS_EXPT).read_text())
    for case in reference["harmonics"]:
        i = case["experiment"]
        gon, beam, scan = expt["goniometer"][i], expt["beam"][i], expt["scan"][i]
        s0c, s1c = crystal_frame_vectors(
            np.asarray(case["s1"]), np.asarray(case["z_px"]), np.asarray(beam["direction"]),
            np.asarray(gon["rotation_axis"]), np.asarray(gon["fixed_rotation"]),
            np.asarray(gon["setting_rotation"]), tuple(scan["oscillation"]), scan["image_range"][0])
        np.testing.assert_allclose(s0c, case["s0c"], atol=2e-15)
        np.testing.assert_allclose(s1c, case["s1c"], atol=2e-15)
        for lmax in (4, 6):
            a = absorption_harmonics(np.asarray(case["s0c"]), np.asarray(case["s1c"]), lmax)
            np.testing.assert_allclose(a, case[f"harmonics_lmax{lmax}"], rtol=1e-12, atol=1e-14)
        lookup = absorption_harmonics(np.asarray(case["s0c"]), np.asarray(case["s1c"]), 4, exact=False)
        np.testing.assert_allclose(lookup, case["lookup_lmax4"], rtol=1e-12, atol=1e-14)
