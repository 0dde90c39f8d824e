"""The sparse (per-row slot) normal-equation builder and inverse-scale variances against
dense `jax.jacfwd` Jacobians, on linear-form components like the real models' (padding
slots, fixed parameters, zero-weight rows, targeted reference)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.models.component import Component
from jaxscale.models.linear import apply_b_factor, apply_exp, apply_grid, apply_one_plus, apply_one_plus_every
from jaxscale.optimize.levmar import NormalEquations, inverse_scale_variance, slot_derivatives
from jaxscale.target import ScalingTarget, chunk_by_groups, make_problem


class _DenseTarget(ScalingTarget):
    """Same residuals, but an overridden chunk_residuals: the builder falls back to jacfwd."""

    def chunk_residuals(self, x, chunk):
        return super().chunk_residuals(x, chunk)


def _model(rng, n: int, n_scale: int = 6):
    """Three linear-form components (grid, B factor, 1 + harmonics) with padded slots."""
    n_decay, n_abs = 4, 8
    idx_s = np.sort(rng.integers(0, n_scale, (n, 3)), axis=1).astype(np.int32)
    w_s = rng.uniform(0.1, 1.0, (n, 3))
    w_s /= w_s.sum(1, keepdims=True)
    idx_d = rng.integers(0, n_decay, (n, 3)).astype(np.int32)
    w_d = rng.uniform(0.0, 1.0, (n, 3))
    idx_d[:, 2], w_d[:, 2] = 0, 0.0  # a padding slot (index 0, weight 0)
    idx_a = np.broadcast_to(np.arange(n_abs, dtype=np.int32), (n, n_abs)).copy()
    w_a = rng.normal(0, 0.3, (n, n_abs))
    bases = {
        "scale": {"idx": idx_s, "w": w_s, "absent": np.zeros(n)},
        "decay": {"idx": idx_d, "w": w_d, "absent": np.zeros(n), "inv_two_d_sq": 1.0 / (2 * rng.uniform(1, 3, n) ** 2)},
        "absorption": {"idx": idx_a, "w": w_a, "absent": np.zeros(n)},
    }
    bases = jax.tree.map(jnp.asarray, bases)
    comps = {
        "scale": Component("scale", apply_grid),
        "decay": Component("decay", apply_b_factor, jnp.full(n_decay, 0.1)),
        "absorption": Component("absorption", apply_one_plus, jnp.full(n_abs, 0.5)),
    }
    params = {"scale": 1.0 + rng.normal(0, 0.1, n_scale), "decay": rng.normal(0, 0.3, n_decay),
              "absorption": rng.normal(0, 0.05, n_abs)}
    return comps, params, bases


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(11)
    n_groups = 150
    gid = np.repeat(np.arange(n_groups), rng.integers(1, 6, n_groups))
    n = gid.size
    comps, params, bases = _model(rng, n)
    target = ScalingTarget(comps, params)
    g = np.asarray(target.inverse_scale(jnp.asarray(target.x0), bases))
    ih = rng.lognormal(4, 1, n_groups)
    var = g * ih[gid] + 5.0
    intensity = g * ih[gid] + rng.normal(size=n) * np.sqrt(var)
    weight = 1.0 / var
    weight[rng.random(n) < 0.05] = 0.0  # zero-weight (padding-like) rows
    return rng, comps, params, bases, target, gid, intensity, weight, ih


@pytest.mark.parametrize("chunk_size", [97, 10000])  # several chunks (a scan) or one
@pytest.mark.parametrize("targeted", [False, True])
def test_sparse_normal_equations_equal_jacfwd(case, targeted, chunk_size):
    rng, comps, params, bases, target, gid, intensity, weight, ih = case
    problem = make_problem(intensity, weight, gid, ih_reference=ih if targeted else None)
    x = target.x0 * (1 + 0.01 * rng.normal(size=target.n_params))
    free = np.ones(target.n_params, bool)
    free[[0, 7]] = False  # a fixed scale and a fixed decay parameter
    chunks = chunk_by_groups(problem, bases, x, free, chunk_size=chunk_size)
    assert (np.shape(chunks.target.problem.weight)[0] == 1) == (chunk_size > 1000)
    dense = _DenseTarget(comps, params)
    xj, fj = jnp.asarray(x), jnp.asarray(free)
    nm, grad, s = NormalEquations(target).build(xj, chunks, fj)
    nm_ref, grad_ref, s_ref = NormalEquations(dense).build(xj, chunks, fj)
    scale = np.abs(np.asarray(nm_ref)).max()
    np.testing.assert_allclose(np.asarray(nm), np.asarray(nm_ref), rtol=1e-10, atol=1e-12 * scale)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_ref), rtol=1e-10,
                               atol=1e-12 * np.abs(np.asarray(grad_ref)).max())
    assert np.isclose(float(s), float(s_ref), rtol=1e-13)
    assert np.all(np.asarray(nm)[~free][:, free] == 0.0)


def test_slot_derivatives_scatter_to_jacobian(case):
    rng, comps, params, bases, target, *_ = case
    x = jnp.asarray(target.x0 * (1 + 0.02 * rng.normal(size=target.n_params)))
    g, d, cols = slot_derivatives(target, x, bases)
    n = d.shape[0]
    dense = np.zeros((n, target.n_params))
    np.add.at(dense, (np.repeat(np.arange(n), d.shape[1]), np.asarray(cols).ravel()), np.asarray(d).ravel())
    np.testing.assert_allclose(dense, np.asarray(jax.jacfwd(target.inverse_scale)(x, bases)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(g), np.asarray(target.inverse_scale(x, bases)), rtol=1e-15)


@pytest.mark.parametrize("absorption", [apply_one_plus, apply_one_plus_every, apply_exp])
def test_closed_form_slopes_equal_autodiff_bitwise(case, monkeypatch, absorption):
    """The links' closed-form slopes give D exactly as the vmapped per-row jax.grad does
    (same operations in the same order), so the LM path does not move."""
    from jaxscale.optimize import levmar

    rng, comps, params, bases, *_ = case
    target = ScalingTarget(dict(comps, absorption=comps["absorption"]._replace(apply=absorption)), params)
    x = jnp.asarray(target.x0 * (1 + 0.02 * rng.normal(size=target.n_params)))
    fn = jax.jit(lambda x, b: slot_derivatives(target, x, b))
    closed = fn(x, bases)
    monkeypatch.setattr(levmar, "slot_slope", lambda apply: None)
    autodiff = jax.jit(lambda x, b: slot_derivatives(target, x, b))(x, bases)
    for a, b in zip(closed, autodiff):
        if absorption is apply_exp:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-15, atol=0)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("on_host", [True, False])  # the numpy twin (small jobs) / the compiled program
@pytest.mark.parametrize("n_scale", [6, 300])  # dense rows of D / (slot, slot) gathers
def test_inverse_scale_variance_equals_dense(n_scale, on_host, monkeypatch):
    from jaxscale.optimize import levmar

    if not on_host:
        monkeypatch.setattr(levmar, "_host_variance", lambda *args: None)
    rng = np.random.default_rng(4)
    comps, params, bases = _model(rng, 700, n_scale)
    target = ScalingTarget(comps, params)
    x = target.x0 * (1 + 0.02 * rng.normal(size=target.n_params))
    a = rng.normal(size=(target.n_params, target.n_params))
    cov = a @ a.T * 1e-4
    cov[0], cov[:, 0] = 0.0, 0.0  # a fixed parameter
    n = int(np.asarray(bases["scale"]["idx"]).shape[0])
    assert (levmar._host_links(target, bases, n) is not None) is True  # a job small enough
    var = inverse_scale_variance(target, x, cov, bases, n, chunk_size=128)  # last chunk padded
    d = np.asarray(jax.jacfwd(target.inverse_scale)(jnp.asarray(x), bases))
    np.testing.assert_allclose(var, np.einsum("ip,pq,iq->i", d, cov, d), rtol=1e-11, atol=1e-18)


@pytest.mark.parametrize("route", ["rows", "groups", "pairs"])  # dense J / dense D, E per group / slot pairs
def test_host_normal_equations_equal_the_compiled_builder(case, route):
    """The numpy twin of the normal-equation builder (small problems) gives the compiled
    builder's N, gradient and sum of squares: fixed parameters, zero-weight rows, restraints."""
    from jaxscale.optimize.levmar import host_normal_equations
    from jaxscale.target.objective import TargetData

    rng, comps, params, bases, target, gid, intensity, weight, ih = case
    problem = make_problem(intensity, weight, gid)
    x = target.x0 * (1 + 0.01 * rng.normal(size=target.n_params))
    free = np.ones(target.n_params, bool)
    free[[0, 7]] = False
    assert np.any(np.asarray(target.restraint_weights) > 0)  # restraint rows are part of the comparison
    data = TargetData(problem=problem, bases=bases, anchor=jnp.asarray(x * 0.98), free=jnp.asarray(free))
    build = host_normal_equations(target, data, route=route)
    assert build is not None
    nm, grad, s = build(x, free)
    chunks = chunk_by_groups(problem, bases, x * 0.98, free, chunk_size=10000)
    nm_ref, grad_ref, s_ref = NormalEquations(target).build(jnp.asarray(x), chunks, jnp.asarray(free))
    scale = np.abs(np.asarray(nm_ref)).max()
    np.testing.assert_allclose(nm, np.asarray(nm_ref), rtol=1e-11, atol=1e-13 * scale)
    np.testing.assert_allclose(grad, np.asarray(grad_ref), rtol=1e-11, atol=1e-13 * np.abs(np.asarray(grad_ref)).max())
    assert np.isclose(s, float(s_ref), rtol=1e-13)
    # other cases keep the compiled builder
    targeted = TargetData(problem=make_problem(intensity, weight, gid, ih_reference=ih), bases=bases,
                          anchor=data.anchor, free=data.free)
    assert host_normal_equations(target, targeted) is None
    assert host_normal_equations(_DenseTarget(comps, params), data) is None
    assert host_normal_equations(target, data, max_elements=10) is None


@pytest.mark.parametrize("n", [40, 800])  # numpy's Cholesky / scipy's (LARGE_DENSE_SYSTEM and up)
def test_dense_spd_solve_and_inverse(n):
    from jaxscale.optimize.levmar import LARGE_DENSE_SYSTEM, _inverse_spd, _solve_cholesky

    assert (n >= LARGE_DENSE_SYSTEM) == (n == 800)
    rng = np.random.default_rng(n)
    m = rng.normal(size=(n, n))
    a = m @ m.T + n * np.eye(n)
    b = rng.normal(size=n)
    np.testing.assert_allclose(a @ _solve_cholesky(a, b), b, rtol=0, atol=1e-10 * np.abs(b).max())
    inv = _inverse_spd(a)
    np.testing.assert_allclose(inv @ a, np.eye(n), rtol=0, atol=1e-10)
    assert np.array_equal(inv, inv.T)
    not_pd = -a  # falls back to least squares / the pseudo-inverse
    np.testing.assert_allclose(not_pd @ _solve_cholesky(not_pd, b), b, rtol=0, atol=1e-8 * np.abs(b).max())
