"""Sharded per-still KB objective: closed-form gradient vs autodiff, agreement with the
engine's group mean, exact block diagonal, and sharded (4 CPU devices) == single device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.serial import simulate_flat_stills
from jaxscale.target.objective import make_problem, residuals
from jaxscale.target.sharding import CPU_BLOCK_CHUNKS, KBStillsTarget, make_observations, padded_length


def _problem(n_exp=40, per=25, n_groups=300, seed=0):
    sim = simulate_flat_stills(n_exp, per, n_groups, seed=seed)
    w = 1.0 / sim["variance"]
    rng = np.random.default_rng(seed)
    x = np.stack([np.exp(rng.normal(0, 0.2, n_exp)), rng.normal(0, 3, n_exp)], 1)
    return sim, w, x


def test_value_gradient_match_autodiff_and_engine_group_mean():
    sim, w, x = _problem()
    obs = make_observations(sim["intensity"], w, sim["d"], sim["group_id"], sim["experiment_index"], 300, 40)
    t = KBStillsTarget()
    free, xj = jnp.ones((40, 2), bool), jnp.asarray(x)
    value, grad = t.value_and_grad(xj, obs, free, xj)
    # reference: the engine's profiled residuals with g computed independently in numpy
    g = x[sim["experiment_index"], 0] * np.exp(x[sim["experiment_index"], 1] / (2 * sim["d"] ** 2))
    r = np.asarray(residuals(make_problem(sim["intensity"], w, sim["group_id"], 300), jnp.asarray(g)))
    assert np.isclose(float(value), np.sum(w * r * r), rtol=1e-12)
    auto = jax.grad(lambda y: jnp.sum(t.residual_fn(y, obs) ** 2))(xj)  # includes dI_h/dp
    np.testing.assert_allclose(np.asarray(grad), np.asarray(auto), rtol=1e-9, atol=1e-9 * np.abs(auto).max())
    # the custom-VJP objective differentiates to the same gradient
    g2 = jax.grad(t.objective)(xj, obs, free, xj)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(auto), rtol=1e-9, atol=1e-9 * np.abs(auto).max())


def test_fixed_parameters_have_zero_gradient_and_padding_is_inert():
    sim, w, x = _problem()
    t = KBStillsTarget()
    obs = make_observations(sim["intensity"], w, sim["d"], sim["group_id"], sim["experiment_index"], 300, 40)
    free = np.ones((40, 2), bool)
    free[3] = False
    xj = jnp.asarray(x)
    v, grad = t.value_and_grad(xj + 0.1, obs, jnp.asarray(free), xj)
    assert np.all(np.asarray(grad)[3] == 0)
    v_ref, _ = t.value_and_grad(xj.at[:].add(0.1).at[3].set(xj[3]), obs, jnp.ones((40, 2), bool), xj)
    assert np.isclose(float(v), float(v_ref), rtol=1e-14)
    # 7 extra zero-weight rows change nothing
    pad = lambda a, fill: np.r_[a, np.full(7, fill)]  # noqa: E731
    obs_p = make_observations(pad(sim["intensity"], 5.0), pad(w, 0.0), pad(sim["d"], 2.0), pad(sim["group_id"], 1),
                              pad(sim["experiment_index"], 2), 300, 40)
    assert np.isclose(float(t.value_and_grad(xj, obs_p, jnp.ones((40, 2), bool), xj)[0]),
                      float(t.value_and_grad(xj, obs, jnp.ones((40, 2), bool), xj)[0]), rtol=1e-14)
    assert padded_length(10, None) == 10


def test_blocked_evaluation_equals_one_block_and_numpy():
    """The evaluation loop over blocks of chunks (3 full blocks of 7 chunks + a tail, and
    blocks of 1 chunk) gives the one-block value, gradient and I_h; all equal a numpy
    computation of f, I_h and the closed-form gradient."""
    sim, w, x = _problem(n_exp=12, per=20, n_groups=90, seed=4)  # 12 stills x 3 chunks = 36 chunks
    obs = make_observations(sim["intensity"], w, sim["d"], sim["group_id"], sim["experiment_index"], 90, 12)
    assert obs.chunk_experiment.shape[0] == 36
    xj, free = jnp.asarray(x), jnp.ones((12, 2), bool)
    e, gid, d, i_obs = sim["experiment_index"], sim["group_id"], sim["d"], sim["intensity"]
    g = x[e, 0] * np.exp(x[e, 1] / (2 * d * d))
    den = np.bincount(gid, w * g * g, 90)
    ih = np.bincount(gid, w * g * i_obs, 90) / np.where(den > 0, den, 1.0)  # 0 for groups not observed
    r = i_obs - g * ih[gid]
    df_dg = -2 * w * r * ih[gid]
    grad = np.stack([np.bincount(e, df_dg * g / x[e, 0], 12), np.bincount(e, df_dg * g / (2 * d * d), 12)], 1)
    for block_chunks in (None, 7, 1):
        t = KBStillsTarget(block_chunks=block_chunks)
        value, gradient = t.value_and_grad(xj, obs, free, xj)
        assert np.isclose(float(value), np.sum(w * r * r), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(gradient), grad, rtol=1e-10, atol=1e-12 * np.abs(grad).max())
        np.testing.assert_allclose(np.asarray(t.group_mean(xj, obs)), ih, rtol=1e-12)


def test_fold_blocks_in_streams_visits_every_chunk_once():
    """The loop over blocks in 1-3 independent runs (streams) steps over every chunk exactly
    once, whatever the split into full blocks, leftover blocks and tail: per-chunk visit
    counts all 1 and the sum of the row values equal to the exact integer sum."""
    from jaxscale.target.sharding import StillObservations, _fold_blocks

    def step(carry, blk):
        total, visits = carry
        return total + jnp.sum(blk.intensity), visits.at[blk.chunk_experiment].add(1)

    for n_chunks in (1, 7, 12, 13):
        rows = jnp.arange(2 * n_chunks, dtype=jnp.float64)
        obs = StillObservations(intensity=rows, weight=rows, inv_two_d_sq=rows, group_id=jnp.zeros(rows.shape, jnp.int32),
                                chunk_experiment=jnp.arange(n_chunks, dtype=jnp.int32), n_groups=1,
                                n_experiments=n_chunks, chunk=2)
        carry = (jnp.zeros(()), jnp.zeros(n_chunks, jnp.int32))
        for block_chunks in (1, 2, 3, 5):
            for n_streams in (1, 2, 3):
                total, visits = _fold_blocks(step, carry, obs, block_chunks, n_streams)
                assert float(total) == n_chunks * (2 * n_chunks - 1), (n_chunks, block_chunks, n_streams)
                assert np.all(np.asarray(visits) == 1), (n_chunks, block_chunks, n_streams)


def test_block_size_is_chosen_by_platform():
    assert KBStillsTarget().block_chunks == (CPU_BLOCK_CHUNKS if jax.devices()[0].platform == "cpu" else None)
    assert KBStillsTarget(block_chunks=None).block_chunks is None


def test_block_diagonal_equals_dense_jacobian_blocks():
    sim, w, x = _problem()  # each still sees distinct groups: the closed form is exact
    obs = make_observations(sim["intensity"], w, sim["d"], sim["group_id"], sim["experiment_index"], 300, 40)
    t = KBStillsTarget()
    xj = jnp.asarray(x)
    jac = np.asarray(jax.jacfwd(lambda y: t.residual_fn(y, obs))(xj)).reshape(-1, 80)
    nm = jac.T @ jac
    dense_blocks = np.stack([nm[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] for i in range(40)])
    np.testing.assert_allclose(np.asarray(t.block_diagonal(xj, obs)), dense_blocks, rtol=1e-10,
                               atol=1e-12 * np.abs(dense_blocks).max())


_SHARDED = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jaxscale, jax, jax.numpy as jnp, numpy as np
    from jaxscale.optimize.structured import minimise_structured
    from jaxscale.serial import simulate_flat_stills
    from jaxscale.target.sharding import KBStillsTarget, make_observations, observation_mesh
    assert len(jax.devices()) == 4
    sim = simulate_flat_stills(60, 30, 400, seed=3)
    n_obs = sim["intensity"].size  # 1800 + padding to 4 devices is a no-op; drop 2 rows to force padding
    sel = slice(0, n_obs - 2)
    w = 1.0 / sim["variance"][sel]
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.stack([np.exp(rng.normal(0, .2, 60)), rng.normal(0, 3, 60)], 1))
    free = jnp.ones((60, 2), bool)
    out = {}
    for name, mesh in (("single", None), ("sharded", observation_mesh(4))):
        obs = make_observations(sim["intensity"][sel], w, sim["d"][sel], sim["group_id"][sel],
                                sim["experiment_index"][sel], 400, 60, mesh=mesh)
        t = KBStillsTarget(mesh)
        v, g = t.value_and_grad(x, obs, free, x)
        vb, gb = KBStillsTarget(mesh, block_chunks=5).value_and_grad(x, obs, free, x)  # loop + tail per device
        fixed = np.ones((60, 2), bool)
        fixed[0] = False
        x0 = jnp.asarray(np.stack([np.ones(60), np.zeros(60)], 1))
        res = minimise_structured(t.residual_fn, t.block_diagonal_fn, x0, obs, fixed, n_obs - 2,
                                  engine="GaussNewton", rmsd_tolerance=1e-13)
        out[name] = {"value": float(v), "grad": np.asarray(g).tolist(), "scale": res.x[:, 0].tolist(),
                     "B": res.x[:, 1].tolist(), "n_shards": len(obs.intensity.sharding.device_set),
                     "n_devices": len(obs.intensity.sharding.device_set), "iterations": res.n_iterations,
                     "value_blocked": float(vb), "grad_blocked": np.asarray(gb).tolist()}
    print(json.dumps(out))
    """
)


def test_one_target_per_configuration_and_fast_compiled_small_problems():
    """Constructing the target again gives the same object (its programs are traced once per
    process); a small problem runs the fast-compile variant, which agrees with XLA's default
    compilation to rounding."""
    from jaxscale.target import sharding

    assert KBStillsTarget() is KBStillsTarget()
    assert KBStillsTarget(block_chunks=5) is KBStillsTarget(block_chunks=5) is not KBStillsTarget()
    sim, w, x = _problem()
    obs = make_observations(sim["intensity"], w, sim["d"], sim["group_id"], sim["experiment_index"], 300, 40)
    t = KBStillsTarget()
    xj, free = jnp.asarray(x), jnp.ones((40, 2), bool)
    args = (xj, obs, free, xj)
    assert obs.intensity.shape[0] <= sharding.FAST_COMPILE_MAX_ROWS
    assert t.value_and_grad.variant(*args) is t.value_and_grad._fast
    fast_value, fast_grad = t.value_and_grad(*args)
    full_value, full_grad = t.value_and_grad._full(*args)
    assert abs(float(fast_value) - float(full_value)) <= 1e-13 * abs(float(full_value))
    np.testing.assert_allclose(np.asarray(fast_grad), np.asarray(full_grad), rtol=1e-11,
                               atol=1e-13 * np.abs(np.asarray(full_grad)).max())
    n_programs = t.value_and_grad._cache_size()
    KBStillsTarget().value_and_grad(*args)  # a "new" target: no new program
    assert t.value_and_grad._cache_size() == n_programs


def test_sharded_over_four_cpu_devices_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = out["single"], out["sharded"]
    assert four["n_shards"] == 4 and one["n_shards"] == 1 and one["iterations"] >= 2
    assert abs(one["value"] - four["value"]) <= 1e-10 * abs(one["value"])
    g1, g4 = np.asarray(one["grad"]), np.asarray(four["grad"])
    assert np.abs(g1 - g4).max() <= 1e-10 * np.abs(g1).max()
    for run in (one, four):  # evaluation in blocks of 5 chunks (a loop on each device) == one block
        assert abs(run["value_blocked"] - one["value"]) <= 1e-10 * abs(one["value"])
        assert np.abs(np.asarray(run["grad_blocked"]) - g1).max() <= 1e-10 * np.abs(g1).max()
    np.testing.assert_allclose(four["scale"], one["scale"], rtol=1e-10)
    np.testing.assert_allclose(four["B"], one["B"], rtol=1e-10, atol=1e-10)


def test_ids_outside_their_range_are_refused():
    """The evaluation indexes with group and still ids unchecked (native kernel, XLA gathers and
    scatters): make_observations refuses ids outside [0, n)."""
    ones = np.ones(4)
    ok = make_observations(ones, ones, 2.0 * ones, np.array([0, 1, 1, 2]), np.array([0, 0, 1, 1]), 3, 2)
    assert ok.n_groups == 3
    with pytest.raises(ValueError, match="group_id"):
        make_observations(ones, ones, 2.0 * ones, np.array([0, 1, 1, 3]), np.array([0, 0, 1, 1]), 3, 2)
    with pytest.raises(ValueError, match="group_id"):
        make_observations(ones, ones, 2.0 * ones, np.array([0, -1, 1, 2]), np.array([0, 0, 1, 1]), 3, 2)
    with pytest.raises(ValueError, match="experiment_id"):
        make_observations(ones, ones, 2.0 * ones, np.array([0, 1, 1, 2]), np.array([0, 0, 1, 2]), 3, 2)
