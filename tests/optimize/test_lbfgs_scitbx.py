"""optax L-BFGS + our More-Thuente line search reproduce scitbx's L-BFGS step by step.

Reference trajectories come from scitbx (the minimiser inside dials.scale), made by
tests/optimize/reference/make_scitbx_lbfgs.py with DIALS' python.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscale.optimize.lbfgs import more_thuente_search, scale_by_more_thuente_linesearch

REFERENCE = json.loads((Path(__file__).parent / "reference" / "scitbx_lbfgs.json").read_text())


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def scaled_quartic(x):
    n = x.size
    c = 10.0 ** (4.0 * jnp.arange(n) / (n - 1))
    return jnp.sum(c * (x - 1.0) ** 2) + 0.1 * jnp.sum(x) ** 4


def log_cosh(x):
    n = x.size
    return jnp.sum(jnp.log(jnp.cosh(3.0 * (x - jnp.arange(n) / n)))) + 0.005 * jnp.sum(x * x)


FUNCTIONS = {"rosenbrock": rosenbrock, "scaled_quartic": scaled_quartic, "log_cosh": log_cosh}


def _trajectory(fn, x0, n_steps):
    opt = optax.lbfgs(memory_size=5, linesearch=scale_by_more_thuente_linesearch())
    value_and_grad = optax.value_and_grad_from_state(fn)

    @jax.jit
    def step(x, state):
        value, grad = value_and_grad(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fn)
        return optax.apply_updates(x, updates), state

    x = jnp.asarray(x0, dtype=jnp.float64)
    state = opt.init(x)
    out, n_calls = [], 1
    for _ in range(n_steps):
        x, state = step(x, state)
        n_calls += int(optax.tree.get(state, "n_evaluations"))
        out.append((float(optax.tree.get(state, "value")), np.asarray(x), n_calls, bool(optax.tree.get(state, "failed"))))
    return out


@pytest.mark.parametrize("name", ["rosenbrock", "scaled_quartic"])
def test_steps_match_scitbx(name):
    ref = REFERENCE[name]
    steps = ref["steps"]
    ours = _trajectory(FUNCTIONS[name], ref["x0"], len(steps))
    for k, (r, (f, x, n_calls, failed)) in enumerate(zip(steps, ours)):
        assert not failed
        assert f == pytest.approx(r["f"], rel=1e-8, abs=1e-10), f"step {k}"
        np.testing.assert_allclose(x, r["x"], rtol=1e-7, atol=1e-9, err_msg=f"step {k}")
        assert n_calls == r["n_calls"], f"function evaluations differ at step {k}"


def test_small_gradient_first_step_and_failure():
    """|g| < 1 at the start (scitbx's first step 1/|g|, optax caps its scaling at 1) and
    scitbx's 'rounding errors' line-search failure at the end keep the best point."""
    ref = REFERENCE["log_cosh"]
    steps = ref["steps"]
    ours = _trajectory(log_cosh, ref["x0"], len(steps) + 1)
    for k, r in enumerate(steps):
        assert ours[k][0] == pytest.approx(r["f"], rel=1e-7), f"step {k}"
    assert ours[len(steps)][3], "the search after scitbx's last step fails"
    assert ours[len(steps)][0] <= steps[-1]["f"] + 1e-15


def test_search_wolfe_conditions_on_a_quadratic():
    """Planted 1-D minimum: the accepted step satisfies strong Wolfe; from a tiny start step
    the search extrapolates; from a huge one it interpolates back."""
    a = jnp.array([3.0, 0.5])
    fn = lambda x: 0.5 * jnp.sum(a * x * x)  # noqa: E731
    vg = jax.value_and_grad(fn)
    x = jnp.array([1.0, -2.0])
    f0, g0 = vg(x)
    d = -g0
    for step0 in (1e-3, 1.0, 50.0):
        stp, f, g, nfev, failed = more_thuente_search(vg, x, d, f0, g0, step0)
        assert not bool(failed)
        dg0 = float(jnp.vdot(g0, d))
        assert float(f) <= float(f0) + 1e-4 * float(stp) * dg0
        assert abs(float(jnp.vdot(g, d))) <= 0.9 * abs(dg0)
        assert float(f) == pytest.approx(float(fn(x + stp * d)))
    # not a descent direction: no step, flagged
    stp, f, _, _, failed = more_thuente_search(vg, x, -d, f0, g0)
    assert bool(failed) and float(stp) == 0.0 and float(f) == float(f0)
