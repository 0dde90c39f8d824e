"""Block-structured LM/PCG and the diag((J^T J)^-1) approximations, measured against dense
linear algebra on a small planted-truth still problem."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.optimize.structured import minimise_structured, pcg, variance_diagonal
from jaxscale.serial import kb_gauge, simulate_flat_stills
from jaxscale.target.sharding import KBStillsTarget, make_observations

N_EXP, PER, N_GROUPS = 80, 40, 400


@pytest.fixture(scope="module")
def solved():
    sim = simulate_flat_stills(N_EXP, PER, N_GROUPS, seed=5, outlier_fraction=0.0)
    obs = make_observations(sim["intensity"], 1.0 / sim["variance"], sim["d"], sim["group_id"],
                            sim["experiment_index"], N_GROUPS, N_EXP)
    t = KBStillsTarget()
    free = np.ones((N_EXP, 2), bool)
    free[0] = False
    x0 = np.stack([np.ones(N_EXP), np.zeros(N_EXP)], 1)
    res = minimise_structured(t.residual_fn, t.block_diagonal_fn, x0, obs, free, sim["intensity"].size,
                              rmsd_tolerance=1e-10)
    return sim, obs, t, free, res


def test_pcg_solves_spd_system():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 30))
    a = a @ a.T + 30 * np.eye(30)
    b = rng.normal(size=30)
    diag_inv = 1.0 / np.diag(a)
    x, its, res = pcg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), lambda v: jnp.asarray(diag_inv) * v, 1e-12, 100)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-9)
    assert int(its) < 30 and float(res) <= 1e-12


def test_levmar_reaches_dense_least_squares_minimum_and_truth(solved):
    sim, obs, t, free, res = solved
    x = jnp.asarray(res.x)
    # at the minimum the exact gradient J^T r vanishes on free parameters
    grad = jax.grad(lambda y: jnp.sum(t.residual_fn(y, obs) ** 2))(x)
    assert np.abs(np.asarray(grad)[free]).max() < 1e-6 * np.abs(np.asarray(jax.grad(
        lambda y: jnp.sum(t.residual_fn(y, obs) ** 2))(jnp.asarray(np.stack([np.ones(N_EXP), np.zeros(N_EXP)], 1))))).max()
    # one dense Gauss-Newton step from the solution moves nothing
    jac = np.asarray(jax.jacfwd(lambda y: t.residual_fn(y, obs))(x)).reshape(-1, 2 * N_EXP)[:, free.reshape(-1)]
    step = np.linalg.lstsq(jac, -np.asarray(t.residual_fn(x, obs)), rcond=None)[0]
    assert np.abs(step).max() < 1e-6
    # planted truth in the fixed gauge (still 0: k = 1, B = 0)
    k_rel = res.x[:, 0] / (sim["k"] / sim["k"][0])
    assert np.sqrt(np.mean((k_rel - 1) ** 2)) < 0.05
    assert np.sqrt(np.mean((res.x[:, 1] - (sim["B"] - sim["B"][0])) ** 2)) < 1.5
    assert res.reason == "RMSD no longer decreasing" and max(res.cg_iterations) < 200


def test_variance_approximations_against_exact_inverse(solved):
    """Measured error of each diag((J^T J)^-1) approximation (relative to the dense inverse)."""
    _, obs, t, free, res = solved
    args = (t.residual_fn, t.block_diagonal_fn, res.x, obs, free)
    exact = variance_diagonal(*args, method="exact")
    assert np.all(exact[~free] == 0) and np.all(exact[free] > 0)
    rel = {}
    for method in ("block", "block_gauge", "stochastic"):
        approx = variance_diagonal(*args, method=method, gauge=kb_gauge(res.x), n_probes=16)
        rel[method] = approx[free] / exact[free] - 1.0
    # ignoring all coupling underestimates badly (the gauge: every still is relative to still 0)
    assert np.median(rel["block"]) < -0.3
    # block inverses moved to the fixed gauge: within a few per cent, no solves
    print({m: (float(np.median(np.abs(v))), float(np.abs(v).max()), float(np.mean(v))) for m, v in rel.items()})
    assert np.median(np.abs(rel["block_gauge"])) < 0.06 and np.abs(rel["block_gauge"]).max() < 0.2
    # Hutchinson correction: unbiased on average (measured mean -1.4 %) but, at 16 probes,
    # far noisier per parameter (median |err| 14 %, max > 100 %) than block_gauge
    assert abs(np.mean(rel["stochastic"])) < 0.05


def test_step_expected_decrease_and_blocks_against_dense_jacobian(solved):
    """The LM step's expected decrease -(g.h + h.N h / 2) (taken from the CG residual, not a
    third J^T J product) and its block diagonal, against the dense Jacobian; with an LM
    damping mu, h solves (N + mu I) h = -g on the free parameters."""
    from jaxscale.optimize.structured import StructuredSolver

    _, obs, t, free, res = solved
    x = jnp.asarray(np.stack([np.ones(N_EXP), np.zeros(N_EXP)], 1))  # far from the minimum
    solver = StructuredSolver(t.residual_fn, t.block_diagonal_fn)
    mu = 0.5
    h, sum_sq, expected, its, cg_res, blocks = solver.step(x, obs, jnp.asarray(free), mu, 1e-12, max_cg=500)
    r = np.asarray(t.residual_fn(x, obs))
    jac = np.asarray(jax.jacfwd(lambda y: t.residual_fn(y, obs))(x)).reshape(r.size, 2 * N_EXP)
    f = free.reshape(-1)
    n = jac.T @ jac
    g = jac.T @ r
    h_dense = np.zeros(2 * N_EXP)
    h_dense[f] = np.linalg.solve(n[np.ix_(f, f)] + mu * np.eye(f.sum()), -g[f])
    np.testing.assert_allclose(np.asarray(h).reshape(-1), h_dense, rtol=1e-8, atol=1e-12 * np.abs(h_dense).max())
    exp_dense = -(g @ h_dense + 0.5 * h_dense @ n @ h_dense)
    assert abs(float(expected) - exp_dense) <= 1e-9 * abs(exp_dense) and exp_dense > 0
    assert float(sum_sq) == pytest.approx(r @ r, rel=1e-12)
    dense_blocks = np.stack([n[2 * i:2 * i + 2, 2 * i:2 * i + 2] for i in range(N_EXP)])
    np.testing.assert_allclose(np.asarray(blocks), dense_blocks, rtol=1e-8, atol=1e-10 * np.abs(dense_blocks).max())
    np.testing.assert_allclose(np.asarray(solver.blocks(x, obs)), np.asarray(blocks), rtol=1e-12)


def test_closed_form_block_inverse_equals_pseudo_inverse():
    """2 x 2 blocks: full rank, rank one (a still whose rows share one d), zero (no data) and
    ill-conditioned, against numpy's eigen-decomposition pseudo-inverse."""
    from jaxscale.optimize.structured import _inv_blocks

    rng = np.random.default_rng(3)
    a = rng.normal(size=(50, 2, 3))
    full = a @ a.transpose(0, 2, 1)
    v = rng.normal(size=(10, 2))
    rank_one = v[:, :, None] * v[:, None, :] * rng.uniform(0.1, 10.0, (10, 1, 1))
    ill = np.array([[[1.0, 1.0 - 1e-9], [1.0 - 1e-9, 1.0]]])
    blocks = np.concatenate([full, rank_one, np.zeros((3, 2, 2)), ill])
    got = np.asarray(_inv_blocks(jnp.asarray(blocks)))
    want = np.linalg.pinv(blocks, hermitian=True)
    np.testing.assert_allclose(got[:60], want[:60], rtol=1e-10, atol=1e-12 * np.abs(want[:60]).max())
    assert np.all(got[60:63] == 0.0)
    # condition number 2e9: both are accurate to ~cond * eps relative to the largest entry
    np.testing.assert_allclose(got[63], want[63], atol=1e-6 * np.abs(want[63]).max())


def test_solver_built_once_and_precompiled_step_not_compiled_again(solved):
    """StructuredSolver(r, b) is one object per function pair; after `precompile_step` the LM
    round compiles none of its programs again."""
    from jaxscale import compilation
    from jaxscale.optimize.structured import StructuredSolver, precompile_step

    sim, obs, t, free, res = solved
    assert StructuredSolver(t.residual_fn, t.block_diagonal_fn) is StructuredSolver(t.residual_fn,
                                                                                       t.block_diagonal_fn)
    names: list[str] = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(str(kw.get("fun_name")))

    # a residual function of its own, so that nothing is compiled yet
    residual_fn = lambda x, data: t.residual_fn(x, data)  # noqa: E731
    solver = StructuredSolver(residual_fn, t.block_diagonal_fn)
    x0 = np.stack([np.ones(N_EXP), np.zeros(N_EXP)], 1)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        precompile_step(solver, x0, obs, free)
        compilation.wait_for_precompiled()
        n_before = len(names)
        again = minimise_structured(residual_fn, t.block_diagonal_fn, x0, obs, free, sim["intensity"].size,
                                    rmsd_tolerance=1e-10, solver=solver)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert n_before > 0 and len(names) == n_before
    np.testing.assert_allclose(again.x, res.x, rtol=1e-12, atol=1e-12)


def test_step_initial_damping_and_blocks_without_cg(solved):
    """mu < 0: the step uses DIALS' initial damping from its own blocks, as minimise_structured
    did with a separate blocks evaluation (same h bitwise); `diagonal_blocks` (the step run
    without CG iterations) equals the blocks program."""
    from jaxscale.optimize.structured import StructuredSolver, initial_damping

    _, obs, t, free, _ = solved
    x = jnp.asarray(np.stack([np.ones(N_EXP), np.zeros(N_EXP)], 1))
    solver = StructuredSolver(t.residual_fn, t.block_diagonal_fn)
    blocks = np.asarray(solver.blocks(x, obs))
    mu0 = initial_damping(blocks, free)
    assert mu0 == 1e-3 * np.diagonal(blocks, axis1=1, axis2=2)[free].max() > 0
    auto = solver.step(x, obs, jnp.asarray(free), -1.0, 1e-12, max_cg=500)
    given = solver.step(x, obs, jnp.asarray(free), mu0, 1e-12, max_cg=500)
    for a, b in zip(auto, given):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(solver.diagonal_blocks(x, obs, free), blocks)
    assert int(solver.step(x, obs, jnp.asarray(free), 0.0, np.inf, max_cg=500)[3]) == 0  # no CG iteration
