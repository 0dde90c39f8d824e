"""The contract of a scaling-model component.

A component is data, not a stateful object: a pure `apply(params, basis) -> factor` over
a precomputed per-observation basis, plus optional quadratic restraint weights. The
inverse scale factor of an observation is the product of its model's component factors.
Parameters of one component for all data sets are one flat 1-D array, so `jax.grad`,
`jax.jacfwd` and sharding see plain pytrees.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

Basis = Mapping[str, jax.Array]


class Component(NamedTuple):
    name: str
    # (params: f[n_params], basis) -> f[n_obs]; the multiplicative factor per observation
    apply: Callable[[jax.Array, Basis], jax.Array]
    # weights w_p of restraint terms w_p * p**2 (f[n_params]), or None for no restraint
    restraint_weights: jax.Array | None = None


def take(values: jax.Array, indices: jax.Array) -> jax.Array:
    """values[indices] for indices known to lie in 0..len(values)-1 (basis slots, group ids):
    the same gather without the negative-index wrapping that `values[indices]` traces
    (three integer ops per gather, and per scatter of its gradient)."""
    if not hasattr(values, "at"):  # host arrays (numpy) index as before
        return values[indices]
    return values.at[indices].get(mode="promise_in_bounds", wrap_negative_indices=False)


def inverse_scale(
    components: Mapping[str, Component],
    params: Mapping[str, jax.Array],
    bases: Mapping[str, Basis],
) -> jax.Array:
    """g_i = prod_c apply_c(params_c, basis_c) over the model's components."""
    g = None
    for name, comp in components.items():
        f = comp.apply(params[name], bases[name])
        g = f if g is None else g * f
    return g


def restraint_penalty(components: Mapping[str, Component], params: Mapping[str, jax.Array]) -> jax.Array:
    """sum_c sum_p w_p p^2 over the components that carry restraints."""
    total = jnp.zeros(())
    for name, comp in components.items():
        if comp.restraint_weights is not None:
            total = total + jnp.sum(comp.restraint_weights * params[name] ** 2)
    return total
