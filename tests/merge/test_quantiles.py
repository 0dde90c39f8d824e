"""Numpy/stdlib quantiles used on every run (no scipy import): normal (AS241) and Student t."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
from scipy.special import ndtri, stdtrit

from jaxscale.errors.error_model import normal_cdf, normal_quantile
from jaxscale.merge.statistics import critical_correlation, t_quantile


def test_normal_quantile_matches_stdlib_and_scipy():
    p = np.concatenate([np.linspace(1e-6, 1 - 1e-6, 2001), [1e-300, 1e-20, 0.075, 0.5, 0.925, 1 - 1e-12]])
    x = normal_quantile(p)
    assert np.array_equal(x, [NormalDist().inv_cdf(v) for v in p])
    nz = p != 0.5
    np.testing.assert_allclose(x[nz], ndtri(p[nz]), rtol=1e-14)
    assert normal_cdf(-1.5) == pytest.approx(0.0668072012688581, rel=1e-14)


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 5, 7, 10, 30, 99, 1000, 12345, 1e6])
def test_t_quantile_matches_scipy(dof):
    assert t_quantile(0.99, float(dof)) == pytest.approx(float(stdtrit(dof, 0.99)), rel=1e-10)


def test_critical_correlation_known_values():
    """r_crit = t / sqrt(n - 2 + t^2), t the one-sided 0.99 quantile; 0 for n <= 2."""
    r = critical_correlation(np.array([2, 3, 12, 102]))
    t = stdtrit(np.array([1.0, 10.0, 100.0]), 0.99)
    np.testing.assert_allclose(r, [0.0, *(t / np.sqrt(np.array([1.0, 10.0, 100.0]) + t * t))], rtol=1e-12)
