"""Gaussian smoothers against DIALS 3.12 (SmoothScaleComponent1D/2D/3D) and the spec rules."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxscale.basis.smoother import (
    boost_iround,
    n_intervals_from_n_params,
    smooth_rows_for_component,
    smoother_axis,
    smoother_rows,
    smoother_value,
)

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference" / "dials_reference.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def dense_rows(rows, n_params: int) -> np.ndarray:
    out = np.zeros((rows.idx.shape[0], n_params))
    np.add.at(out, (np.arange(rows.idx.shape[0])[:, None], rows.idx), rows.w)
    return out


def test_smoothers_match_dials(reference):
    for case in reference["smoothers"]:
        coords = [np.asarray(c) for c in case["coords"]]
        rows = smooth_rows_for_component(coords, case["shape"])
        params = np.asarray(case["params"])
        np.testing.assert_allclose(smoother_value(rows, params), case["value"], rtol=1e-13, atol=0)
        deriv = np.asarray(case["deriv"])
        # DIALS quirk: 4 parameters give a 2-interval (3-value) smoother; the 4th is unused
        ours = dense_rows(rows, len(params))
        np.testing.assert_allclose(ours[:, : deriv.shape[1]], deriv, rtol=1e-12, atol=1e-15)
        assert not ours[:, deriv.shape[1]:].any()
        assert rows.idx.shape[1] == 3 ** case["dim"]


def test_iround_halves_away_from_zero():
    v = np.array([-2.5, -1.5, -0.5, -0.49999999999999994, 0.49999999999999994, 0.5, 1.5, 2.4999])
    np.testing.assert_array_equal(boost_iround(v), [-3, -2, -1, 0, 0, 1, 2, 2])


def test_axis_rules():
    assert [n_intervals_from_n_params(n) for n in (2, 3, 4, 9)] == [1, 2, 2, 7]
    axis = smoother_axis(0, 7, 7)
    assert axis.n_values == 9 and axis.spacing == 1.0
    np.testing.assert_array_equal(axis.positions, np.arange(9) - 0.5)
    two = smoother_axis(0, 1, 1)
    np.testing.assert_array_equal(two.positions, [0.0, 1.0])


def test_planted_window_and_sigma():
    # z = 3.2 with 9 points: window iround(1.7)+1 = 3 -> points 3,4,5 at 2.5,3.5,4.5, sigma 0.7
    axis = smoother_axis(0, 7, 7)
    rows = smoother_rows([axis], [np.array([3.2])])
    assert list(rows.idx[0]) == [3, 4, 5]
    w = np.exp(-((3.2 - np.array([2.5, 3.5, 4.5])) / 0.7) ** 2)
    np.testing.assert_allclose(rows.w[0], w / w.sum(), rtol=1e-15)
    # two grid points: sigma 0.65, both points always used
    rows2 = smoother_rows([smoother_axis(0, 1, 1)], [np.array([0.3])])
    w2 = np.exp(-((0.3 - np.array([0.0, 1.0])) / 0.65) ** 2)
    np.testing.assert_allclose(rows2.w[0, :2], w2 / w2.sum(), rtol=1e-15)
    assert rows2.w[0, 2] == 0.0
