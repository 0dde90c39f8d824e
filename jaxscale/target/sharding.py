"""The KB still-shot objective over flat observation arrays, optionally sharded over devices.

For 10^4–10^6 stills each still e has its own KB model, g_i = k_e exp(B_e / (2 d_i^2)); the
parameters are one array x f[n_experiments, 2] (column 0 = k, column 1 = B). The profiled
target is DIALS' `f = sum_i w_i (I_i - g_i I_h)^2` with the closed-form
`I_h = sum_h(w g I) / sum_h(w g^2)` (target.md §2–3).

Row layout (`still_layout`): rows are ordered by still and each still's rows are padded with
zero-weight rows to whole chunks of `chunk` (8) rows, so a chunk belongs to one still. k_e, B_e
are then gathered once per chunk, and the per-still sums are a reshape-sum over each chunk
(streaming) followed by a segment sum over chunks (8x fewer updates, sorted). XLA's CPU
scatter-add in float64 is the slow part of an evaluation; this halves the evaluation time
(docs/serial.md). The group sums stay one scatter per quantity (groups are spread over stills).

Observations are split across the devices of a 1-D mesh (axis "obs") with `jax.sharding`:
whole chunks go to each device (their number padded with empty chunks to a multiple of the
device count), placed with `NamedSharding(mesh, P("obs"))`. Inside `jax.shard_map` each device forms its partial group
sums (w g I, w g^2) and partial per-still gradient sums; `psum` reduces them, so the only
communication is two vectors of length 2 n_groups and 2 n_experiments per evaluation. With no
mesh the same local function runs without collectives (one device, same arithmetic).

The gradient is written in closed form (the per-still sums above; the I_h term of the
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

    intensity: jax.Array  # f[n_rows] unscaled intensity I (n_rows = n_chunks * chunk)
    weight: jax.Array  # f[n_rows] 1/V' (0 = padding or excluded)
    inv_two_d_sq: jax.Array  # f[n_rows] 1/(2 d^2), the KB decay basis
    group_id: jax.Array  # i32[n_rows] symmetry group 0..n_groups-1
    chunk_experiment: jax.Array  # i32[n_chunks] still 0..n_experiments-1 of each chunk of rows
    n_groups: int = dataclasses.field(metadata=dict(static=True))
    n_experiments: int = dataclasses.field(metadata=dict(static=True))
    chunk: int = dataclasses.field(default=8, metadata=dict(static=True))

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


@dataclasses.dataclass(frozen=True)
class StillLayout:
    """Where each input row goes: rows by still, each still padded to whole chunks."""

    slot_row: np.ndarray  # i64[n_rows] input row in each slot (-1 = padding)
    row_slot: np.ndarray  # i64[n_obs] slot of each input row
    chunk_experiment: np.ndarray  # i32[n_chunks] still of each chunk
    chunk: int

    @property
    def n_rows(self) -> int:
        return int(self.slot_row.size)


def still_layout(experiment_id: np.ndarray, n_experiments: int, mesh: Mesh | None = None,
                 chunk: int = 8) -> StillLayout:
    """Rows sorted by still (stable), each still padded to a multiple of `chunk` rows; the
    number of chunks padded (empty chunks of still 0) to a multiple of the device count."""
    e = np.asarray(experiment_id).astype(np.int64, copy=False)
    n = e.size
    order = np.argsort(e, kind="stable")
    counts = np.bincount(e, minlength=n_experiments)
    n_chunks_e = -(-counts // chunk)  # i[n_experiments]
    m = 1 if mesh is None else mesh.devices.size
    n_chunks = max(m, -(-int(n_chunks_e.sum()) // m) * m)
    first_slot = np.r_[0, np.cumsum(n_chunks_e * chunk)[:-1]]
    first_row = np.r_[0, np.cumsum(counts)[:-1]]
    e_sorted = e[order]
    row_slot = np.empty(n, dtype=np.int64)
    row_slot[order] = first_slot[e_sorted] + (np.arange(n) - first_row[e_sorted])
    slot_row = np.full(n_chunks * chunk, -1, dtype=np.int64)
    slot_row[row_slot] = np.arange(n)
    chunk_experiment = np.zeros(n_chunks, dtype=np.int32)
    chunk_experiment[: int(n_chunks_e.sum())] = np.repeat(np.arange(n_experiments, dtype=np.int32), n_chunks_e)
    return StillLayout(slot_row=slot_row, row_slot=row_slot, chunk_experiment=chunk_experiment, chunk=chunk)


def padded_length(n_obs: int, mesh: Mesh | None) -> int:
    """Smallest multiple of the device count >= n_obs (at least one row per device)."""
    m = 1 if mesh is None else mesh.devices.size
    return max(m, -(-n_obs // m) * m)


def place_rows(a: np.ndarray, mesh: Mesh | None, dtype=None) -> jax.Array:
    """Put a row-array (already laid out) on the devices: sharded along rows over the mesh."""
    a = np.asarray(a, dtype=dtype)
    if mesh is None:
        return jnp.asarray(a)
    return jax.device_put(a, NamedSharding(mesh, P(AXIS)))


def to_slots(a: np.ndarray, layout: StillLayout, fill: float | int = 0) -> np.ndarray:
    """Per-row values (n_obs,) in the layout's slots (n_rows,), `fill` in padding slots."""
    a = np.asarray(a)
    out = np.full(layout.n_rows, fill, dtype=a.dtype)
    out[layout.row_slot] = a
    return out


def from_slots(a: np.ndarray, layout: StillLayout) -> np.ndarray:
    """Per-slot values (n_rows,) back to the input row order (n_obs,)."""
    return np.asarray(a)[layout.row_slot]


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
    layout: StillLayout | None = None,
) -> StillObservations:
    """Lay the rows out by still in chunks (`still_layout`, or the one given: reuse it when
    only the weights change) and place them on the mesh; padding rows have weight 0."""
    if layout is None:
        layout = still_layout(experiment_id, n_experiments, mesh)
    f = lambda a: place_rows(to_slots(np.asarray(a, dtype=np.float64), layout), mesh, dtype)  # noqa: E731
    d = np.asarray(d, dtype=np.float64)
    return StillObservations(
        intensity=f(intensity),
        weight=f(weight),
        inv_two_d_sq=f(1.0 / (2.0 * d * d)),
        group_id=place_rows(to_slots(np.asarray(group_id, dtype=np.int32), layout), mesh, np.int32),
        chunk_experiment=place_rows(layout.chunk_experiment, mesh, np.int32),
        n_groups=int(n_groups),
        n_experiments=int(n_experiments),
        chunk=layout.chunk,
    )


# ------------------------------------------------------------------ local (per-device) pieces
def _psum(a: jax.Array, axis: str | None) -> jax.Array:
    return a if axis is None else jax.lax.psum(a, axis)


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _scales(x: jax.Array, obs: StillObservations) -> tuple[jax.Array, jax.Array]:
    """(g, exp(B s)) per row: g = k_e exp(B_e s), s = 1/(2 d^2); k, B gathered per chunk."""
    kb = x[obs.chunk_experiment]  # f[n_chunks, 2]
    decay = jnp.exp(kb[:, 1:2] * obs.inv_two_d_sq.reshape(-1, obs.chunk))  # f[n_chunks, chunk]
    return (kb[:, 0:1] * decay).reshape(-1), decay.reshape(-1)


def _per_still(obs: StillObservations, *per_row: jax.Array) -> jax.Array:
    """Local per-still sums f[n_experiments, len(per_row)] of per-row values (each f[n_rows]):
    a sum over each chunk, then a (sorted) segment sum over chunks, one quantity at a time
    (stacking first makes XLA CPU slower)."""
    sums = [
        jax.ops.segment_sum(v.reshape(-1, obs.chunk).sum(axis=1), obs.chunk_experiment,
                            num_segments=obs.n_experiments, indices_are_sorted=True)
        for v in per_row  # 2 or 3 quantities
    ]
    return jnp.stack(sums, axis=1)


def _group_sums(g: jax.Array, obs: StillObservations, axis: str | None) -> jax.Array:
    """f[n_groups, 2]: (sum w g I, sum w g^2) over all devices (one scatter per quantity)."""
    wg = obs.weight * g
    s1 = jax.ops.segment_sum(wg * obs.intensity, obs.group_id, num_segments=obs.n_groups)
    s2 = jax.ops.segment_sum(wg * g, obs.group_id, num_segments=obs.n_groups)
    return _psum(jnp.stack([s1, s2], axis=1), axis)


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
    grad = _psum(_per_still(obs, df_dg * decay, df_dg * g * obs.inv_two_d_sq), axis)
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
    blocks = _psum(_per_still(obs, q * dk * dk, q * dk * db, q * db * db), axis)
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
