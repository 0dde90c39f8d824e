"""Components whose factor is a link function of a sparse linear form of the parameters.

Every DIALS scaling component is ``factor = link(sum_k w[i, k] * params[idx[i, k]])``:
smoothers (weights = normalised Gaussian kernel), spherical harmonics (weights = a_lm),
single-value scale/B (weight 1), dose decay (weight z/d^2). So one precomputed basis
``{"idx": int[n_obs, K], "w": f[n_obs, K], ...}`` over the observations of *all* data
sets, with indices into the component's flat parameter array, covers multi-dataset models
with no per-dataset Python in the traced code. Observations of data sets that do not have
the component get zero weights (and ``absent = 1`` so that multiplicative grids give 1).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.models.component import Basis, Component, take


class ComponentEntry(NamedTuple):
    """One data set's part of a component, in that data set's local parameter indices."""

    params: np.ndarray  # f[n_p] initial (or loaded) parameters
    idx: np.ndarray  # int[n_obs_i, K] local parameter index per observation
    w: np.ndarray  # f[n_obs_i, K] weights (0 for padding)
    extra: dict[str, np.ndarray] | None = None  # per-observation arrays f[n_obs_i] for the link
    restraint_weights: np.ndarray | None = None  # f[n_p] weights of w_p p^2, or None


class ConfiguredComponent(NamedTuple):
    component: Component
    params: np.ndarray  # f[n_params] flat initial parameters, data sets concatenated
    basis: dict[str, np.ndarray]  # per-observation basis over all data sets' observations
    slices: dict[int, slice]  # data set position -> its parameters in the flat array


def linear_form(params: jax.Array, basis: Basis) -> jax.Array:
    """sum_k w[i, k] params[idx[i, k]]: f[n_p], {idx, w: [n_obs, K]} -> f[n_obs]."""
    return jnp.sum(basis["w"] * take(params, basis["idx"]), axis=1)


def apply_grid(params: jax.Array, basis: Basis) -> jax.Array:
    """Multiplicative smoothed grid (null value 1): value, or 1 where the data set lacks it."""
    return linear_form(params, basis) + basis["absent"]


def apply_b_factor(params: jax.Array, basis: Basis) -> jax.Array:
    """exp(B / (2 d^2)) with B the linear form (smoothed or single B)."""
    return jnp.exp(linear_form(params, basis) * basis["inv_two_d_sq"])


def apply_one_plus(params: jax.Array, basis: Basis) -> jax.Array:
    """1 + sum_lm C_lm a_lm (spherical-harmonic absorption surface)."""
    return 1.0 + linear_form(params, basis)


def apply_exp(params: jax.Array, basis: Basis) -> jax.Array:
    """exp(linear form): dose decay exp(C z / d^2) with the weight z / d^2 precomputed."""
    return jnp.exp(linear_form(params, basis))


def apply_one_plus_every(params: jax.Array, basis: Basis) -> jax.Array:
    """`apply_one_plus` where every row reads every parameter in order (idx[i] = 0..K-1: one
    data set's, or a shared, absorption surface): params broadcast instead of gathered. Same
    values; its gradient is a column sum instead of a scatter of n_obs x K entries, which
    costs ~0.8 ms per gradient on quartz with the fast compile options."""
    return 1.0 + jnp.sum(basis["w"] * params[None, :], axis=1)


def _linear_form_host(params: np.ndarray, basis: dict) -> np.ndarray:
    return np.sum(basis["w"] * params[basis["idx"]], axis=1)


_HOST_APPLY: dict[Callable, Callable] = {
    apply_grid: lambda p, b: _linear_form_host(p, b) + b["absent"],
    apply_b_factor: lambda p, b: np.exp(_linear_form_host(p, b) * b["inv_two_d_sq"]),
    apply_one_plus: lambda p, b: 1.0 + _linear_form_host(p, b),
    apply_exp: lambda p, b: np.exp(_linear_form_host(p, b)),
    apply_one_plus_every: lambda p, b: 1.0 + _linear_form_host(p, b),
}

# link functions with a form for bases whose rows all read every parameter in order
_EVERY_PARAMETER_FORM: dict[Callable, Callable] = {apply_one_plus: apply_one_plus_every}


def host_apply(apply: Callable) -> Callable[[np.ndarray, dict], np.ndarray] | None:
    """numpy twin of one of this module's link functions (same formula on host arrays, for
    evaluating a model on a small grid without compiling), or None for any other apply."""
    return _HOST_APPLY.get(apply)


# d factor / d (slot value) of each link, f[n_obs, K], from the factor and the basis: the
# closed form of what `jax.grad` of the link gives, in the same order of operations
_SLOT_SLOPE: dict[Callable, Callable] = {
    apply_grid: lambda f, b: b["w"],
    apply_one_plus: lambda f, b: b["w"],
    apply_one_plus_every: lambda f, b: b["w"],
    apply_b_factor: lambda f, b: (f * b["inv_two_d_sq"])[:, None] * b["w"],
    apply_exp: lambda f, b: f[:, None] * b["w"],
}


def slot_slope(apply: Callable) -> Callable[[jax.Array, Basis], jax.Array] | None:
    """(factor f[n_obs], basis) -> d factor / d params[idx[i, k]] f[n_obs, K] for one of this
    module's link functions (traced without autodiff), or None for any other apply."""
    return _SLOT_SLOPE.get(apply)


def _padded(a: np.ndarray, k: int, dtype, offset: int = 0) -> np.ndarray:
    """a [n, k_a] as dtype, plus offset, zero-padded to k columns (no copy beyond one)."""
    a = np.asarray(a)
    if a.shape[1] == k:
        out = a.astype(dtype, copy=True)
    else:
        out = np.zeros((a.shape[0], k), dtype=dtype)
        out[:, :a.shape[1]] = a
    if offset:
        out[:, :a.shape[1]] += offset
    return out


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenation along rows (the single part itself when there is one)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def assemble(
    name: str,
    apply: Callable[[jax.Array, Basis], jax.Array],
    entries: Sequence[ComponentEntry | None],
    n_obs: Sequence[int],
    shared: bool = False,
    extra_fill: dict[str, float] | None = None,
) -> ConfiguredComponent:
    """Concatenate per-data-set entries into one flat parameter array and one basis.

    entries[i] is None where data set i lacks the component. shared=True makes every data
    set index the first present data set's parameter block (DIALS share.absorption /
    share.decay). extra_fill: value of each extra array on rows of absent data sets.
    """
    present = [i for i, e in enumerate(entries) if e is not None]
    if not present:
        raise ValueError(f"component {name} has no data set")
    k = max(entries[i].idx.shape[1] for i in present)
    offsets, blocks, slices = {}, [], {}
    start = 0
    for i in present:
        if shared and blocks:
            offsets[i] = 0
            slices[i] = slice(0, len(blocks[0]))
            continue
        offsets[i] = start
        n_p = len(entries[i].params)
        slices[i] = slice(start, start + n_p)
        blocks.append(np.asarray(entries[i].params, dtype=np.float64))
        start += n_p
    params = np.concatenate(blocks)
    idx_parts, w_parts, absent_parts = [], [], []
    extra_names = sorted({key for i in present for key in (entries[i].extra or {})})
    extra_parts: dict[str, list] = {key: [] for key in extra_names}
    fill = extra_fill or {}
    for i, n in enumerate(n_obs):
        e = entries[i]
        if e is None:
            idx_parts.append(np.zeros((n, k), dtype=np.int32))
            w_parts.append(np.zeros((n, k)))
            absent_parts.append(np.ones(n))
            for key in extra_names:
                extra_parts[key].append(np.full(n, fill.get(key, 0.0)))
            continue
        idx_parts.append(_padded(e.idx, k, np.int32, offsets[i]))
        w_parts.append(_padded(e.w, k, np.float64))
        absent_parts.append(np.zeros(n))
        for key in extra_names:
            extra_parts[key].append(np.asarray(e.extra[key], dtype=np.float64))
    basis = {"idx": _joined(idx_parts), "w": _joined(w_parts), "absent": _joined(absent_parts)}
    basis.update({key: _joined(parts) for key, parts in extra_parts.items()})
    restraint = None
    if any(entries[i].restraint_weights is not None for i in present):
        restraint = np.zeros(len(params))
        for i in present:
            if entries[i].restraint_weights is not None:
                restraint[slices[i]] = entries[i].restraint_weights
    if apply in _EVERY_PARAMETER_FORM and _reads_every_parameter(basis["idx"], len(params)):
        apply = _EVERY_PARAMETER_FORM[apply]
    component = Component(name, apply, restraint)  # numpy: constant inside the jitted objective
    return ConfiguredComponent(component, params, basis, slices)


def _reads_every_parameter(idx: np.ndarray, n_params: int) -> bool:
    """True when row i of idx (int[n_obs, K]) is 0..K-1 for every i and K == n_params."""
    return idx.shape[1] == n_params and bool(np.all(idx == np.arange(n_params, dtype=idx.dtype)))


def single_parameter_rows(n_obs: int, weight: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a one-parameter component: idx 0, the given weight. -> (int[n,1], f[n,1])"""
    w = np.broadcast_to(np.asarray(weight, dtype=np.float64), (n_obs,)).reshape(n_obs, 1)
    return np.zeros((n_obs, 1), dtype=np.int32), w.copy()
