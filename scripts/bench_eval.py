#!/usr/bin/env python
"""Time variants of one KB-stills target+gradient evaluation against a numpy streaming pass.

    python scripts/bench_eval.py --sizes 1000000,10000000 [--variants a,b] [--rounds 20] [--json]
    python scripts/bench_eval.py --variants current@2048,current@16384   # block sizes (chunks)
    JAXSCALE_X64=0 python scripts/bench_eval.py ...            # float32 throughout

Data: `simulate_flat_stills` (100 observations per still, 14,000 groups), laid out by
`make_observations` (one device). Every variant is a function (x, obs) -> (value, gradient);
all are checked against the current `KBStillsTarget.value_and_grad` (relative difference
printed). Timing: `rounds` interleaved rounds (each variant once per round, the baseline
too), minimum and median over rounds, CPU seconds per call (`time.process_time`) and minor
page faults per call (fresh temporary buffers are faulted in by the kernel on every call).
The baseline is the one in scripts/bench.py: numpy `sum` of each array the evaluation reads
(I, w, 1/(2d^2), group id, still of each chunk), i.e. one streaming pass over those bytes.

With more than one device (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2) the
variant `sharded` is added: KBStillsTarget over all devices (observations split between them,
each device a thread), the baseline still one numpy thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

os.environ.setdefault("JAXSCALE_CACHE_DIR", "")  # time compiled code, not the cache

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxscale  # noqa: E402,F401
from jaxscale.serial import simulate_flat_stills  # noqa: E402
from jaxscale.target import native_kb, sharding  # noqa: E402

OBS_PER_STILL = 100


# ----------------------------------------------------------------------------- variants
def _chunk_views(obs):
    c = obs.chunk
    return (obs.intensity.reshape(-1, c), obs.weight.reshape(-1, c), obs.inv_two_d_sq.reshape(-1, c))


def session1(x, obs):
    """The session-1 evaluation (kept here for comparison): chunk gather of k, B, exp
    materialised, two scatters, separate chunk reductions (three passes) for value and gradient."""
    c = obs.chunk
    kb = x[obs.chunk_experiment]
    decay = jnp.exp(kb[:, 1:2] * obs.inv_two_d_sq.reshape(-1, c))
    g, decay = (kb[:, 0:1] * decay).reshape(-1), decay.reshape(-1)
    wg = obs.weight * g
    s1 = jax.ops.segment_sum(wg * obs.intensity, obs.group_id, num_segments=obs.n_groups)
    s2 = jax.ops.segment_sum(wg * g, obs.group_id, num_segments=obs.n_groups)
    ih = sharding._safe_divide(s1, s2)
    ih_obs = ih[obs.group_id]
    r = obs.intensity - g * ih_obs
    wr = obs.weight * r
    value = jnp.sum(wr * r)
    df_dg = -2.0 * wr * ih_obs
    grad = jnp.stack([
        jax.ops.segment_sum(v.reshape(-1, c).sum(axis=1), obs.chunk_experiment, num_segments=obs.n_experiments,
                            indices_are_sorted=True)
        for v in (df_dg * decay, df_dg * g * obs.inv_two_d_sq)], axis=1)
    return value, grad


def _second_pass(x, obs, ih, g, decay):
    """Value and gradient from I_h in one fused pass: a variadic reduce over each chunk."""
    intensity, weight, s = _chunk_views(obs)
    ih_obs = ih[obs.group_id].reshape(-1, obs.chunk)
    r = intensity - g * ih_obs
    wr = weight * r
    df_dg = -2.0 * wr * ih_obs
    z = jnp.zeros((), x.dtype)
    a, b, d = jax.lax.reduce((wr * r, df_dg * decay, df_dg * g * s), (z, z, z),
                             lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2]), (1,))
    grad = jax.ops.segment_sum(jnp.stack([b, d], 1), obs.chunk_experiment, num_segments=obs.n_experiments,
                               indices_are_sorted=True)
    return a.sum(), grad


def two_scatters_variadic(x, obs):
    """Two scatters; value and gradient chunk sums in one variadic reduce (exp materialised)."""
    intensity, weight, s = _chunk_views(obs)
    kb = x[obs.chunk_experiment]
    decay = jnp.exp(kb[:, 1:2] * s)
    g = kb[:, 0:1] * decay
    wg = weight * g
    s1 = jax.ops.segment_sum((wg * intensity).reshape(-1), obs.group_id, num_segments=obs.n_groups)
    s2 = jax.ops.segment_sum((wg * g).reshape(-1), obs.group_id, num_segments=obs.n_groups)
    return _second_pass(x, obs, sharding._safe_divide(s1, s2), g, decay)


def stacked_scatter_variadic(x, obs):
    """One scatter of the stacked (w g I, w g^2) rows + the variadic reduce."""
    intensity, weight, s = _chunk_views(obs)
    kb = x[obs.chunk_experiment]
    decay = jnp.exp(kb[:, 1:2] * s)
    g = kb[:, 0:1] * decay
    wg = weight * g
    sums = jax.ops.segment_sum(jnp.stack([wg * intensity, wg * g], -1).reshape(-1, 2), obs.group_id,
                               num_segments=obs.n_groups)
    return _second_pass(x, obs, sharding._safe_divide(sums[:, 0], sums[:, 1]), g, decay)


# --- blocked: both passes as loops over blocks of rows, so the n-row temporaries (exp, the
# scatter updates) are block-sized: they stay in cache and are reused without page faults
def _block_slices(obs, start_chunk, n_chunks):
    c = obs.chunk
    rows = lambda a: jax.lax.dynamic_slice_in_dim(a, start_chunk * c, n_chunks * c)  # noqa: E731
    return dataclasses.replace(obs, intensity=rows(obs.intensity), weight=rows(obs.weight),
                               inv_two_d_sq=rows(obs.inv_two_d_sq), group_id=rows(obs.group_id),
                               chunk_experiment=jax.lax.dynamic_slice_in_dim(obs.chunk_experiment, start_chunk,
                                                                             n_chunks))


def _fold_blocks(step, carry, obs, block_chunks):
    """carry = step(carry, block) over consecutive blocks of `block_chunks` chunks, then the tail."""
    n_chunks = obs.chunk_experiment.shape[0]
    n_full, tail = divmod(n_chunks, block_chunks)
    if n_full:
        carry = jax.lax.fori_loop(0, n_full, lambda i, c: step(c, _block_slices(obs, i * block_chunks, block_chunks)),
                                  carry)
    if tail:
        carry = step(carry, _block_slices(obs, n_full * block_chunks, tail))
    return carry


def _pass1_step(x, carry):
    def step(sums, blk):
        intensity, weight, s = _chunk_views(blk)
        kb = x[blk.chunk_experiment]
        g = kb[:, 0:1] * jnp.exp(kb[:, 1:2] * s)
        wg = weight * g
        s1 = sums[0].at[blk.group_id].add((wg * intensity).reshape(-1))
        s2 = sums[1].at[blk.group_id].add((wg * g).reshape(-1))
        return s1, s2
    return step


def _pass2_step(x, ih):
    def step(acc, blk):
        intensity, weight, s = _chunk_views(blk)
        kb = x[blk.chunk_experiment]
        decay = jnp.exp(kb[:, 1:2] * s)
        g = kb[:, 0:1] * decay
        ih_obs = ih[blk.group_id].reshape(-1, blk.chunk)
        r = intensity - g * ih_obs
        wr = weight * r
        df_dg = -2.0 * wr * ih_obs
        z = jnp.zeros((), x.dtype)
        a, b, d = jax.lax.reduce((wr * r, df_dg * decay, df_dg * g * s), (z, z, z),
                                 lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2]), (1,))
        return acc.at[blk.chunk_experiment].add(jnp.stack([a, b, d], 1), indices_are_sorted=True)
    return step


def blocked(x, obs, block_chunks=None):
    """First blocked version: k, B sliced from a gathered [n_chunks, 2], two scatters."""
    block_chunks = block_chunks or _bc()
    z = jnp.zeros(obs.n_groups, x.dtype)
    s1, s2 = _fold_blocks(_pass1_step(x, None), (z, z), obs, block_chunks)
    ih = sharding._safe_divide(s1, s2)
    acc = _fold_blocks(_pass2_step(x, ih), jnp.zeros((obs.n_experiments, 3), x.dtype), obs, block_chunks)
    return acc[:, 0].sum(), acc[:, 1:]


# --- blocks of rows stored transposed, (chunk, block_chunks) each (a different row layout:
# k, B broadcast along the major axis, the chunk sums reduce the major axis); measured faster
# than the chunk-major layout in float64, slower in float32
def transpose_blocks(obs, block_chunks):
    """Reorder rows so that each block of `block_chunks` chunks (and the tail) is (chunk, n) row-major."""
    n_chunks = obs.chunk_experiment.shape[0]
    c = obs.chunk
    idx = np.arange(n_chunks * c).reshape(n_chunks, c)
    parts = [idx[b:b + block_chunks].T.reshape(-1) for b in range(0, n_chunks, block_chunks)]
    perm = jnp.asarray(np.concatenate(parts))
    t = lambda a: a[perm]  # noqa: E731
    return dataclasses.replace(obs, intensity=t(obs.intensity), weight=t(obs.weight),
                               inv_two_d_sq=t(obs.inv_two_d_sq), group_id=t(obs.group_id))


def _tb_views(blk):
    c = blk.chunk
    return (blk.intensity.reshape(c, -1), blk.weight.reshape(c, -1), blk.inv_two_d_sq.reshape(c, -1))


# --- blocked variants with k and B gathered as separate contiguous vectors
def _kb_rows(x, blk, transposed):
    k = x[:, 0][blk.chunk_experiment]
    b = x[:, 1][blk.chunk_experiment]
    return (k[None, :], b[None, :]) if transposed else (k[:, None], b[:, None])


def _p1_complex_step(x, transposed):
    def step(sums, blk):
        intensity, weight, s = (_tb_views if transposed else _chunk_views)(blk)
        k, b = _kb_rows(x, blk, transposed)
        g = k * jnp.exp(b * s)
        wg = weight * g
        return sums.at[blk.group_id].add(jax.lax.complex(wg * intensity, wg * g).reshape(-1))
    return step


def _p1_where_step(x, transposed):
    def step(sums, blk):
        intensity, weight, s = (_tb_views if transposed else _chunk_views)(blk)
        k, b = _kb_rows(x, blk, transposed)
        g = (k * jnp.exp(b * s)).reshape(-1)
        wg = weight.reshape(-1) * g
        u = wg[:, None] * jnp.where(jnp.arange(2)[None, :] == 0, intensity.reshape(-1)[:, None], g[:, None])
        return sums.at[blk.group_id].add(u)
    return step


def _p2_step(x, ih, transposed):
    def step(acc, blk):
        intensity, weight, s = (_tb_views if transposed else _chunk_views)(blk)
        k, b = _kb_rows(x, blk, transposed)
        decay = jnp.exp(b * s)
        g = k * decay
        ih_obs = ih[blk.group_id].reshape(intensity.shape)
        r = intensity - g * ih_obs
        wr = weight * r
        df_dg = -2.0 * wr * ih_obs
        z = jnp.zeros((), x.dtype)
        a, bb, d = jax.lax.reduce((wr * r, df_dg * decay, df_dg * g * s), (z, z, z),
                                  lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2]), (0 if transposed else 1,))
        return acc.at[blk.chunk_experiment].add(jnp.stack([a, bb, d], 1), indices_are_sorted=True)
    return step


def _bc():
    return int(os.environ.get("BLOCK_CHUNKS", sharding.CPU_BLOCK_CHUNKS))


def _blk_complex(x, obs, transposed: bool):
    """Blocked; the two group sums as one complex scatter (real: w g I, imaginary: w g^2)."""
    cdt = jnp.complex128 if x.dtype == jnp.float64 else jnp.complex64
    sums = _fold_blocks(_p1_complex_step(x, transposed), jnp.zeros(obs.n_groups, cdt), obs, _bc())
    ih = sharding._safe_divide(sums.real, sums.imag)
    acc = _fold_blocks(_p2_step(x, ih, transposed), jnp.zeros((obs.n_experiments, 3), x.dtype), obs, _bc())
    return acc[:, 0].sum(), acc[:, 1:]


def blk_complex_nt(x, obs):
    """Blocked; the two group sums as one complex scatter (real: w g I, imaginary: w g^2)."""
    return _blk_complex(x, obs, False)


def blk_where_t(x, obs):
    """Blocked, transposed blocks (`transpose_blocks`); (n, 2) updates built by a select."""
    sums = _fold_blocks(_p1_where_step(x, True), jnp.zeros((obs.n_groups, 2), x.dtype), obs, _bc())
    ih = sharding._safe_divide(sums[:, 0], sums[:, 1])
    acc = _fold_blocks(_p2_step(x, ih, True), jnp.zeros((obs.n_experiments, 3), x.dtype), obs, _bc())
    return acc[:, 0].sum(), acc[:, 1:]


def blk_complex_t(x, obs):
    """blk_complex_nt on transposed blocks (`transpose_blocks`): the layout's effect alone."""
    return _blk_complex(x, obs, True)


BLOCK_TRANSPOSED = {"blk_where_t", "blk_complex_t"}


def _pass2_step(x, ih, acc, blk, decay, gather_2d):
    """sharding._value_and_grad_step with the exp given and I_h gathered [n_chunks, chunk]
    (gather_2d) or flat then reshaped (the session-2 code)."""
    g = sharding._take(x[:, 0], blk.chunk_experiment)[:, None] * decay
    shape = g.shape
    s = blk.inv_two_d_sq.reshape(shape)
    ih_obs = sharding._take(ih, blk.group_id.reshape(shape) if gather_2d else blk.group_id).reshape(shape)
    r = blk.intensity.reshape(shape) - g * ih_obs
    wr = blk.weight.reshape(shape) * r
    df_dg = -2.0 * wr * ih_obs
    z = jnp.zeros((), g.dtype)
    per_chunk = jax.lax.reduce((wr * r, df_dg * decay, df_dg * g * s), (z,) * 3,
                               lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
    return sharding._scatter_add(acc, blk.chunk_experiment, jnp.stack(per_chunk, axis=1), sorted_index=True)


def _two_pass(x, obs, complex_sums: bool, gather_2d: bool, exp_carried: bool, block_chunks: int | None = None):
    """The blocked evaluation with the value summed per still (a third scattered column, as
    in session 2) and each other session-3 change switchable (default: the CPU block size)."""
    bc = block_chunks or sharding.KBStillsTarget().block_chunks
    if complex_sums:
        sums = sharding._fold_group_sums(x, obs, bc)
    else:
        sums = sharding._fold_blocks(sharding._group_sums_step(x), jnp.zeros((obs.n_groups, 2), x.dtype), obs, bc)
    ih = sharding._safe_divide(sums[:, 0], sums[:, 1])
    acc = jnp.zeros((obs.n_experiments, 3), x.dtype)
    n_full, tail = divmod(obs.chunk_experiment.shape[0], bc)
    if not exp_carried or n_full == 0:
        step = lambda a, blk: _pass2_step(x, ih, a, blk, sharding._block_decay(x, blk), gather_2d)  # noqa: E731
        acc = sharding._fold_blocks(step, acc, obs, bc)
        return acc[:, 0].sum(), acc[:, 1:]

    def body(i, carry):  # the exp of block i+1 computed at the end of iteration i, into the carry
        acc_, decay = carry
        acc_ = _pass2_step(x, ih, acc_, sharding._block(obs, i * bc, bc), decay, gather_2d)
        following = sharding._block(obs, jnp.minimum(i + 1, n_full - 1) * bc, bc)
        return acc_, sharding._block_decay(x, following)

    acc, _ = jax.lax.fori_loop(0, n_full, body, (acc, sharding._block_decay(x, sharding._block(obs, 0, bc))))
    if tail:
        last = sharding._block(obs, n_full * bc, tail)
        acc = _pass2_step(x, ih, acc, last, sharding._block_decay(x, last), gather_2d)
    return acc[:, 0].sum(), acc[:, 1:]


SESSION2_BLOCK_CHUNKS = 2048


def real_pair_gradient(x, obs):
    """current with the per-chunk gradient sums scattered as f[n, 2] rows, not complex."""
    bc = sharding.KBStillsTarget().block_chunks
    sums = sharding._fold_group_sums(x, obs, bc)
    ih = sharding._safe_divide(sums[:, 0], sums[:, 1])
    carry = (jnp.zeros((), x.dtype), jnp.zeros((obs.n_experiments, 2), x.dtype))
    return sharding._fold_blocks(lambda c, blk: sharding._value_and_grad_step(x, ih, c, blk), carry, obs, bc)


def session2(x, obs):
    """The session-2 evaluation: (n, 2) real group-sum scatter, I_h gathered flat, the next
    block's exp computed into the loop carry, the value summed per still, blocks of 2,048 chunks."""
    return _two_pass(x, obs, complex_sums=False, gather_2d=False, exp_carried=True, block_chunks=SESSION2_BLOCK_CHUNKS)


def value_per_still(x, obs):
    """current, but the value summed per still (a third column of the sorted per-chunk
    scatter, summed at the end) instead of over each block."""
    return _two_pass(x, obs, complex_sums=True, gather_2d=True, exp_carried=False)


def real_pair_group_sums(x, obs):
    """value_per_still with the session-2 (n, 2) real group-sum scatter instead of the complex one."""
    return _two_pass(x, obs, complex_sums=False, gather_2d=True, exp_carried=False)


def gather_flat(x, obs):
    """value_per_still with I_h gathered flat and reshaped (not straight into [n_chunks, chunk])."""
    return _two_pass(x, obs, complex_sums=True, gather_2d=False, exp_carried=False)


def exp_carried(x, obs):
    """value_per_still with the next block's exp computed into the loop carry (session 2)."""
    return _two_pass(x, obs, complex_sums=True, gather_2d=True, exp_carried=True)


def current(x, obs):
    """What KBStillsTarget evaluates without the native kernel (sharding._local_value_and_grad,
    one device, the target's block size for this platform; XLA's loops)."""
    value, grad, _ = sharding._local_value_and_grad(x, obs, None, sharding.KBStillsTarget().block_chunks)
    return value, grad


def _half_chunk_step(x, ih, carry, blk, parts=2):
    """sharding._value_and_grad_step with the per-chunk sums taken in `parts` pieces of
    chunk/parts rows (a narrower reduce: fewer live registers in XLA's unrolled loop), then the
    pieces added per chunk."""
    value, grad = carry
    decay = sharding._block_decay(x, blk)
    g = sharding._take(x[:, 0], blk.chunk_experiment)[:, None] * decay
    shape = g.shape
    s = blk.inv_two_d_sq.reshape(shape)
    ih_obs = sharding._take(ih, blk.group_id.reshape(shape))
    r = blk.intensity.reshape(shape) - g * ih_obs
    wr = blk.weight.reshape(shape) * r
    df_dg = -2.0 * wr * ih_obs
    zero = jnp.zeros((), g.dtype)
    narrow = (shape[0] * parts, shape[1] // parts)
    wr2, df_dk, df_db = jax.lax.reduce(tuple(v.reshape(narrow) for v in (wr * r, df_dg * decay, df_dg * g * s)),
                                       (zero,) * 3, lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
    df_dk, df_db = (v.reshape(shape[0], parts).sum(axis=1) for v in (df_dk, df_db))
    return value + jnp.sum(wr2), sharding._scatter_add(grad, blk.chunk_experiment, jax.lax.complex(df_dk, df_db),
                                                      sorted_index=True)


def half_chunk_reduce(x, obs, parts=2):
    """current with pass 2's per-chunk sums reduced in halves of 4 rows, then added in pairs."""
    bc = sharding.KBStillsTarget().block_chunks
    sums = sharding._fold_group_sums(x, obs, bc)
    ih = sharding._safe_divide(sums[:, 0], sums[:, 1])
    cdtype = jnp.result_type(x.dtype, jnp.complex64)
    value, grad = sharding._fold_blocks(lambda c, blk: _half_chunk_step(x, ih, c, blk, parts),
                                        (jnp.zeros((), x.dtype), jnp.zeros(obs.n_experiments, cdtype)), obs, bc)
    return value, jnp.stack([grad.real, grad.imag], axis=1)


def quarter_chunk_reduce(x, obs):
    """half_chunk_reduce in pieces of 2 rows."""
    return half_chunk_reduce(x, obs, parts=4)


def native(x, obs):
    """The native CPU kernel (jaxscale/target/native_kb.cc, XLA FFI): what KBStillsTarget
    evaluates on CPU when the kernel builds (`current` stays the XLA loops)."""
    value, grad, _ = sharding._local_value_and_grad(x, obs, None, None, native=True,
                                                    native_threads=native_kb.threads_for(1))
    return value, grad


def native2(x, obs):
    """The native kernel in two threads per call (the second half of the rows offered to a
    helper thread from 2^14 rows on; the target's choice with JAXSCALE_NATIVE_THREADS=2)."""
    value, grad, _ = sharding._local_value_and_grad(x, obs, None, None, native=True, native_threads=2)
    return value, grad


def session3(x, obs):
    """The session-3 evaluation: the current one with the group sums in one run of blocks
    (sharding.CPU_GROUP_SUM_STREAMS = 1)."""
    value, grad, _ = sharding._local_value_and_grad(x, obs, None, sharding.KBStillsTarget().block_chunks, 1)
    return value, grad


def current_one_block(x, obs):
    """sharding._local_value_and_grad as one block (no loop: whole-array temporaries)."""
    value, grad, _ = sharding._local_value_and_grad(x, obs, None, None)
    return value, grad


# --- session 4 experiments: fewer kernels per block (docs/serial.md, session 4)
def _fold(step, carry, rows: dict, chunks: dict, chunk: int, block_chunks: int):
    """carry = step(carry, row_block, chunk_block) over blocks of `block_chunks` chunks (rows:
    arrays of n_rows, chunks: arrays of n_chunks, each sliced to the block), then the tail."""
    n_chunks = next(iter(chunks.values())).shape[0]
    n_full, tail = divmod(n_chunks, block_chunks)

    def sliced(first, n):
        return ({k: jax.lax.dynamic_slice_in_dim(a, first * chunk, n * chunk) for k, a in rows.items()},
                {k: jax.lax.dynamic_slice_in_dim(a, first, n) for k, a in chunks.items()})

    if n_full:
        carry = jax.lax.fori_loop(0, n_full, lambda i, c: step(c, *sliced(i * block_chunks, block_chunks)), carry)
    if tail:
        carry = step(carry, *sliced(n_full * block_chunks, tail))
    return carry


def _fold_streams(step, carry, rows: dict, chunks: dict, chunk: int, block_chunks: int, n_streams: int = 2):
    """As `_fold`, the full blocks split into `n_streams` runs of consecutive blocks, one loop
    whose iteration i takes block i of every run into that run's own carry (the steps of one
    iteration are independent: XLA CPU's thunk executor may run them at once); the leftover
    full blocks and the tail go to the last carries. Returns the list of carries."""
    n_chunks = next(iter(chunks.values())).shape[0]
    n_full, tail = divmod(n_chunks, block_chunks)
    per_stream = n_full // n_streams

    def sliced(first, n):
        return ({k: jax.lax.dynamic_slice_in_dim(a, first * chunk, n * chunk) for k, a in rows.items()},
                {k: jax.lax.dynamic_slice_in_dim(a, first, n) for k, a in chunks.items()})

    carries = [carry] * n_streams
    if per_stream:
        def body(i, cs):
            return tuple(step(cs[j], *sliced((i + j * per_stream) * block_chunks, block_chunks))
                         for j in range(n_streams))
        carries = list(jax.lax.fori_loop(0, per_stream, body, tuple(carries)))
    for j, b in enumerate(range(per_stream * n_streams, n_full)):  # leftover full blocks
        carries[j] = step(carries[j], *sliced(b * block_chunks, block_chunks))
    if tail:
        carries[-1] = step(carries[-1], *sliced(n_full * block_chunks, tail))
    return carries


def _pipelined_group_sums(updates_fn, sums, rows: dict, chunks: dict, chunk: int, block_chunks: int):
    """Group sums with the loop software-pipelined: iteration i scatters block i's updates
    (computed in iteration i-1) and computes block i+1's, two independent kernels that XLA
    CPU's thunk executor may run at the same time."""
    n_chunks = next(iter(chunks.values())).shape[0]
    n_full, tail = divmod(n_chunks, block_chunks)

    def sliced(first, n):
        return ({k: jax.lax.dynamic_slice_in_dim(a, first * chunk, n * chunk) for k, a in rows.items()},
                {k: jax.lax.dynamic_slice_in_dim(a, first, n) for k, a in chunks.items()})

    def ids(first, n):
        return jax.lax.dynamic_slice_in_dim(rows["h"], first * chunk, n * chunk)

    if n_full:
        def body(i, carry):
            sums_, upd = carry
            sums_ = sharding._scatter_add(sums_, ids(i * block_chunks, block_chunks), upd)
            following = jnp.minimum(i + 1, n_full - 1) * block_chunks
            return sums_, updates_fn(*sliced(following, block_chunks))
        first = updates_fn(*sliced(0, block_chunks))
        sums, _ = jax.lax.fori_loop(0, n_full, body, (sums, first))
    if tail:
        sums = sharding._scatter_add(sums, ids(n_full * block_chunks, tail), updates_fn(*sliced(n_full * block_chunks, tail)))
    return sums


def _session4(x, obs, kb_pre=True, complex_reduce=False, value="block", split=False, block_chunks=None,
              w_i2=None, pipelined=False, products_apart=False, n_streams=1,
              streams_pass1_only=False):
    """Experimental evaluation. kb_pre: k and B gathered per chunk once before both loops
    (f[n_chunks] each, sliced into each block's fusion) instead of gathered in every block;
    complex_reduce: pass 2 reduces (w r^2, df/dk + i df/dB) so that the scatter takes the
    reduce output; value: "block" (summed per block, as now), "chunk" (a f[block_chunks]
    carry, summed at the end), "groups" (f = sum w I^2 - sum_h S1^2/S2 from the group sums);
    split: each block's scatters in two halves into two accumulators (concurrent kernels);
    w_i2: sum w I^2 for value="groups" (given precomputed, as the target would hold it);
    pipelined: pass 1's scatter of block i beside the updates of block i+1; products_apart:
    pass 2's per-row products in their own loop (optimization_barrier), then the chunk reduce;
    n_streams: both loops (or pass 1 only: streams_pass1_only) in n_streams independent runs
    of blocks (`_fold_streams`)."""
    bc = block_chunks or sharding.CPU_BLOCK_CHUNKS
    c = obs.chunk
    cdtype = jnp.result_type(x.dtype, jnp.complex64)
    rows = dict(i=obs.intensity, w=obs.weight, s=obs.inv_two_d_sq, h=obs.group_id)
    chunks = dict(e=obs.chunk_experiment)
    if kb_pre:
        chunks.update(k=sharding._take(x[:, 0], obs.chunk_experiment), b=sharding._take(x[:, 1], obs.chunk_experiment))

    def kb(ch):
        if kb_pre:
            return ch["k"][:, None], ch["b"][:, None]
        return (sharding._take(x[:, 0], ch["e"])[:, None], sharding._take(x[:, 1], ch["e"])[:, None])

    def pass1_updates(r, ch):
        k, b = kb(ch)
        s = r["s"].reshape(-1, c)
        g = k * jnp.exp(b * s)
        wg = r["w"].reshape(-1, c) * g
        return jax.lax.complex(wg * r["i"].reshape(-1, c), wg * g).reshape(-1)

    def pass1(sums, r, ch):
        k, b = kb(ch)
        s = r["s"].reshape(-1, c)
        g = k * jnp.exp(b * s)
        wg = r["w"].reshape(-1, c) * g
        upd = jax.lax.complex(wg * r["i"].reshape(-1, c), wg * g).reshape(-1)
        if not split:
            return sharding._scatter_add(sums, r["h"], upd)
        half = upd.shape[0] // 2
        return (sharding._scatter_add(sums[0], r["h"][:half], upd[:half]),
                sharding._scatter_add(sums[1], r["h"][half:], upd[half:]))

    zero_g = jnp.zeros(obs.n_groups, cdtype)
    if pipelined:  # the scatter of block i beside the updates of block i+1 (independent kernels)
        sums = _pipelined_group_sums(pass1_updates, zero_g, rows, chunks, c, bc)
    elif n_streams > 1:
        sums = sum(_fold_streams(pass1, zero_g, rows, chunks, c, bc, n_streams))
    else:
        sums = _fold(pass1, (zero_g, zero_g) if split else zero_g, rows, chunks, c, bc)
    if split:
        sums = sums[0] + sums[1]
    ih = sharding._safe_divide(sums.real, sums.imag)

    def pass2(carry, r, ch):
        val, grad = carry
        k, b = kb(ch)
        s = r["s"].reshape(-1, c)
        decay = jnp.exp(b * s)
        g = k * decay
        ih_obs = sharding._take(ih, r["h"].reshape(-1, c))
        res = r["i"].reshape(-1, c) - g * ih_obs
        wr = r["w"].reshape(-1, c) * res
        df_dg = -2.0 * wr * ih_obs
        z = jnp.zeros((), x.dtype)
        if products_apart:  # the per-row products in their own (contiguous) loop, then the chunk reduce
            wr2_, dk_, db_ = jax.lax.optimization_barrier((wr * res, df_dg * decay, df_dg * g * s))
            wr2, dk, db = jax.lax.reduce((wr2_, dk_, db_), (z, z, z), lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2]), (1,))
            return val + jnp.sum(wr2), sharding._scatter_add(grad, ch["e"], jax.lax.complex(dk, db), sorted_index=True)
        if value == "groups":
            if complex_reduce:
                (per_chunk,) = jax.lax.reduce((jax.lax.complex(df_dg * decay, df_dg * g * s),), (jnp.zeros((), cdtype),),
                                              lambda p, q: (p[0] + q[0],), (1,))
            else:
                dk, db = jax.lax.reduce((df_dg * decay, df_dg * g * s), (z, z),
                                        lambda p, q: (p[0] + q[0], p[1] + q[1]), (1,))
                per_chunk = jax.lax.complex(dk, db)
            wr2 = None
        elif complex_reduce:
            wr2, per_chunk = jax.lax.reduce((wr * res, jax.lax.complex(df_dg * decay, df_dg * g * s)),
                                            (z, jnp.zeros((), cdtype)),
                                            lambda p, q: (p[0] + q[0], p[1] + q[1]), (1,))
        else:
            wr2, dk, db = jax.lax.reduce((wr * res, df_dg * decay, df_dg * g * s), (z, z, z),
                                         lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2]), (1,))
            per_chunk = jax.lax.complex(dk, db)
        if value == "block":
            val = val + jnp.sum(wr2)
        elif value == "chunk":
            val = val.at[: wr2.shape[0]].add(wr2) if wr2.shape[0] != val.shape[0] else val + wr2
        if not split:
            return val, sharding._scatter_add(grad, ch["e"], per_chunk, sorted_index=True)
        half = per_chunk.shape[0] // 2
        return val, (sharding._scatter_add(grad[0], ch["e"][:half], per_chunk[:half], sorted_index=True),
                     sharding._scatter_add(grad[1], ch["e"][half:], per_chunk[half:], sorted_index=True))

    zero_e = jnp.zeros(obs.n_experiments, cdtype)
    val0 = jnp.zeros(bc, x.dtype) if value == "chunk" else jnp.zeros((), x.dtype)
    if n_streams > 1 and not streams_pass1_only:
        parts = _fold_streams(pass2, (val0, zero_e), rows, chunks, c, bc, n_streams)
        val, grad = sum(p[0] for p in parts), sum(p[1] for p in parts)
    else:
        val, grad = _fold(pass2, (val0, (zero_e, zero_e) if split else zero_e), rows, chunks, c, bc)
    if split:
        grad = grad[0] + grad[1]
    if value == "chunk":
        val = jnp.sum(val)
    elif value == "groups":
        if w_i2 is None:  # a constant per weight vector: the variants take it precomputed (measure)
            w_i2 = jnp.sum(obs.weight * obs.intensity * obs.intensity)
        val = w_i2 - jnp.sum(_safe_ratio_sq(sums))
    return val, jnp.stack([grad.real, grad.imag], axis=1)


def _safe_ratio_sq(sums):
    return sharding._safe_divide(sums.real * sums.real, sums.imag)


def kb_chunks(x, obs):
    """The session-3 evaluation with k, B gathered per chunk once before both loops."""
    return _session4(x, obs)


def kb_gathered(x, obs):
    """_session4 with k, B gathered per block (as session 3): the experiments' own baseline."""
    return _session4(x, obs, kb_pre=False)


def kb_chunks_creduce(x, obs):
    """kb_chunks + pass 2 reduces the gradient pair as a complex number."""
    return _session4(x, obs, complex_reduce=True)


def kb_chunks_vchunk(x, obs):
    """kb_chunks + the value summed into a f[block_chunks] carry (no per-block scalar sum)."""
    return _session4(x, obs, value="chunk")


def kb_chunks_vgroups(x, obs, w_i2=None):
    """kb_chunks + the value from the group sums (pass 2 computes the gradient only)."""
    return _session4(x, obs, value="groups", w_i2=w_i2)


def kb_chunks_vgroups_creduce(x, obs, w_i2=None):
    """kb_chunks_vgroups + the complex reduce of kb_chunks_creduce."""
    return _session4(x, obs, value="groups", complex_reduce=True, w_i2=w_i2)


def kb_chunks_split(x, obs):
    """kb_chunks + each block's scatters as two halves into two accumulators."""
    return _session4(x, obs, split=True)


def vgroups_only(x, obs, w_i2=None):
    """session-3 code with the value from the group sums."""
    return _session4(x, obs, kb_pre=False, value="groups", w_i2=w_i2)


# variants given sum w I^2 precomputed (once per weight vector, outside the timed call)
TAKES_W_I2 = {"kb_chunks_vgroups", "kb_chunks_vgroups_creduce", "vgroups_only"}


def kb_chunks_pipelined(x, obs):
    """kb_chunks with pass 1 software-pipelined (scatter of block i beside updates of block i+1)."""
    return _session4(x, obs, pipelined=True)


def kb_chunks_products_apart(x, obs):
    """kb_chunks with pass 2's per-row products computed in a loop of their own (contiguous,
    no stride-8 deinterleaving) and reduced per chunk after (optimization_barrier between)."""
    return _session4(x, obs, products_apart=True)


def products_apart_only(x, obs):
    """The session-3 evaluation with pass 2's products in a loop of their own."""
    return _session4(x, obs, kb_pre=False, products_apart=True)


def two_streams(x, obs):
    """Both loops in two runs of blocks (blocks i and i + n/2 of each iteration into two
    accumulators; = "streams2"; "p1streams2" streams pass 1 only, as sharding does now)."""
    return _session4(x, obs, kb_pre=False, n_streams=2)


def kb_chunks_two_streams(x, obs):
    """two_streams with k, B gathered per chunk once (kb_chunks)."""
    return _session4(x, obs, n_streams=2)


def split_only(x, obs):
    """session-3 code with each block's group-sum and gradient scatters in two halves."""
    return _session4(x, obs, kb_pre=False, split=True)


def _variant(name: str):
    """VARIANTS[name]; "current@N": the current evaluation in blocks of N chunks."""
    base, _, block_chunks = name.partition("@")
    if base == "current" and block_chunks:
        return lambda x, obs: sharding._local_value_and_grad(x, obs, None, int(block_chunks))[:2]
    if base.startswith("p1streams"):  # "p1streamsK[@N]": pass 1 only in K streams
        return lambda x, obs: _session4(x, obs, kb_pre=False, n_streams=int(base[9:]), streams_pass1_only=True,
                                        block_chunks=int(block_chunks) if block_chunks else None)
    if base.startswith("streams"):  # "streamsK[@N]": the loops in K streams (blocks of N chunks)
        return lambda x, obs: _session4(x, obs, kb_pre=False, n_streams=int(base[7:]),
                                        block_chunks=int(block_chunks) if block_chunks else None)
    return VARIANTS[name]


SHARDED = "sharded"  # not in VARIANTS: the target itself over all devices (XLA_FLAGS host device count)
VARIANTS = {f.__name__: f for f in (session1, two_scatters_variadic, stacked_scatter_variadic, blocked, blk_complex_nt,
                                    blk_where_t, current_one_block, session2, value_per_still, real_pair_group_sums,
                                    gather_flat, exp_carried, real_pair_gradient, current, kb_chunks,
                                    kb_gathered, kb_chunks_creduce, kb_chunks_vchunk, kb_chunks_vgroups,
                                    kb_chunks_vgroups_creduce, kb_chunks_split, vgroups_only, split_only,
                                    kb_chunks_pipelined, kb_chunks_products_apart, blk_complex_t,
                                    products_apart_only, two_streams, kb_chunks_two_streams, session3,
                                    half_chunk_reduce, quarter_chunk_reduce, native, native2)}


# ----------------------------------------------------------------------------- timing
def _baseline_arrays(obs):
    return [np.asarray(a) for a in (obs.intensity, obs.weight, obs.inv_two_d_sq, obs.group_id, obs.chunk_experiment)]


def measure(n_obs: int, names: list[str], rounds: int, seed: int) -> dict:
    n_exp = max(n_obs // OBS_PER_STILL, 1)
    sim = simulate_flat_stills(n_exp, OBS_PER_STILL, seed=seed)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    obs = sharding.make_observations(sim["intensity"], 1.0 / sim["variance"], sim["d"], sim["group_id"],
                                     sim["experiment_index"], int(sim["n_groups"]), n_exp, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(np.stack([np.exp(rng.normal(0, 0.2, n_exp)), rng.normal(0, 3, n_exp)], 1), dtype=dtype)
    free = jnp.ones((n_exp, 2), bool)
    target = sharding.KBStillsTarget()
    ref_value, ref_grad = (np.asarray(a, dtype=np.float64) for a in target.value_and_grad(x, obs, free, x))
    host = _baseline_arrays(obs)
    calls = {"baseline": lambda: [a.sum() for a in host]}
    diff = {}
    for name in names:
        obs_v = obs
        base_name = name
        if name.startswith("chunk") and ":" in name:  # "chunkC:variant": rows laid out in chunks of C rows
            chunk_rows, _, base_name = name[5:].partition(":")
            layout = sharding.still_layout(sim["experiment_index"], n_exp, None, chunk=int(chunk_rows))
            obs_v = sharding.make_observations(sim["intensity"], 1.0 / sim["variance"], sim["d"], sim["group_id"],
                                               sim["experiment_index"], int(sim["n_groups"]), n_exp, dtype=dtype,
                                               layout=layout)
        if name == SHARDED:  # KBStillsTarget over all devices (one thread each on CPU)
            mesh = sharding.observation_mesh()
            obs_v = sharding.make_observations(sim["intensity"], 1.0 / sim["variance"], sim["d"], sim["group_id"],
                                               sim["experiment_index"], int(sim["n_groups"]), n_exp, mesh=mesh,
                                               dtype=dtype)
            fn = (lambda t: lambda x_, o: t.value_and_grad(x_, o, free, x_))(sharding.KBStillsTarget(mesh))
        elif name in TAKES_W_I2:
            w_i2 = jnp.sum(obs.weight * obs.intensity * obs.intensity)
            fn = (lambda f, c: lambda x_, o: f(x_, o, c))(jax.jit(_variant(name)), w_i2)
        else:
            fn = jax.jit(_variant(base_name))
        if name in BLOCK_TRANSPOSED:
            obs_v = transpose_blocks(obs, _bc())
        value, grad = fn(x, obs_v)
        diff[name] = max(abs(float(value) - ref_value) / abs(ref_value),
                         float(np.abs(np.asarray(grad, dtype=np.float64) - ref_grad).max() / np.abs(ref_grad).max()))
        calls[name] = (lambda f, o: lambda: jax.block_until_ready(f(x, o)))(fn, obs_v)
    wall = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    faults = {k: 0 for k in calls}
    for fn in calls.values():  # warm up (compile, first-touch)
        fn()
    for _ in range(rounds):
        for name, fn in calls.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    base = min(wall["baseline"])
    out = {"n_obs": n_obs, "n_rows": int(obs.intensity.size), "dtype": jnp.dtype(dtype).name,
           "baseline_ms": base * 1e3, "load": os.getloadavg()[0], "variants": {}}
    for name in calls:
        out["variants"][name] = {"min_ms": min(wall[name]) * 1e3, "median_ms": float(np.median(wall[name])) * 1e3,
                                 "cpu_ms": float(np.median(cpu[name])) * 1e3,
                                 "cpu_min_ms": min(cpu[name]) * 1e3, "faults": faults[name] / rounds,
                                 "ratio": min(wall[name]) / base, "rel_diff": diff.get(name, 0.0)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    if len(jax.devices()) > 1 and SHARDED not in names:
        names.append(SHARDED)
    for n_obs in (int(s) for s in args.sizes.split(",")):
        res = measure(n_obs, names, args.rounds, args.seed)
        if args.json:
            print(json.dumps(res))
            continue
        print(f"n_obs {n_obs}  {res['dtype']}  baseline {res['baseline_ms']:.2f} ms  load(1 min) {res['load']:.2f}")
        for name, v in res["variants"].items():
            print(f"  {name:26s} min {v['min_ms']:7.2f} ms  median {v['median_ms']:7.2f}  cpu median {v['cpu_ms']:7.2f}  "
                  f"cpu min {v['cpu_min_ms']:7.2f}  faults {v['faults']:6.0f}  x{v['ratio']:5.1f}  diff {v['rel_diff']:.1e}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
