"""The KB still-shot objective over flat observation arrays, optionally sharded over devices.

For 10^4–10^6 stills each still e has its own KB model, g_i = k_e exp(B_e / (2 d_i^2)); the
parameters are one array x f[n_experiments, 2] (column 0 = k, column 1 = B). The profiled
target is DIALS' `f = sum_i w_i (I_i - g_i I_h)^2` with the closed-form
`I_h = sum_h(w g I) / sum_h(w g^2)` (target.md §2–3).

Observations are split across the devices of a 1-D mesh (axis "obs") with `jax.sharding`:
rows are padded with zero-weight rows to a multiple of the device count and placed with
`NamedSharding(mesh, P("obs"))`. Inside `jax.shard_map` each device forms its partial group
sums (w g I, w g^2) and partial per-still gradient sums; `psum` reduces them, so the only
communication is two vectors of length 2 n_groups and 2 n_experiments per evaluation. With no
mesh the same local function runs without collectives (one device, same arithmetic).

The gradient is written in closed form (one scatter per index type; the I_h term of the
profiled gradient vanishes exactly at the closed-form I_h, target.md §4) and attached to the
value with `jax.custom_vjp`, so optax line searches differentiate it at the cost of the
forward pass. The residual vector `sqrt(w) r` for Gauss–Newton is plain JAX and is
differentiated by `jax.jvp`/`jax.vjp` (exact, including dI_h/dp).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "obs"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StillObservations:
    """Flat observation arrays (padded rows carry weight 0), sharded along rows or not."""

    intensity: jax.Array  # f[n_rows] unscaled intensity I
    weight: jax.Array  # f[n_rows] 1/V' (0 = padding or excluded)
    inv_two_d_sq: jax.Array  # f[n_rows] 1/(2 d^2), the KB decay basis
    group_id: jax.Array  # i32[n_rows] symmetry group 0..n_groups-1
    experiment_id: jax.Array  # i32[n_rows] still 0..n_experiments-1
    n_groups: int = dataclasses.field(metadata=dict(static=True))
    n_experiments: int = dataclasses.field(metadata=dict(static=True))

    def with_weight(self, weight: jax.Array) -> "StillObservations":
        """Same observations with new weights (same padding/sharding as `weight`)."""
        return dataclasses.replace(self, weight=weight)


def observation_mesh(n_devices: int | None = None) -> Mesh:
    """1-D mesh (axis "obs") over the first n_devices devices (None = all)."""
    devices = jax.devices()
    n = len(devices) if n_devices is None else int(n_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"n_devices={n_devices} but {len(devices)} device(s) available")
    return Mesh(np.asarray(devices[:n]), (AXIS,))


def padded_length(n_obs: int, mesh: Mesh | None) -> int:
    """Smallest multiple of the device count >= n_obs (at least one row per device)."""
    m = 1 if mesh is None else mesh.devices.size
    return max(m, -(-n_obs // m) * m)


def pad_rows(a: np.ndarray, n_rows: int, fill: float | int = 0) -> np.ndarray:
    """a (n, ...) padded with `fill` rows to (n_rows, ...)."""
    a = np.asarray(a)
    if a.shape[0] == n_rows:
        return a
    pad = np.full((n_rows - a.shape[0],) + a.shape[1:], fill, dtype=a.dtype)
    return np.concatenate([a, pad])


def place_rows(a: np.ndarray, mesh: Mesh | None, dtype=None) -> jax.Array:
    """Put a row-array (already padded) on the devices: sharded along rows over the mesh."""
    a = np.asarray(a, dtype=dtype)
    if mesh is None:
        return jnp.asarray(a)
    return jax.device_put(a, NamedSharding(mesh, P(AXIS)))


def make_observations(
    intensity: np.ndarray,
    weight: np.ndarray,
    d: np.ndarray,
    group_id: np.ndarray,
    experiment_id: np.ndarray,
    n_groups: int,
    n_experiments: int,
    mesh: Mesh | None = None,
    dtype=jnp.float64,
) -> StillObservations:
    """Pad to a multiple of the device count (weight-0 rows) and place on the mesh."""
    n = np.asarray(intensity).shape[0]
    n_rows = padded_length(n, mesh)
    f = lambda a, fill=0.0: place_rows(pad_rows(np.asarray(a, dtype=np.float64), n_rows, fill), mesh, dtype)  # noqa: E731
    i = lambda a: place_rows(pad_rows(np.asarray(a, dtype=np.int32), n_rows, 0), mesh, np.int32)  # noqa: E731
    d = np.asarray(d, dtype=np.float64)
    return StillObservations(
        intensity=f(intensity),
        weight=f(weight),
        inv_two_d_sq=f(1.0 / (2.0 * d * d)),
        group_id=i(group_id),
        experiment_id=i(experiment_id),
        n_groups=int(n_groups),
        n_experiments=int(n_experiments),
    )


# ------------------------------------------------------------------ local (per-device) pieces
def _psum(a: jax.Array, axis: str | None) -> jax.Array:
    return a if axis is None else jax.lax.psum(a, axis)


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _scales(x: jax.Array, obs: StillObservations) -> tuple[jax.Array, jax.Array]:
    """(g, exp(B s)) per row: g = k_e exp(B_e s), s = 1/(2 d^2)."""
    kb = x[obs.experiment_id]  # f[n, 2]
    decay = jnp.exp(kb[:, 1] * obs.inv_two_d_sq)
    return kb[:, 0] * decay, decay


def _group_sums(g: jax.Array, obs: StillObservations, axis: str | None) -> jax.Array:
    """f[n_groups, 2]: (sum w g I, sum w g^2) over all devices."""
    wg = obs.weight * g
    local = jax.ops.segment_sum(
        jnp.stack([wg * obs.intensity, wg * g], axis=1), obs.group_id, num_segments=obs.n_groups
    )
    return _psum(local, axis)


def _local_value_and_grad(x: jax.Array, obs: StillObservations, axis: str | None):
    """(f, df/dx f[n_exp, 2], I_h f[n_groups]) with f = sum w r^2 over all devices."""
    g, decay = _scales(x, obs)
    sums = _group_sums(g, obs, axis)
    ih = _safe_divide(sums[:, 0], sums[:, 1])
    ih_obs = ih[obs.group_id]
    r = obs.intensity - g * ih_obs
    wr = obs.weight * r
    value = _psum(jnp.sum(wr * r), axis)
    df_dg = -2.0 * wr * ih_obs  # the dI_h/dp term is zero at the closed-form I_h
    per_row = jnp.stack([df_dg * decay, df_dg * g * obs.inv_two_d_sq], axis=1)
    grad = _psum(
        jax.ops.segment_sum(per_row, obs.experiment_id, num_segments=obs.n_experiments), axis
    )
    return value, grad, ih


def _local_residuals(x: jax.Array, obs: StillObservations, axis: str | None) -> jax.Array:
    """sqrt(w) (I - g I_h) per local row (f[n_local]); I_h from the global group sums."""
    g, _ = _scales(x, obs)
    sums = _group_sums(g, obs, axis)
    ih = _safe_divide(sums[:, 0], sums[:, 1])
    return jnp.sqrt(obs.weight) * (obs.intensity - g * ih[obs.group_id])


def _local_block_diagonal(x: jax.Array, obs: StillObservations, axis: str | None) -> jax.Array:
    """f[n_exp, 2, 2]: the per-still diagonal blocks of J^T J (J of sqrt(w) r, exact
    dI_h/dp included), assuming no still measures the same group twice (else approximate).

    Row i of still e: dr_i/dp_e = -sqrt(w_i) c_i D_i with D_i = dg_i/dp_e and
    c_i = I_h + g_i u_i, u_i = w_i (I_i - 2 g_i I_h) / S_h, S_h = sum_h w g^2; the other rows j
    of group h contribute sqrt(w_j) g_j u_i D_i, summing to (S_h - w_i g_i^2) u_i^2 D_i D_i^T.
    """
    g, decay = _scales(x, obs)
    sums = _group_sums(g, obs, axis)
    s_h = sums[:, 1][obs.group_id]
    ih = _safe_divide(sums[:, 0], sums[:, 1])[obs.group_id]
    w = obs.weight
    u = _safe_divide(w * (obs.intensity - 2.0 * g * ih), s_h)
    c = ih + g * u
    q = w * c * c + jnp.maximum(s_h - w * g * g, 0.0) * u * u  # f[n]
    dk, db = decay, g * obs.inv_two_d_sq
    per_row = jnp.stack([q * dk * dk, q * dk * db, q * db * db], axis=1)
    blocks = _psum(jax.ops.segment_sum(per_row, obs.experiment_id, num_segments=obs.n_experiments), axis)
    return jnp.stack(
        [jnp.stack([blocks[:, 0], blocks[:, 1]], -1), jnp.stack([blocks[:, 1], blocks[:, 2]], -1)], -2
    )


# ------------------------------------------------------------------ the (sharded) target
def _obs_specs(obs: StillObservations):
    return jax.tree.map(lambda _: P(AXIS), obs)


class KBStillsTarget:
    """Jitted objective, gradient, residuals and block diagonal of the per-still KB target.

    `mesh=None` runs on one device; otherwise every function is a `shard_map` over the
    mesh's "obs" axis (observations must come from `make_observations(..., mesh=mesh)`).
    `free` (bool[n_exp, 2]) and `anchor` hold fixed parameters: x_eff = where(free, x, anchor).
    """

    def __init__(self, mesh: Mesh | None = None):
        self.mesh = mesh
        self.value_and_grad = jax.jit(self._value_and_grad)
        self.value = jax.jit(self._value)
        self.group_mean = jax.jit(self._group_mean)
        self.inverse_scale = jax.jit(self._inverse_scale)
        self.residuals = jax.jit(self.residual_fn)
        self.block_diagonal = jax.jit(self.block_diagonal_fn)

    def _wrap(self, fn, out_specs):
        """fn(x, obs, axis) as a function of (x, obs): shard_map over the mesh, or local."""
        if self.mesh is None:
            return lambda x, obs: fn(x, obs, None)

        def call(x, obs):
            mapped = jax.shard_map(
                partial(fn, axis=AXIS), mesh=self.mesh, in_specs=(P(), _obs_specs(obs)), out_specs=out_specs,
                check_vma=False,
            )
            return mapped(x, obs)

        return call

    # raw (unmasked) pieces -------------------------------------------------
    def raw_value_and_grad(self, x: jax.Array, obs: StillObservations):
        """(f, df/dx, I_h) at x (no fixed-parameter handling)."""
        return self._wrap(_local_value_and_grad, (P(), P(), P()))(x, obs)

    def residual_fn(self, x: jax.Array, obs: StillObservations) -> jax.Array:
        """sqrt(w) r f[n_rows] (sharded like the observations); differentiable by jvp/vjp."""
        return self._wrap(_local_residuals, P(AXIS))(x, obs)

    def block_diagonal_fn(self, x: jax.Array, obs: StillObservations) -> jax.Array:
        """f[n_exp, 2, 2] diagonal blocks of J^T J at x."""
        return self._wrap(_local_block_diagonal, P())(x, obs)

    def _group_mean(self, x: jax.Array, obs: StillObservations) -> jax.Array:
        return self.raw_value_and_grad(x, obs)[2]

    def _inverse_scale(self, x: jax.Array, obs: StillObservations) -> jax.Array:
        return self._wrap(lambda x_, o, axis: _scales(x_, o)[0], P(AXIS))(x, obs)

    # objective with fixed parameters and a cheap custom VJP ----------------
    def objective(self, x: jax.Array, obs: StillObservations, free: jax.Array, anchor: jax.Array) -> jax.Array:
        """f(x) = sum w r^2 with fixed entries taken from anchor; differentiable (custom VJP)."""
        return _objective(self, jnp.where(free, x, anchor), obs)

    def _value(self, x, obs, free, anchor):
        return self.objective(x, obs, free, anchor)

    def _value_and_grad(self, x, obs, free, anchor):
        value, grad, _ = self.raw_value_and_grad(jnp.where(free, x, anchor), obs)
        return value, jnp.where(free, grad, 0.0)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _objective(target: KBStillsTarget, x: jax.Array, obs: StillObservations) -> jax.Array:
    return target.raw_value_and_grad(x, obs)[0]


def _objective_fwd(target, x, obs):
    value, grad, _ = target.raw_value_and_grad(x, obs)
    return value, (grad, obs)


def _objective_bwd(target, res, ct):
    grad, obs = res
    zero_obs = jax.tree.map(
        lambda a: jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape, jax.dtypes.float0),
        obs,
    )
    return ct * grad, zero_obs


_objective.defvjp(_objective_fwd, _objective_bwd)


def rmsd(value: float, n_reflections: int) -> float:
    """RMSD_I = sqrt(f / n_refl)."""
    return float(np.sqrt(value / max(n_reflections, 1)))
