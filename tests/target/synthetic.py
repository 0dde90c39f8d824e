"""Synthetic grouped scaling data with planted scales, for target/optimize/errors tests."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxscale.models.component import Component


def _smooth_apply(params, basis):
    """Linear interpolation between knots: sum_k p[idx_k] w_k."""
    return jnp.sum(params[basis["idx"]] * basis["w"], axis=-1)


def _decay_apply(params, basis):
    b = jnp.sum(params[basis["idx"]] * basis["w"], axis=-1)
    return jnp.exp(b / (2.0 * basis["d"] ** 2))


def hat_basis(t: np.ndarray, n_knots: int) -> dict:
    """Window indices (n, 2) and weights (n, 2) of linear interpolation on [0, 1]."""
    u = np.clip(t, 0, 1 - 1e-12) * (n_knots - 1)
    k = np.floor(u).astype(np.int32)
    f = u - k
    return {"idx": jnp.asarray(np.stack([k, k + 1], -1)), "w": jnp.asarray(np.stack([1 - f, f], -1))}


def make_synthetic(
    n_groups: int = 300,
    n_knots: int = 5,
    n_decay: int = 3,
    seed: int = 0,
    noise: float = 1.0,
    decay_restraint: float = 0.1,
):
    """Return (components, true_params, start_params, bases, I, V, group_id, I_true)."""
    rng = np.random.default_rng(seed)
    mult = rng.integers(2, 7, n_groups)
    gid = np.repeat(np.arange(n_groups), mult)
    n = gid.size
    t = rng.uniform(0, 1, n)
    d_group = rng.uniform(0.8, 4.0, n_groups)
    d = d_group[gid]
    ih_true = rng.lognormal(5.0, 1.5, n_groups)
    scale_true = 1.0 + 0.3 * np.sin(np.linspace(0, 3, n_knots))
    decay_true = np.linspace(0.0, -1.0, n_decay)
    sb = hat_basis(t, n_knots)
    db = hat_basis(t, n_decay)
    db["d"] = jnp.asarray(d)
    components = {
        "scale": Component("scale", _smooth_apply, None),
        "decay": Component("decay", _decay_apply, jnp.full(n_decay, decay_restraint)),
    }
    true = {"scale": jnp.asarray(scale_true), "decay": jnp.asarray(decay_true)}
    g = np.asarray(_smooth_apply(true["scale"], sb) * _decay_apply(true["decay"], db))
    mean = g * ih_true[gid]
    var = mean + 4.0
    intensity = mean + noise * rng.normal(size=n) * np.sqrt(var)
    start = {"scale": jnp.ones(n_knots), "decay": jnp.zeros(n_decay)}
    bases = {"scale": sb, "decay": db}
    return components, true, start, bases, intensity, var, gid, ih_true
