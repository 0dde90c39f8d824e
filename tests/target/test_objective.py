"""Objective, closed-form I_h, gradient, losses, fixed parameters, chunking."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.models.component import restraint_penalty
from jaxscale.target import (
    ScalingTarget,
    chunk_by_groups,
    get_loss,
    group_mean,
    huber,
    make_problem,
    residuals,
    student_t,
)
from tests.target.synthetic import make_synthetic


@pytest.fixture(scope="module")
def synth():
    comps, true, start, bases, i_obs, var, gid, ih_true = make_synthetic(n_groups=120, seed=1)
    problem = make_problem(i_obs, 1.0 / var, gid)
    target = ScalingTarget(comps, start)
    return target, problem, bases, true, i_obs, var, gid


def test_group_mean_closed_form_and_stationarity(synth):
    target, problem, bases, true, i_obs, var, gid = synth
    g = np.asarray(target.inverse_scale(target.flatten(true), bases))
    ih = np.asarray(group_mean(problem, jnp.asarray(g)))
    w = 1.0 / var
    expected = np.bincount(gid, w * g * i_obs) / np.bincount(gid, w * g * g)
    np.testing.assert_allclose(ih, expected, rtol=1e-12)
    r = np.asarray(residuals(problem, jnp.asarray(g)))
    # I_h is the weighted LS solution: sum_h w r g = 0 in every group
    np.testing.assert_allclose(np.bincount(gid, w * r * g), 0.0, atol=1e-9)


def test_gradient_matches_finite_differences(synth):
    target, problem, bases, true, *_ = synth
    data = target.data(problem, bases)
    x = target.flatten(true) + 0.05 * np.random.default_rng(3).normal(size=target.n_params)
    _, grad = target.value_and_grad(jnp.asarray(x), data)
    eps = 1e-6
    fd = np.array(
        [
            (float(target.value(jnp.asarray(x + eps * e), data)) - float(target.value(jnp.asarray(x - eps * e), data)))
            / (2 * eps)
            for e in np.eye(target.n_params)
        ]
    )
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-5, atol=1e-4 * np.abs(fd).max())


def test_restraints_match_component_contract(synth):
    target, problem, bases, true, *_ = synth
    x = target.flatten(true)
    expected = float(restraint_penalty(target.components, target.params_of(x)))
    assert expected > 0
    assert np.isclose(float(np.sum(target.restraint_weights * x**2)), expected, rtol=1e-12)


def test_fixed_parameters_get_no_gradient_and_keep_anchor(synth):
    target, problem, bases, true, *_ = synth
    free = target.free_mask({"scale": np.array([True, False, False, False, False])})
    first_scale = target.flatten({"scale": np.eye(5)[0], "decay": np.zeros(3)}) > 0
    assert free.sum() == target.n_params - 1 and not free[first_scale].any()
    anchor = target.flatten(true)
    data = target.data(problem, bases, anchor=anchor, free=free)
    x = anchor + 0.1
    v1, g1 = target.value_and_grad(jnp.asarray(x), data)
    x2 = x.copy()
    x2[~free] += 5.0  # fixed coordinates are ignored
    v2 = target.value(jnp.asarray(x2), data)
    assert float(v1) == float(v2)
    assert np.all(np.asarray(g1)[~free] == 0.0)


def test_targeted_uses_reference_ih(synth):
    target, problem, bases, true, i_obs, var, gid = synth
    ih_ref = np.random.default_rng(0).uniform(1, 2, problem.n_groups)
    p_ref = make_problem(i_obs, 1.0 / var, gid, ih_reference=ih_ref)
    g = jnp.asarray(np.full(gid.size, 2.0))
    np.testing.assert_allclose(np.asarray(residuals(p_ref, g)), i_obs - 2.0 * ih_ref[gid])


def test_chunked_residuals_equal_global(synth):
    target, problem, bases, true, *_ = synth
    x = target.flatten(true) * 1.01
    free = np.ones(target.n_params, bool)
    chunks = chunk_by_groups(problem, bases, x, free, chunk_size=37)
    n_chunks = chunks.target.problem.weight.shape[0]
    assert n_chunks > 5
    per_chunk = jax.vmap(lambda c: target.chunk_residuals(jnp.asarray(x), type(chunks)(target=c)))(chunks.target)
    total = float(jnp.sum(per_chunk**2))
    data = target.data(problem, bases)
    restr = float(np.sum(target.restraint_weights * x**2))
    assert np.isclose(total + restr, float(target.value(jnp.asarray(x), data)), rtol=1e-12)


def test_losses():
    z2 = jnp.array([0.0, 1e-6, 4.0, 100.0])
    assert np.allclose(get_loss("least_squares")(z2), z2)
    st = student_t(4.0)(z2)
    assert np.isclose(float(st[1]), 1e-6, rtol=1e-5) and float(st[3]) < 100.0 / 4
    hb = huber(3.0)
    assert np.allclose(hb(z2)[:3], z2[:3]) and np.isclose(float(hb(z2)[3]), 2 * 3 * 10 - 9)
    # continuous at the knee and finite gradient at zero
    assert np.isclose(float(hb(jnp.array(9.0 + 1e-9))), 9.0, atol=1e-6)
    assert np.isfinite(float(jax.grad(lambda z: hb(z))(0.0)))
