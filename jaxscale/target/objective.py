"""The scaling objective: residuals against the closed-form group mean, loss, restraints.

For observations i in symmetry groups h, with inverse scales g_i = prod_c apply_c(p_c),
`I_h = sum_h(w g I) / sum_h(w g^2)` is recomputed from the current g at every evaluation
(a profiled objective, as DIALS), or taken from a reference for targeted scaling.
`f(p) = sum_i loss(w_i r_i^2) + sum_p w_p p^2` with `r_i = I_i - g_i I_h`; `jax.grad` gives
the exact gradient including the I_h dependence.

Parameters are optimised as one flat vector `x` (the `ravel_pytree` of the parameter pytree);
fixed parameters are held by a boolean `free` mask and an `anchor` vector
(`x_eff = where(free, x, anchor)`), both traced arrays, so changing which parameters are
fixed never recompiles.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.compilation import Program
from jaxscale.models.component import Component, inverse_scale, take
from jaxscale.target.losses import Loss, least_squares


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScalingProblem:
    """Flat observation arrays of one minimisation table (all data sets jointly)."""

    intensity: jax.Array  # f[n_obs] unscaled intensity I
    weight: jax.Array  # f[n_obs] 1/V' (error-model variance); 0 marks padding rows
    group_id: jax.Array  # i[n_obs] symmetry group 0..n_groups-1
    n_groups: int = dataclasses.field(metadata=dict(static=True))
    # f[n_groups] fixed I_h of a reference (targeted scaling), or None for the profiled mean
    ih_reference: jax.Array | None = None


def make_problem(
    intensity: np.ndarray,
    weight: np.ndarray,
    group_id: np.ndarray,
    n_groups: int | None = None,
    ih_reference: np.ndarray | None = None,
) -> ScalingProblem:
    """ScalingProblem from numpy arrays (n_groups defaults to max(group_id) + 1).

    Arrays are converted on the host and moved with `jax.device_put` (an eager
    `jnp.asarray` of a numpy array compiles a program per shape)."""
    group_id = np.asarray(group_id, dtype=np.int32)
    if n_groups is None:
        n_groups = int(group_id.max()) + 1 if group_id.size else 0
    return ScalingProblem(
        intensity=_to_device(intensity, np.float64),
        weight=_to_device(weight, np.float64),
        group_id=jax.device_put(group_id),
        n_groups=int(n_groups),
        ih_reference=None if ih_reference is None else _to_device(ih_reference, np.float64),
    )


def _to_device(a: Any, dtype: Any = None) -> jax.Array:
    """Host array -> device array without compiling (jax arrays pass through)."""
    if isinstance(a, jax.Array) and (dtype is None or a.dtype == dtype):
        return a
    return jax.device_put(np.asarray(a, dtype=dtype))


def select_rows(bases: Any, rows: np.ndarray) -> Any:
    """Bases (pytree of per-observation arrays, leading axis n_obs) at `rows` (int or bool),
    gathered on the host: an eager device gather would compile a program per shape."""
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a)[rows]), bases)


def _is_traced(*arrays: Any) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """num/den with 0 where den == 0 (empty or zero-weight groups), NaN-free gradients."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def group_mean(problem: ScalingProblem, g: jax.Array) -> jax.Array:
    """I_h = sum(w g I)/sum(w g^2) per group (f[n_groups]); the reference if targeted."""
    if problem.ih_reference is not None:
        return problem.ih_reference
    wg = problem.weight * g
    num = jax.ops.segment_sum(wg * problem.intensity, problem.group_id, num_segments=problem.n_groups)
    den = jax.ops.segment_sum(wg * g, problem.group_id, num_segments=problem.n_groups)
    return safe_divide(num, den)


def residuals(problem: ScalingProblem, g: jax.Array) -> jax.Array:
    """r_i = I_i - g_i I_h (f[n_obs])."""
    ih = group_mean(problem, g)
    return problem.intensity - g * take(ih, problem.group_id)


def n_reflections(problem: ScalingProblem) -> jax.Array | int:
    """Number of real (weight > 0) reflection rows: the RMSD denominator (computed on the
    host when called outside a trace)."""
    if _is_traced(problem.weight):
        return jnp.sum(problem.weight > 0)
    return int(np.count_nonzero(np.asarray(problem.weight) > 0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TargetData:
    """Everything the jitted objective reads besides x: observations, bases, fixed values."""

    problem: ScalingProblem
    bases: Any  # pytree of per-observation basis arrays (leading axis n_obs)
    anchor: jax.Array  # f[n_params] values used for fixed parameters
    free: jax.Array  # bool[n_params] True where the parameter is refined


def _data_rows(x: Any, data: TargetData) -> int:
    """Observation rows of a (x, TargetData) call (decides the compile options)."""
    return int(np.shape(data.problem.weight)[0])


def basis_rows(x: Any, bases: Any) -> int:
    """Observation rows of an (x, bases) call: the leading axis of the bases."""
    leaves = jax.tree.leaves(bases)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


class ScalingTarget:
    """Jitted objective, gradient and RMSD of one scaling model over flat parameters.

    Built once per model (components + parameter layout); every function takes the flat
    parameter vector and a `TargetData`, so it compiles once per array shape.
    """

    def __init__(
        self,
        components: Mapping[str, Component],
        params: Mapping[str, jax.Array],
        loss: Loss = least_squares,
    ):
        self.components = dict(components)
        # flat layout as ravel_pytree: dict keys sorted, each block raveled in C order
        self.keys = sorted(params)
        self.shapes = {k: np.shape(params[k]) for k in self.keys}
        sizes = [int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.keys]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.slices = {k: slice(int(bounds[i]), int(bounds[i + 1])) for i, k in enumerate(self.keys)}
        self.x0 = self._flat({k: np.asarray(params[k], dtype=np.float64) for k in self.keys})
        self.n_params = int(self.x0.size)
        self.loss = loss
        # f[n_params] restraint weights w_p (restraint term w_p p^2), 0 for unrestrained
        self.restraint_weights = self._flat({
            k: np.zeros(self.shapes[k]) if comp.restraint_weights is None
            else np.broadcast_to(np.asarray(comp.restraint_weights, dtype=np.float64), self.shapes[k])
            for k, comp in self.components.items()
        })
        # jitted; small problems compile with fast options (jaxscale.compilation)
        self.value = Program(self._value, rows=_data_rows)
        self.value_and_grad = Program(jax.value_and_grad(self._value), rows=_data_rows)
        self.rmsd = Program(self._rmsd, rows=_data_rows)
        self.inverse_scale = Program(self._inverse_scale, rows=basis_rows)

    # ------------------------------------------------------------------ helpers
    def _flat(self, tree: Mapping[str, Any]) -> np.ndarray:
        return np.concatenate([np.ravel(np.asarray(tree[k], dtype=np.float64)) for k in self.keys] or [np.zeros(0)])

    def unravel(self, x: Any) -> dict[str, Any]:
        """Parameter pytree of a flat vector (numpy in, numpy out; traced in, traced out)."""
        return {k: x[self.slices[k]].reshape(self.shapes[k]) for k in self.keys}

    def params_of(self, x: np.ndarray | jax.Array) -> dict[str, Any]:
        """Parameter pytree of a flat vector (numpy arrays for host input)."""
        return self.unravel(x if _is_traced(x) else np.asarray(x))

    def flatten(self, params: Mapping[str, Any]) -> np.ndarray:
        """Flat vector of a parameter pytree (same layout as x0)."""
        return self._flat(params)

    def free_mask(self, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        """bool[n_params] free mask from a pytree of per-parameter 'fixed' booleans (or None)."""
        if fixed is None:
            return np.ones(self.n_params, dtype=bool)
        fixed_full = {k: np.broadcast_to(np.asarray(fixed.get(k, False), dtype=np.float64), self.shapes[k])
                      for k in self.keys}
        return ~(self._flat(fixed_full) > 0.5)

    def data(self, problem: ScalingProblem, bases: Any, anchor: np.ndarray | None = None, free: np.ndarray | None = None) -> TargetData:
        """TargetData with defaults: anchor = x0, all parameters free."""
        anchor = self.x0 if anchor is None else anchor
        free = np.ones(self.n_params, dtype=bool) if free is None else free
        return TargetData(problem=problem, bases=bases, anchor=_to_device(anchor, np.float64),
                          free=_to_device(free, bool))

    def effective(self, x: jax.Array, data: TargetData) -> jax.Array:
        """x with fixed parameters replaced by their anchor values (numpy outside a trace)."""
        if _is_traced(x, data.free, data.anchor):
            return jnp.where(data.free, x, data.anchor)
        return np.where(np.asarray(data.free), np.asarray(x), np.asarray(data.anchor))

    def _inverse_scale(self, x: jax.Array, bases: Any) -> jax.Array:
        return inverse_scale(self.components, self.unravel(x), bases)

    def _host_twins(self) -> dict[str, Any] | None:
        """numpy twin of every component's apply, or None if one has none."""
        from jaxscale.models.linear import host_apply

        twins = {k: host_apply(comp.apply) for k, comp in self.components.items()}
        return twins if twins and all(f is not None for f in twins.values()) else None

    def has_host_inverse_scale(self) -> bool:
        """True when `inverse_scale_host` can evaluate g in numpy."""
        return self._host_twins() is not None

    def inverse_scale_host(self, x: np.ndarray, bases: Any) -> np.ndarray | None:
        """g over the rows of `bases` in numpy (f[n_obs]), the product of the components'
        numpy twins (`models.linear.host_apply`) in the order of `inverse_scale`; None
        when a component has no twin. Small jobs use it instead of compiling a program."""
        twins = self._host_twins()
        if twins is None:
            return None
        params = self.unravel(np.asarray(x, dtype=np.float64))
        g = None
        for k, twin in twins.items():  # loop over model components (few)
            f = twin(params[k], {name: np.asarray(v) for name, v in bases[k].items()})
            g = f if g is None else g * f
        return np.asarray(g, dtype=np.float64)

    def _restraint(self, x_eff: jax.Array) -> jax.Array:
        return jnp.sum(self.restraint_weights * x_eff**2)

    # ---------------------------------------------------------------- objective
    def _value(self, x: jax.Array, data: TargetData) -> jax.Array:
        """f = sum loss(w r^2) + sum w_p p^2."""
        x_eff = self.effective(x, data)
        g = self._inverse_scale(x_eff, data.bases)
        r = residuals(data.problem, g)
        return jnp.sum(self.loss(data.problem.weight * r * r)) + self._restraint(x_eff)

    def _rmsd(self, x: jax.Array, data: TargetData) -> jax.Array:
        """RMSD_I = sqrt(f / n_refl) (DIALS' convergence and log quantity)."""
        return jnp.sqrt(self._value(x, data) / n_reflections(data.problem))

    def chunk_residuals(self, x: jax.Array, chunk: "ChunkData") -> jax.Array:
        """sqrt(w) r for one chunk of whole groups (f[chunk_size]); I_h from the chunk alone."""
        g = self._inverse_scale(self.effective(x, chunk.target), chunk.target.bases)
        p = chunk.target.problem
        if p.ih_reference is not None:
            ih_obs = take(p.ih_reference, p.group_id)
        else:
            ih_obs = take(group_mean(p, g), p.group_id)
        return jnp.sqrt(p.weight) * (p.intensity - g * ih_obs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkData:
    """One chunk layout: leaves have a leading n_chunks axis (stacked TargetData)."""

    target: TargetData


def chunk_by_groups(
    problem: ScalingProblem,
    bases: Any,
    anchor: np.ndarray,
    free: np.ndarray,
    chunk_size: int = 4096,
) -> ChunkData:
    """Split observations into chunks of whole groups, padded to a common size.

    Each chunk holds complete symmetry groups so that I_h and its derivative are local to
    the chunk; groups are renumbered 0..chunk_size-1 inside each chunk and padding rows
    (weight 0) go to the extra group `chunk_size`; zero-weight rows of `problem` are left
    out. If targeted, ih_reference becomes per observation (group index = row). Used to
    accumulate J^T W J without holding J.
    """
    gid = np.asarray(problem.group_id)
    # zero-weight rows (padding) add nothing to I_h, r or J: leave them out
    live = np.flatnonzero(np.asarray(problem.weight) > 0)
    order = live[np.argsort(gid[live], kind="stable")]
    n = order.size
    gs = gid[order]
    # group start offsets within the sorted order
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]]) if n else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, n])
    size = int(max(chunk_size, sizes.max() if sizes.size else 1))
    # greedy chunk boundaries on group starts: chunk k begins at the last group start
    # not beyond the running offset (few chunks, so this loop is over chunks, not rows)
    bounds = [0]
    while bounds[-1] < n:
        limit = bounds[-1] + size
        if limit >= n:
            bounds.append(n)
            break
        k = np.searchsorted(starts, limit, side="right") - 1
        nxt = int(starts[k])
        bounds.append(nxt if nxt > bounds[-1] else int(starts[min(k + 1, starts.size - 1)]))
    n_chunks = max(len(bounds) - 1, 1)
    rows = np.zeros((n_chunks, size), dtype=np.int64)
    valid = np.zeros((n_chunks, size), dtype=bool)
    local = np.full((n_chunks, size), size, dtype=np.int32)
    for c in range(len(bounds) - 1):  # loop over chunks (few), vectorised within
        sel = order[bounds[c] : bounds[c + 1]]
        m = sel.size
        rows[c, :m] = sel
        valid[c, :m] = True
        g_sorted = gs[bounds[c] : bounds[c + 1]]
        local[c, :m] = np.cumsum(np.r_[0, (g_sorted[1:] != g_sorted[:-1]).astype(np.int32)])
    take = lambda a: jax.device_put(np.asarray(a)[rows])  # noqa: E731
    weight = np.where(valid, np.asarray(problem.weight)[rows], 0.0)
    ih_ref = None
    if problem.ih_reference is not None:
        ih_ref = np.where(valid, np.asarray(problem.ih_reference)[gid[rows]], 0.0)
        local = np.broadcast_to(np.arange(size, dtype=np.int32), (n_chunks, size)).copy()
    chunk_problem = ScalingProblem(
        intensity=jax.device_put(np.where(valid, np.asarray(problem.intensity)[rows], 0.0)),
        weight=jax.device_put(weight),
        group_id=jax.device_put(local),
        n_groups=size + 1,
        ih_reference=None if ih_ref is None else jax.device_put(ih_ref),
    )
    chunk_bases = jax.tree.map(take, bases)
    target = TargetData(
        problem=chunk_problem,
        bases=chunk_bases,
        anchor=jax.device_put(np.broadcast_to(np.asarray(anchor, dtype=np.float64), (n_chunks, anchor.size)).copy()),
        free=jax.device_put(np.broadcast_to(np.asarray(free, dtype=bool), (n_chunks, free.size)).copy()),
    )
    return ChunkData(target=target)

