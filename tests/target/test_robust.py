"""Robust likelihood: IRLS group mean, robust target, robust merge, error model on inliers.

Planted problems (known scales, intensities and outliers); the least-squares limits are
checked against the closed-form group mean of `jaxscale.target.objective`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from jaxscale.errors.error_model import refine_error_model
from jaxscale.models.component import Component
from jaxscale.target.losses import least_squares
from jaxscale.target.objective import group_mean, make_problem
from jaxscale.target.robust import (
    RobustScalingTarget,
    group_median,
    loss_for,
    make_target,
    refine_error_model_robust,
    robust_group_mean,
    robust_merge,
)

robust_group_mean_jit = jax.jit(robust_group_mean, static_argnums=(2, 3))


def planted(seed: int, n_unique: int = 300, multiplicity: int = 3, n_datasets: int = 6, outliers: float = 0.01,
            a: float = 1.2, b: float = 0.03):
    """KB-scaled observations of exponential (Wilson) intensities with gross positive outliers
    (variances: the true error model of the expected intensity)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(1.8, 8.0, n_unique)
    i_true = rng.exponential(1000.0 * np.exp(-10.0 / (2 * d * d)))
    k = np.r_[1.0, rng.uniform(0.6, 1.6, n_datasets - 1)]
    bfac = np.r_[0.0, rng.uniform(-6.0, 3.0, n_datasets - 1)]
    ds = np.argsort(rng.random((n_unique, n_datasets)), axis=1)[:, :multiplicity].ravel()
    gid = np.repeat(np.arange(n_unique), multiplicity)
    inv2d2 = np.repeat(1.0 / (2 * d * d), multiplicity)
    g = k[ds] * np.exp(bfac[ds] * inv2d2)
    expected = g * i_true[gid]
    var = expected + 10.0
    intensity = expected + a * np.sqrt(var + (b * expected) ** 2) * rng.standard_normal(expected.size)
    # at most one outlier per group: with two of three wrong no estimator can find the truth
    n_out = int(round(outliers * expected.size))
    rows = rng.choice(n_unique, n_out, replace=False) * multiplicity + rng.integers(0, multiplicity, n_out)
    intensity[rows] += rng.uniform(3.0, 10.0, n_out) * (expected[rows] + 300.0)
    is_out = np.zeros(expected.size, bool)
    is_out[rows] = True
    return dict(intensity=intensity, variance=a * a * (var + (b * expected) ** 2), raw_variance=var, gid=gid,
                ds=ds, inv2d2=inv2d2, g=g, i_true=i_true, k=k, bfac=bfac, is_out=is_out)


def kb(sim):
    n = sim["k"].size
    comps = {
        "scale": Component("scale", lambda p, basis: p[basis["ds"]]),
        "decay": Component("decay", lambda p, basis: jnp.exp(p[basis["ds"]] * basis["inv2d2"])),
    }
    params = {"scale": np.ones(n), "decay": np.zeros(n)}
    ds = jnp.asarray(sim["ds"])
    bases = {"scale": {"ds": ds}, "decay": {"ds": ds, "inv2d2": jnp.asarray(sim["inv2d2"])}}
    fixed = {"scale": np.arange(n) == 0, "decay": np.arange(n) == 0}  # gauge: data set 0 at truth
    return comps, params, bases, fixed


def scale_and_merge(sim, likelihood: str, **kw):
    """Minimise the target (scipy L-BFGS on the jitted value and gradient), then merge."""
    comps, params, bases, fixed = kb(sim)
    target = make_target(comps, params, likelihood, **kw)
    problem = make_problem(sim["intensity"], 1.0 / sim["variance"], sim["gid"])
    data = target.data(problem, bases, free=target.free_mask(fixed))
    fun = lambda x: tuple(np.asarray(v) for v in target.value_and_grad(jnp.asarray(x), data))  # noqa: E731
    # box 0.05 < k < 20, |B| < 40 A^2 (layout: decay then scale) so that a diverging fit stays finite
    n = sim["k"].size
    bounds = [(-40.0, 40.0)] * n + [(0.05, 20.0)] * n
    res = minimize(fun, target.x0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options=dict(maxiter=500, gtol=1e-10, ftol=1e-14))
    x = np.asarray(target.effective(jnp.asarray(res.x), data))
    g = np.asarray(target.inverse_scale(jnp.asarray(x), bases))
    merged, sigma, _ = robust_merge(sim["intensity"], sim["variance"], g, sim["gid"], target.loss)
    return merged, g, target


def cc(x, y):
    return float(np.corrcoef(x, y)[0, 1])


# ------------------------------------------------------------------------- group mean
def test_group_median_matches_numpy():
    rng = np.random.default_rng(1)
    gid = rng.integers(0, 40, 200)
    y = rng.normal(size=200)
    valid = rng.random(200) > 0.2
    med = np.asarray(jax.jit(group_median, static_argnums=3)(jnp.asarray(y), jnp.asarray(valid), jnp.asarray(gid), 42))
    expect = np.array([np.median(y[(gid == h) & valid]) if np.any((gid == h) & valid) else 0.0 for h in range(42)])
    np.testing.assert_allclose(med, expect, rtol=0, atol=1e-14)


def test_least_squares_irls_is_closed_form_mean():
    sim = planted(2)
    p = make_problem(sim["intensity"], 1.0 / sim["variance"], sim["gid"])
    g = jnp.asarray(sim["g"])
    ih, u = robust_group_mean_jit(p, g, least_squares, 3)
    np.testing.assert_allclose(np.asarray(ih), np.asarray(group_mean(p, g)), rtol=1e-12)
    assert np.all(np.asarray(u) == 1.0)


@pytest.mark.parametrize("likelihood", ["student_t", "huber"])
def test_irls_reaches_a_stationary_lower_objective(likelihood):
    """The IRLS I_h satisfies sum u w g r = 0 per group and beats the LS mean on rho."""
    sim = planted(3, outliers=0.03)
    loss = loss_for(likelihood)
    p = make_problem(sim["intensity"], 1.0 / sim["variance"], sim["gid"])
    g = jnp.asarray(sim["g"])
    ih, u = robust_group_mean_jit(p, g, loss, 100)
    r = sim["intensity"] - sim["g"] * np.asarray(ih)[sim["gid"]]
    w = 1.0 / sim["variance"]
    stationarity = np.bincount(sim["gid"], np.asarray(u) * w * sim["g"] * r)
    scale = np.bincount(sim["gid"], np.asarray(u) * w * sim["g"] ** 2) * np.abs(np.asarray(ih)) + 1e-300
    assert np.max(np.abs(stationarity) / scale) < 1e-6
    f_robust = float(jnp.sum(loss(jnp.asarray(w * r * r))))
    r_ls = sim["intensity"] - sim["g"] * np.asarray(group_mean(p, g))[sim["gid"]]
    assert f_robust < float(jnp.sum(loss(jnp.asarray(w * r_ls * r_ls))))
    # the planted outliers get small robust weights, the rest ~ 1
    assert np.median(np.asarray(u)[sim["is_out"]]) < 0.1 < 0.9 < np.median(np.asarray(u)[~sim["is_out"]])


# ---------------------------------------------------------------------- robust target
def test_robust_target_gradient_and_lm_residuals():
    """jax.grad through median + IRLS agrees with central differences; the LM residuals
    sign(r) sqrt(rho) square-sum to the objective."""
    sim = planted(4, n_unique=120)
    comps, params, bases, fixed = kb(sim)
    target = RobustScalingTarget(comps, params, loss=loss_for("student_t", 4.0))
    problem = make_problem(sim["intensity"], 1.0 / sim["variance"], sim["gid"])
    data = target.data(problem, bases)
    x = target.flatten({"scale": sim["k"] * 1.05, "decay": sim["bfac"] + 0.5})
    _, grad = target.value_and_grad(jnp.asarray(x), data)
    h = 1e-6
    for j in (1, 4, 7, 10):
        e = np.zeros_like(x)
        e[j] = h
        fd = (float(target.value(jnp.asarray(x + e), data)) - float(target.value(jnp.asarray(x - e), data))) / (2 * h)
        assert abs(float(grad[j]) - fd) <= 1e-5 * max(1.0, abs(fd))
    from jaxscale.target.objective import chunk_by_groups

    chunks = chunk_by_groups(problem, bases, np.asarray(x), np.ones(x.size, bool), chunk_size=128)
    per_chunk = jax.jit(jax.vmap(lambda t: target.chunk_residuals(jnp.asarray(x), type(chunks)(target=t))))
    one = per_chunk(chunks.target)
    np.testing.assert_allclose(float(jnp.sum(one**2)), float(target.value(jnp.asarray(x), data)), rtol=1e-10)


def test_student_t_merge_with_true_scales_beats_weighted_mean():
    sim = planted(5, outliers=0.01)
    args = (sim["intensity"], sim["variance"], sim["g"], sim["gid"])
    merged_t, sigma_t, u = robust_merge(*args, loss_for("student_t", 4.0))
    merged_ls, sigma_ls, _ = robust_merge(*args, least_squares)
    np.testing.assert_allclose(merged_ls, np.asarray(group_mean(make_problem(*args[:1], 1 / args[1], args[3]), jnp.asarray(args[2]))))
    assert cc(merged_t, sim["i_true"]) > 0.99 > 0.9 > cc(merged_ls, sim["i_true"])
    # merged sigma: the robust weights only remove information (u <= 1)
    assert np.all(sigma_t >= sigma_ls * (1 - 1e-12))


def test_student_t_merges_closer_to_truth_than_least_squares():
    """Scaling and merging the same data: Student-t recovers I and g, least squares is
    dragged by the outliers (without rejection)."""
    sim = planted(5, outliers=0.01)
    merged_t, g_t, _ = scale_and_merge(sim, "student_t", student_t_dof=4.0)
    merged_ls, g_ls, _ = scale_and_merge(sim, "least_squares")
    cc_t, cc_ls = cc(merged_t, sim["i_true"]), cc(merged_ls, sim["i_true"])
    assert np.all(np.isfinite(merged_ls))
    assert cc_t > 0.99
    assert cc_t > cc_ls + 0.05
    # and the scales too: Student-t recovers g to a few per cent, least squares does not
    err = lambda g: np.sqrt(np.mean((g / sim["g"] - 1) ** 2))  # noqa: E731
    assert err(g_t) < 0.03 and err(g_t) < err(g_ls)


def test_student_t_gaussian_limit_equals_least_squares():
    """No outliers and dof -> infinity: the Student-t result is the least-squares one."""
    sim = planted(6, outliers=0.0)
    merged_t, g_t, _ = scale_and_merge(sim, "student_t", student_t_dof=1e7)
    merged_ls, g_ls, _ = scale_and_merge(sim, "least_squares")
    assert np.linalg.norm(merged_t - merged_ls) / np.linalg.norm(merged_ls) < 1e-3
    np.testing.assert_allclose(g_t, g_ls, rtol=1e-3)
    assert cc(merged_ls, sim["i_true"]) > 0.99  # the planted truth is recovered at all


# ------------------------------------------------------------------------ error model
def test_error_model_on_robust_inliers_ignores_outliers():
    """(a, b) refined on the Student-t inliers of data with 2 % gross outliers match those
    refined on the same data without the outliers; plain refinement on all rows does not."""
    sim = planted(7, n_unique=1500, multiplicity=4, outliers=0.02)
    clean = ~sim["is_out"]
    args = (sim["intensity"], sim["raw_variance"], sim["g"], sim["gid"])
    ref = refine_error_model(*(a[clean] for a in args))
    robust, inliers = refine_error_model_robust(*args, loss_for("student_t", 4.0))
    plain = refine_error_model(*args)
    assert np.mean(inliers[sim["is_out"]]) < 0.05 and np.mean(inliers[clean]) > 0.99
    assert abs(robust.a / ref.a - 1) < 0.03 and abs(robust.b - ref.b) < 0.003
    assert abs(plain.b - ref.b) > abs(robust.b - ref.b)
