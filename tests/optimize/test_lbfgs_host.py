"""The host-loop L-BFGS (`lbfgs_steps`, used by `minimise_lbfgs`) reproduces scitbx's
trajectories exactly as the traced optax transformation does (same references)."""
from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from jaxscale.optimize.lbfgs import lbfgs_steps
from tests.optimize.test_lbfgs_scitbx import FUNCTIONS, REFERENCE, _trajectory


def _host_trajectory(fn, x0, n_steps):
    vg = jax.jit(jax.value_and_grad(fn))
    calls = [0]

    def value_and_grad(x):
        calls[0] += 1
        f, g = vg(x)
        return float(f), np.asarray(g)

    out = []
    for x, f, _, failed in itertools.islice(lbfgs_steps(value_and_grad, np.asarray(x0, float), 5), n_steps):
        out.append((f, x, calls[0], failed))
    return out


@pytest.mark.parametrize("name", ["rosenbrock", "scaled_quartic"])
def test_host_steps_match_scitbx(name):
    steps = REFERENCE[name]["steps"]
    ours = _host_trajectory(FUNCTIONS[name], REFERENCE[name]["x0"], len(steps))
    for k, (r, (f, x, n_calls, failed)) in enumerate(zip(steps, ours)):
        assert not failed
        assert f == pytest.approx(r["f"], rel=1e-8, abs=1e-10), f"step {k}"
        np.testing.assert_allclose(x, r["x"], rtol=1e-7, atol=1e-9, err_msg=f"step {k}")
        assert n_calls == r["n_calls"], f"function evaluations differ at step {k}"


def test_host_equals_traced_with_failure():
    """log_cosh: same values step by step as the traced search, and the final line-search
    failure keeps the best point."""
    steps = REFERENCE["log_cosh"]["steps"]
    host = _host_trajectory(FUNCTIONS["log_cosh"], REFERENCE["log_cosh"]["x0"], len(steps) + 1)
    traced = _trajectory(FUNCTIONS["log_cosh"], REFERENCE["log_cosh"]["x0"], len(steps) + 1)
    for k, ((fh, xh, _, failed_h), (ft, xt, _, failed_t)) in enumerate(zip(host, traced)):
        assert fh == pytest.approx(ft, rel=1e-12), f"step {k}"
        np.testing.assert_allclose(xh, xt, rtol=1e-10, atol=1e-12)
        assert failed_h == failed_t
    assert host[-1][3]


def test_host_direction_equals_optax_over_a_wrapped_memory():
    """The numpy twin of the L-BFGS direction (used for parameter-sized jobs) gives optax's
    `scale_by_lbfgs` direction and memory at every step: the first step's 1/|g| scaling, the
    memory wrapping around (12 steps, m = 5) and a repeated point (zero curvature pair)."""
    from jaxscale.optimize.lbfgs import (_host_lbfgs_direction, _host_lbfgs_state, _lbfgs_direction,
                                         _lbfgs_state)

    rng = np.random.default_rng(3)
    n, m = 17, 5
    a = rng.normal(size=(n, n))
    hess = a @ a.T + n * np.eye(n)
    grad_of = lambda x: hess @ x + np.sin(x)  # noqa: E731 - a smooth, non-quadratic gradient
    x = rng.normal(size=n)
    traced, t_state = _lbfgs_direction(m), _lbfgs_state(x, m)
    h_state = _host_lbfgs_state(x, m)
    for k in range(12):
        g = grad_of(x)
        d_opt, t_state = traced(g, t_state, x)
        d_host, h_state = _host_lbfgs_direction(g, h_state, x)
        np.testing.assert_allclose(d_host, np.asarray(d_opt), rtol=1e-12, atol=1e-14 * np.abs(d_host).max())
        np.testing.assert_allclose(h_state.weights_memory, np.asarray(t_state.weights_memory), rtol=1e-12)
        assert h_state.count == int(t_state.count)
        if k != 6:  # step 7 repeats the point: s = y = 0, a zero-curvature pair
            x = x + 0.3 * d_host


def test_host_scalar_search_equals_numpy_search_bitwise():
    """The search with `_HostScalars` (plain-Python scalar functions) takes exactly the steps of
    the same search over numpy's functions: descent and non-descent directions, tiny and huge
    first steps, objectives that overflow (NaN/inf trials) and cubic-case NaNs."""
    import math

    from jaxscale.optimize.lbfgs import more_thuente_search_host

    rng = np.random.default_rng(0)

    def objective(kind, a, b, c):
        def value_and_grad(x):
            s = x[0]
            with np.errstate(all="ignore"):
                if kind == 0:
                    f, d = a * (s - b) ** 2 + c * (s - b) ** 4, 2 * a * (s - b) + 4 * c * (s - b) ** 3
                elif kind == 1:
                    f, d = np.log(np.cosh(a * (s - b))) + c * s * s, a * np.tanh(a * (s - b)) + 2 * c * s
                elif kind == 2:
                    f, d = np.exp(a * s) - b * s, a * np.exp(a * s) - b
                else:
                    f, d = -a * s + c * s**3, -a + 3 * c * s**2
            return float(f), np.array([d])
        return value_and_grad

    same = lambda u, v: u == v or (math.isnan(u) and math.isnan(v))  # noqa: E731
    for trial in range(400):  # loop over random line searches
        vg = objective(trial % 4, rng.uniform(0.1, 50), rng.uniform(0.01, 5), rng.uniform(0, 2))
        f0, g0 = vg(np.zeros(1))
        d = -g0 if trial % 7 else g0
        step0 = float(10 ** rng.uniform(-4, 3))
        ref = more_thuente_search_host(vg, np.zeros(1), d, f0, g0, step0, xp=np)
        out = more_thuente_search_host(vg, np.zeros(1), d, f0, g0, step0)
        assert same(ref[0], out[0]) and same(ref[1], out[1]) and ref[3:] == out[3:], trial
        np.testing.assert_array_equal(ref[2], out[2])
