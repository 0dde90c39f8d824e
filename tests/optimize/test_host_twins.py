"""The numpy twin of the objective's value and gradient (small L-BFGS problems) against the
compiled `jax.value_and_grad` objective, and the cases that keep the compiled program."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.models.linear import apply_exp, apply_one_plus, apply_one_plus_every
from jaxscale.optimize.host_twins import host_value_and_grad
from jaxscale.optimize.lbfgs import minimise_lbfgs
from jaxscale.target import ScalingTarget, make_problem
from jaxscale.target.losses import huber
from jaxscale.target.objective import TargetData
from tests.optimize.test_levmar import _DenseTarget, _model


def _case(rng, n_groups=150):
    gid = np.repeat(np.arange(n_groups), rng.integers(1, 6, n_groups))
    comps, params, bases = _model(rng, gid.size)
    target = ScalingTarget(comps, params)
    g = np.asarray(target.inverse_scale(jnp.asarray(target.x0), bases))
    ih = rng.lognormal(4, 1, n_groups)
    intensity = g * ih[gid] * (1 + 0.05 * rng.normal(size=gid.size))
    weight = 1.0 / (0.05 * ih[gid] + 1.0) ** 2
    weight[rng.random(gid.size) < 0.05] = 0.0  # excluded / padding rows
    return comps, params, bases, target, gid, intensity, weight, ih


@pytest.mark.parametrize("absorption", [apply_one_plus, apply_one_plus_every, apply_exp])
def test_host_value_and_grad_equals_the_compiled_objective(absorption):
    rng = np.random.default_rng(7)
    comps, params, bases, _, gid, intensity, weight, _ = _case(rng)
    target = ScalingTarget(dict(comps, absorption=comps["absorption"]._replace(apply=absorption)), params)
    assert np.any(np.asarray(target.restraint_weights) > 0)  # restraints are part of the comparison
    free = np.ones(target.n_params, bool)
    free[[0, 7]] = False
    data = target.data(make_problem(intensity, weight, gid), bases, anchor=target.x0 * 0.98, free=free)
    twin = host_value_and_grad(target, data)
    assert twin is not None
    for step in range(3):
        x = target.x0 * (1 + 0.02 * rng.normal(size=target.n_params))
        value, grad = twin(x)
        value_ref, grad_ref = (np.asarray(a) for a in target.value_and_grad(jnp.asarray(x), data))
        assert np.isclose(value, float(value_ref), rtol=1e-13)
        # the I_h-dependence term autodiff adds is zero but for rounding at the closed-form I_h
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-9, atol=1e-11 * np.abs(grad_ref).max())
        assert np.all(grad[~free] == 0.0)


def test_lbfgs_on_the_twin_reaches_the_compiled_minimum(monkeypatch):
    """The whole minimisation: the same minimum (RMSD history and x) as on the compiled program."""
    from jaxscale.optimize import lbfgs

    rng = np.random.default_rng(8)
    _, _, bases, target, gid, intensity, weight, _ = _case(rng)
    data = target.data(make_problem(intensity, weight, gid), bases)
    x0 = target.x0 * (1 + 0.05 * rng.normal(size=target.n_params))
    host = minimise_lbfgs(target, data, x0=x0, rmsd_tolerance=1e-6)
    monkeypatch.setattr(lbfgs, "host_value_and_grad", lambda *args, **kw: None)
    compiled = minimise_lbfgs(target, data, x0=x0, rmsd_tolerance=1e-6)
    assert host.reason == compiled.reason
    np.testing.assert_allclose(host.rmsd_history[-1], compiled.rmsd_history[-1], rtol=1e-9)
    np.testing.assert_allclose(host.x, compiled.x, rtol=1e-6, atol=1e-8)


def test_cases_that_keep_the_compiled_program():
    rng = np.random.default_rng(9)
    comps, params, bases, target, gid, intensity, weight, ih = _case(rng)
    data = target.data(make_problem(intensity, weight, gid), bases)
    assert host_value_and_grad(target, data) is not None
    targeted = TargetData(problem=make_problem(intensity, weight, gid, ih_reference=ih), bases=bases,
                          anchor=data.anchor, free=data.free)
    assert host_value_and_grad(target, targeted) is None  # a fixed reference I_h
    assert host_value_and_grad(ScalingTarget(comps, params, loss=huber()), data) is None
    assert host_value_and_grad(target, data, max_rows=10) is None  # larger problems compile
    assert host_value_and_grad(_DenseTarget(comps, params), data) is not None  # same objective
