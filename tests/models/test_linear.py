"""models/linear.py: the broadcast form of a surface that every row reads in full."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.models.linear import (
    ComponentEntry,
    apply_one_plus,
    apply_one_plus_every,
    assemble,
    host_apply,
)


def _surface_entry(n_obs: int, n_coef: int, seed: int) -> ComponentEntry:
    rng = np.random.default_rng(seed)
    idx = np.broadcast_to(np.arange(n_coef, dtype=np.int32), (n_obs, n_coef)).copy()
    return ComponentEntry(rng.normal(size=n_coef) * 0.1, idx, rng.normal(size=(n_obs, n_coef)))


def test_one_surface_uses_the_broadcast_form_with_equal_values():
    conf = assemble("absorption", apply_one_plus, [_surface_entry(50, 8, 0)], [50])
    assert conf.component.apply is apply_one_plus_every
    p = jnp.asarray(conf.params)
    basis = {k: jnp.asarray(v) for k, v in conf.basis.items()}
    # the same factor bit for bit as the gathered form, and as the numpy twin
    got = np.asarray(jax.jit(apply_one_plus_every)(p, basis))
    want = np.asarray(jax.jit(apply_one_plus)(p, basis))
    np.testing.assert_array_equal(got, want)
    host = host_apply(apply_one_plus_every)(conf.params, conf.basis)
    np.testing.assert_allclose(host, want, rtol=1e-15, atol=0)
    # the gradient is w^T 1 either way (a column sum: rounding-level differences only)
    loss = lambda f: lambda q: jnp.sum(f(q, basis) ** 2)  # noqa: E731
    g_every = np.asarray(jax.jit(jax.grad(loss(apply_one_plus_every)))(p))
    g_gather = np.asarray(jax.jit(jax.grad(loss(apply_one_plus)))(p))
    np.testing.assert_allclose(g_every, g_gather, rtol=1e-12, atol=0)
    analytic = 2.0 * conf.basis["w"].T @ (1.0 + conf.basis["w"] @ conf.params)
    np.testing.assert_allclose(g_every, analytic, rtol=1e-12)


def test_separate_surfaces_or_absent_data_sets_keep_the_gathered_form():
    two = [_surface_entry(30, 8, 1), _surface_entry(20, 8, 2)]
    assert assemble("absorption", apply_one_plus, two, [30, 20]).component.apply is apply_one_plus
    # shared: every row reads the first block, so the broadcast form applies
    shared = assemble("absorption", apply_one_plus, two, [30, 20], shared=True)
    assert shared.component.apply is apply_one_plus_every
    # a data set without the surface has zero rows (idx 0): gathered form
    absent = assemble("absorption", apply_one_plus, [_surface_entry(30, 8, 3), None], [30, 20])
    assert absent.component.apply is apply_one_plus
