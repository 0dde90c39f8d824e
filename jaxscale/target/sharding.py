"""The KB still-shot objective over flat observation arrays, optionally sharded over devices.

For 10^4–10^6 stills each still e has its own KB model, g_i = k_e exp(B_e / (2 d_i^2)); the
parameters are one array x f[n_experiments, 2] (column 0 = k, column 1 = B). The profiled
target is DIALS' `f = sum_i w_i (I_i - g_i I_h)^2` with the closed-form
`I_h = sum_h(w g I) / sum_h(w g^2)` (target.md §2–3).

Row layout (`still_layout`): rows are ordered by still and each still's rows are padded with
zero-weight rows to whole chunks of `chunk` (8) rows, so a chunk belongs to one still. k_e, B_e
are then gathered once per chunk, and the per-still sums are a reduce over each chunk
followed by a sorted scatter over chunks (8x fewer updates). The group sums are one scatter
of (w g I, w g^2) rows (groups are spread over stills).

Evaluation (`_local_value_and_grad`): two passes over the rows, group sums (one complex
scatter-add per row on CPU: real w g I, imaginary w g^2; two independent runs of blocks whose
scatters can run concurrently) then value and gradient (the three per-chunk sums in one
variadic reduce), each a `fori_loop` over blocks of `block_chunks` chunks on CPU. Written as
whole-array operations, XLA materialises ~10 n-row temporaries (exp, scatter updates,
residuals); on CPU each call then gets them as fresh memory from the allocator and the kernel
faults it in page by page, which cost more than the arithmetic (10^4 page faults per
evaluation of 10^6 rows, 1.4x10^5 at 10^7). In blocks, the temporaries are ~1 MB, reused and
cache-resident (docs/serial.md).

Observations are split across the devices of a 1-D mesh (axis "obs") with `jax.sharding`:
whole chunks go to each device (their number padded with empty chunks to a multiple of the
device count), placed with `NamedSharding(mesh, P("obs"))`. Inside `jax.shard_map` each device forms its partial group
sums (w g I, w g^2) and partial per-still gradient sums; `psum` reduces them, so the only
communication is 2 n_groups + 2 n_experiments + 1 numbers per evaluation. With no
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

from jaxscale.compilation import Program
from jaxscale.target import native_kb

AXIS = "obs"
# Largest problem (observation rows, padding included) whose programs compile with the fast
# options (compilation.FAST_COMPILE_OPTIONS): at 10^4 rows the objective compiles in 0.09
# instead of 0.37 s (the L-BFGS step built on it: 0.27 instead of 1.4 s) and evaluates in 0.6
# instead of 0.15 ms. A whole job at 10^5 rows: ~2 s less CPU cold, ~0.1-0.2 s more with a
# warm compilation cache; at 10^6 the slower evaluations (64 vs 15 ms) would dominate.
FAST_COMPILE_MAX_ROWS = 1 << 17
# Chunks (of 8 rows) per block of the evaluation loop on CPU: 65,536 rows, temporaries of
# 0.5 MB (float64) each, in L2/L3. Fewer, larger blocks mean fewer kernel launches (each
# handed between XLA's threads): 2,048 chunks took 1.2-1.4x the wall and CPU time of
# 8,192-32,768 chunks in float64 (10^6 and 10^7 rows; equal in float32; scripts/bench_eval.py
# current@N); above 16,384 the temporaries start to be page-faulted per call.
CPU_BLOCK_CHUNKS = 8192
# Independent runs of blocks ("streams") in the group-sum loop on CPU: each iteration adds one
# block of each run into that run's own sums, so XLA CPU's thunk executor can run the runs'
# scatters at the same time (the other kernels are already split over threads). 2 streams,
# wall with a free core (fastest calls): 0.87-1.0x of one stream at 10^6 rows, 0.83-0.98x at
# 10^7, float32 0.92-0.94x; on one core within +-5 %; ~0.1 s more compilation per program
# holding the evaluation. The value-and-gradient loop in 2 streams cost 6-9 % more on one
# core at 10^6 and is not streamed (docs/serial.md; scripts/bench_eval.py session3, streams2).
CPU_GROUP_SUM_STREAMS = 2


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
    if mesh is None:  # a copy to the device (jnp.asarray compiles a conversion program per shape and dtype)
        return jax.device_put(a)
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
    only the weights change) and place them on the mesh; padding rows have weight 0.

    Group and still ids must lie in [0, n_groups) and [0, n_experiments): the evaluation
    (the native kernel and XLA's gathers and scatters alike) indexes with them unchecked."""
    for name, ids, bound in (("group_id", group_id, n_groups), ("experiment_id", experiment_id, n_experiments)):
        ids = np.asarray(ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= int(bound)):
            raise ValueError(f"{name} outside [0, {int(bound)}): {int(ids.min())}..{int(ids.max())}")
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


def _take(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[index] along axis 0 (index of any shape) for indices known to be in range (no
    negative-index fix-up, which XLA would otherwise materialise as an extra index array)."""
    dnums = jax.lax.GatherDimensionNumbers(offset_dims=tuple(range(index.ndim, index.ndim + table.ndim - 1)),
                                           collapsed_slice_dims=(0,), start_index_map=(0,))
    return jax.lax.gather(table, index[..., None], dnums, (1, *table.shape[1:]),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _scatter_add(target: jax.Array, index: jax.Array, updates: jax.Array, sorted_index: bool = False) -> jax.Array:
    """target.at[index].add(updates) along axis 0 for in-range indices (see `_take`)."""
    dnums = jax.lax.ScatterDimensionNumbers(update_window_dims=tuple(range(1, target.ndim)),
                                            inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,))
    return jax.lax.scatter_add(target, index[:, None], updates, dnums, indices_are_sorted=sorted_index,
                               mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _block(obs: StillObservations, first_chunk, n_chunks: int) -> StillObservations:
    """The chunks first_chunk .. first_chunk + n_chunks - 1 (first_chunk may be traced)."""
    rows = lambda a: jax.lax.dynamic_slice_in_dim(a, first_chunk * obs.chunk, n_chunks * obs.chunk)  # noqa: E731
    return dataclasses.replace(
        obs, intensity=rows(obs.intensity), weight=rows(obs.weight), inv_two_d_sq=rows(obs.inv_two_d_sq),
        group_id=rows(obs.group_id),
        chunk_experiment=jax.lax.dynamic_slice_in_dim(obs.chunk_experiment, first_chunk, n_chunks),
    )


def _fold_blocks(step, carry, obs: StillObservations, block_chunks: int | None, n_streams: int = 1):
    """carry = step(carry, block) over consecutive blocks of `block_chunks` chunks (a loop),
    then over the remaining chunks; one step over everything when block_chunks is None.

    n_streams > 1 (carry: sums, starting at zero) and at least n_streams full blocks: the full
    blocks are cut into n_streams runs of consecutive blocks, each summed into its own copy of
    the carry, one block of every run per loop iteration (independent steps, which XLA CPU may
    run concurrently); the full blocks left over and the tail are one last step (< n_streams
    blocks) into the last copy; the copies are added at the end."""
    n_chunks = obs.chunk_experiment.shape[0]
    if block_chunks is None or block_chunks >= n_chunks:
        return step(carry, obs)
    n_full, tail = divmod(n_chunks, block_chunks)
    per_stream = n_full // n_streams
    if per_stream == 0 or n_streams == 1:  # one run (fewer full blocks than streams: no concurrency to gain)
        carry = jax.lax.fori_loop(0, n_full, lambda i, c: step(c, _block(obs, i * block_chunks, block_chunks)), carry)
        return step(carry, _block(obs, n_full * block_chunks, tail)) if tail else carry

    def body(i, carries):
        return tuple(step(c, _block(obs, (i + j * per_stream) * block_chunks, block_chunks))
                     for j, c in enumerate(carries))

    carries = list(jax.lax.fori_loop(0, per_stream, body, (carry,) * n_streams))
    first_left = per_stream * n_streams * block_chunks
    if first_left < n_chunks:  # leftover full blocks and tail as one step: one copy of the step less to compile
        carries[-1] = step(carries[-1], _block(obs, first_left, n_chunks - first_left))
    return jax.tree.map(lambda *parts: sum(parts[1:], parts[0]), *carries)


def _block_decay(x: jax.Array, blk: StillObservations) -> jax.Array:
    """exp(B s) f[n_chunks, chunk] of a block (B gathered per chunk as its own vector: sliced
    out of a gathered [n_chunks, 2] array, the loops on XLA CPU read it strided, measured
    1.5x slower)."""
    return jnp.exp(_take(x[:, 1], blk.chunk_experiment)[:, None] * blk.inv_two_d_sq.reshape(-1, blk.chunk))


def _group_sums_step(x: jax.Array):
    """Block step adding (sum w g I, sum w g^2) of the block to f[n_groups, 2]: one scatter of
    both columns, cheaper than two scatters. The (n, 2) updates are built by a select; built
    by stack/concatenate they cost ~5x more on XLA CPU (scripts/bench_eval.py)."""
    def step(sums, blk):
        g = (_take(x[:, 0], blk.chunk_experiment)[:, None] * _block_decay(x, blk)).reshape(-1)
        wg = blk.weight * g
        updates = wg[:, None] * jnp.where(jnp.arange(2) == 0, blk.intensity[:, None], g[:, None])
        return _scatter_add(sums, blk.group_id, updates)
    return step


def _complex_group_sums_step(x: jax.Array):
    """As `_group_sums_step`, the pair held as one complex number per group (real: w g I,
    imaginary: w g^2; complex addition adds them exactly as two reals): a scatter of one
    element per row, whose updates (built in the [n_chunks, chunk] shape of the decay) XLA
    CPU writes faster than (n, 2) rows: the whole evaluation ~12 % faster at 10^6 rows
    (scripts/bench_eval.py: real_pair_group_sums). CPU loop only: complex scatter-adds on
    accelerators (atomics) were not measured."""
    def step(sums, blk):
        c = blk.chunk
        g = _take(x[:, 0], blk.chunk_experiment)[:, None] * _block_decay(x, blk)  # f[n_chunks, chunk]
        wg = blk.weight.reshape(-1, c) * g
        return _scatter_add(sums, blk.group_id, jax.lax.complex(wg * blk.intensity.reshape(-1, c), wg * g).reshape(-1))
    return step


def _fold_group_sums(x: jax.Array, obs: StillObservations, block_chunks: int | None,
                     n_streams: int = CPU_GROUP_SUM_STREAMS) -> jax.Array:
    """Local f[n_groups, 2] (sum w g I, sum w g^2): a loop over blocks with complex sums on CPU
    (block_chunks set; in `n_streams` independent runs of blocks, see `_fold_blocks`), one
    (n, 2) scatter otherwise."""
    if block_chunks is None or block_chunks >= obs.chunk_experiment.shape[0]:
        return _group_sums_step(x)(jnp.zeros((obs.n_groups, 2), x.dtype), obs)
    cdtype = jnp.result_type(x.dtype, jnp.complex64)
    sums = _fold_blocks(_complex_group_sums_step(x), jnp.zeros(obs.n_groups, cdtype), obs, block_chunks, n_streams)
    return jnp.stack([sums.real, sums.imag], axis=1)


def _value_and_grad_step(x: jax.Array, ih: jax.Array, carry: tuple, blk: StillObservations) -> tuple:
    """carry (sum w r^2, per-still gradient sums) plus the block's: the three per-chunk sums in
    one variadic reduce (one pass over the block); the value summed over the block, the two
    gradient sums (df/dk, df/dB) scattered (sorted) to their stills, as f[n_exp, 2] rows or,
    when the carry holds complex numbers (the CPU loop), as one complex number per still
    (real df/dk, imaginary df/dB; 0-13 % of the evaluation, scripts/bench_eval.py:
    real_pair_gradient). Scattering the value too, as a third column summed at the end, cost
    ~15 % (bench_eval.py: value_per_still). Everything is shaped [n_chunks, chunk], I_h
    gathered straight into that shape (flat and reshaped measured the same or ~2 % slower:
    bench_eval.py gather_flat)."""
    value, grad = carry
    decay = _block_decay(x, blk)
    g = _take(x[:, 0], blk.chunk_experiment)[:, None] * decay
    shape = g.shape
    s = blk.inv_two_d_sq.reshape(shape)
    ih_obs = _take(ih, blk.group_id.reshape(shape))
    r = blk.intensity.reshape(shape) - g * ih_obs
    wr = blk.weight.reshape(shape) * r
    df_dg = -2.0 * wr * ih_obs  # the dI_h/dp term is zero at the closed-form I_h
    zero = jnp.zeros((), g.dtype)
    wr2, df_dk, df_db = jax.lax.reduce((wr * r, df_dg * decay, df_dg * g * s), (zero,) * 3,
                                       lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
    per_chunk = (jax.lax.complex(df_dk, df_db) if jnp.iscomplexobj(grad)
                 else jnp.stack([df_dk, df_db], axis=1))
    return value + jnp.sum(wr2), _scatter_add(grad, blk.chunk_experiment, per_chunk, sorted_index=True)


def _fold_value_and_grad(x: jax.Array, ih: jax.Array, obs: StillObservations, block_chunks: int | None):
    """(sum w r^2, f[n_exp, 2] (df/dk, df/dB)) over the local rows, in blocks as `_fold_blocks`
    (gradient sums complex in the CPU loop, see `_value_and_grad_step`). Each block computes
    its own exp inside the step (fused into the chunk reduce); computing the next block's exp
    into the loop carry instead (session 2) was 0-30 % slower (bench_eval.py: exp_carried)."""
    step = lambda c, blk: _value_and_grad_step(x, ih, c, blk)  # noqa: E731
    value = jnp.zeros((), x.dtype)
    if block_chunks is None or block_chunks >= obs.chunk_experiment.shape[0]:
        return _fold_blocks(step, (value, jnp.zeros((obs.n_experiments, 2), x.dtype)), obs, block_chunks)
    cdtype = jnp.result_type(x.dtype, jnp.complex64)
    value, grad = _fold_blocks(step, (value, jnp.zeros(obs.n_experiments, cdtype)), obs, block_chunks)
    return value, jnp.stack([grad.real, grad.imag], axis=1)


def _local_value_and_grad(x: jax.Array, obs: StillObservations, axis: str | None, block_chunks: int | None = None,
                          group_sum_streams: int = CPU_GROUP_SUM_STREAMS, native: bool = False,
                          native_threads: int = 1):
    """(f, df/dx f[n_exp, 2], I_h f[n_groups]) with f = sum w r^2 over all devices.

    Two passes over the local rows, each a loop over blocks of `block_chunks` chunks (None:
    one block): group sums (in `group_sum_streams` independent runs of blocks), then value
    and gradient. On CPU, blocks keep every temporary (exp, the scatter updates) in cache;
    whole-array temporaries would be fresh memory on each call, faulted in page by page
    (docs/serial.md). native: both passes as the native CPU kernel instead (`native_kb`, in
    `native_threads` threads; one custom call on one device, else one per pass with the psum
    between them as here; see `KBStillsTarget`)."""
    if native and axis is None:
        return native_kb.evaluate(x, obs, native_threads)
    local_sums = (native_kb.group_sums(x, obs, native_threads) if native
                  else _fold_group_sums(x, obs, block_chunks, group_sum_streams))
    sums = _psum(local_sums, axis)
    ih = _safe_divide(sums[:, 0], sums[:, 1])
    value, grad = (native_kb.value_and_grad(x, ih, obs, native_threads) if native
                   else _fold_value_and_grad(x, ih, obs, block_chunks))
    return _psum(value, axis), _psum(grad, axis), ih


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
def observation_rows(x: jax.Array, obs: StillObservations, *rest) -> int:
    """Observation rows (padding included, all devices) of a call f(x, obs, ...): the size that
    chooses a program's compile options."""
    return int(obs.intensity.shape[0])


def _obs_specs(obs: StillObservations):
    return jax.tree.map(lambda _: P(AXIS), obs)


class KBStillsTarget:
    """Jitted objective, gradient, residuals and block diagonal of the per-still KB target.

    `mesh=None` runs on one device; otherwise every function is a `shard_map` over the
    mesh's "obs" axis (observations must come from `make_observations(..., mesh=mesh)`).
    `free` (bool[n_exp, 2]) and `anchor` hold fixed parameters: x_eff = where(free, x, anchor).
    `block_chunks`: chunks of rows per block of the evaluation loop (`_local_value_and_grad`);
    "auto" = `CPU_BLOCK_CHUNKS` on CPU, None (one block: no loop) on accelerators, where a
    loop of small kernels would cost launches and whole-array temporaries cost nothing.

    One instance per configuration (mesh, block_chunks) and process: constructing it again
    returns the same object, so its programs (and programs built on its methods, such as the
    L-BFGS step and the structured solver) are traced and compiled once per process, not once
    per scaling job. Programs over at most `FAST_COMPILE_MAX_ROWS` rows compile with the fast
    options.
    """

    _instances: dict[tuple, "KBStillsTarget"] = {}

    def __new__(cls, mesh: Mesh | None = None, block_chunks: int | None | str = "auto"):
        if block_chunks == "auto":
            device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
            block_chunks = CPU_BLOCK_CHUNKS if device.platform == "cpu" else None
        key = (cls, mesh, block_chunks)
        target = cls._instances.get(key)
        if target is None:
            target = cls._instances[key] = super().__new__(cls)
            target._configure(mesh, block_chunks)
        return target

    def __init__(self, mesh: Mesh | None = None, block_chunks: int | None | str = "auto"):
        pass  # configured once, in __new__

    def _configure(self, mesh: Mesh | None, block_chunks: int | None) -> None:
        self.mesh = mesh
        self.block_chunks = block_chunks
        device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
        self.on_cpu = device.platform == "cpu"
        program = partial(Program, rows=observation_rows, max_fast_rows=FAST_COMPILE_MAX_ROWS)
        self.value_and_grad = program(self._value_and_grad)
        self.value = program(self._value)
        self.group_mean = program(self._group_mean)
        self.inverse_scale = program(self._inverse_scale)
        self.residuals = program(self.residual_fn)
        self.block_diagonal = program(self.block_diagonal_fn)

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
        native = self.uses_native_kernel(x.dtype)
        threads = native_kb.threads_for(1 if self.mesh is None else self.mesh.devices.size)
        return self._wrap(partial(_local_value_and_grad, block_chunks=self.block_chunks, native=native,
                                  native_threads=threads), (P(), P(), P()))(x, obs)

    def uses_native_kernel(self, dtype) -> bool:
        """Whether the evaluation runs as the native CPU kernel (`native_kb`, docs/serial.md):
        on CPU devices, float64 or float32, when the kernel builds and JAXSCALE_NATIVE_KERNEL
        is not "0" (decided when a program is traced); XLA's loops otherwise."""
        return self.on_cpu and native_kb.available(dtype)

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
