"""Per-residual losses of the scaling objective.

Each loss maps the squared normalised residual `z2 = w r^2` (>= 0) to its contribution to
the objective, so the rest of the target never needs to know which loss is in use.
`least_squares` reproduces DIALS (f = sum w r^2); the robust losses are options that
down-weight outliers instead of rejecting them.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxscale.exceptions import ParameterError

Loss = Callable[[jax.Array], jax.Array]  # f[n] z2 -> f[n]


def least_squares(z2: jax.Array) -> jax.Array:
    """rho(z2) = z2: the DIALS weighted least-squares target."""
    return z2


def student_t(dof: float = 4.0) -> Loss:
    """rho(z2) = dof log(1 + z2/dof): the Student-t negative log-likelihood
    ((dof+1)/2 log(1 + z2/dof)) rescaled so that rho ~ z2 near zero, like least squares."""

    def loss(z2: jax.Array) -> jax.Array:
        return dof * jnp.log1p(z2 / dof)

    return loss


def huber(k: float = 3.0) -> Loss:
    """rho(z) = z^2 for |z| <= k, 2k|z| - k^2 beyond: linear tails, continuous slope."""

    def loss(z2: jax.Array) -> jax.Array:
        # sqrt evaluated only where z2 > k^2 so the gradient stays finite at z2 = 0
        z_abs = jnp.sqrt(jnp.maximum(z2, k * k))
        return jnp.where(z2 <= k * k, z2, 2.0 * k * z_abs - k * k)

    return loss


def get_loss(name: str, **kwargs: float) -> Loss:
    """Loss by name: 'least_squares', 'student_t' (dof=), 'huber' (k=)."""
    if name == "least_squares":
        return least_squares
    if name == "student_t":
        return student_t(**kwargs)
    if name == "huber":
        return huber(**kwargs)
    raise ParameterError(f"unknown loss {name!r} (least_squares, student_t, huber)")
