"""Resolve indexing ambiguities between data sets (what `check_consistent_indexing` asks for).

When the lattice has more symmetry than the crystal (P 3, P 4, P 6, P 2 2 2 with a ~ b, ...),
each data set may have been indexed in any of m equivalent-looking settings related by a
lattice operation that is not a crystal symmetry. The m settings are the cosets of the point
group in the lattice point group; gemmi's `find_twin_laws` gives their representatives.

Method (after Brehm & Diederichs 2014 and Gildea & Winter 2018, as dials.cosym):
1. Intensities are normalised per resolution shell (I / <I> in d*^2 bins, then per data set
   mean 1) and merged per ASU index within each data set, once for every candidate setting.
2. For up to `max_embed_points` (data set, setting) points, the pairwise Pearson correlations
   on common reflections are masked sparse matrix products (one BLAS-like pass, no pair loop).
3. Each point gets low-dimensional coordinates x minimising sum w_pq (r_pq - x_p . x_q)^2
   (JAX + optax L-BFGS); points of a consistently indexed set gather along one direction, so
   per data set the setting whose point lies along the main cluster direction is chosen.
4. A greedy pass over *all* data sets (this is what scales to 10^5 stills: O(n_obs) per
   sweep) re-picks each set's setting by its correlation with the leave-one-out merged
   reference of all others, until nothing changes; the confidence is the CC margin between
   the best and second-best setting.
5. The global choice is fixed so that the most common setting becomes the identity.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from jaxscale.data.symmetry import d_star_sq, pack_hkl, rotation_matrices
from jaxscale.exceptions import InputError

IDENTITY = "h,k,l"


# --- operators -------------------------------------------------------------------------------
def ambiguity_operators(
    space_group: gemmi.SpaceGroup, cell: gemmi.UnitCell, max_delta: float = 5.0
) -> list[gemmi.Op]:
    """Identity plus one representative of every other coset of the point group in the lattice group.

    Real-space gemmi operations. `max_delta` is the lattice-symmetry obliquity tolerance in
    degrees (dials.cosym's `lattice_symmetry_max_delta`, default 5).
    """
    laws = gemmi.find_twin_laws(cell, space_group, float(max_delta), False)
    return [gemmi.Op("x,y,z")] + list(laws)


def _as_real_space_op(op: gemmi.Op | str) -> gemmi.Op:
    """gemmi.Op in x,y,z form from an Op or a triplet in either 'h,k,l' or 'x,y,z' notation."""
    o = gemmi.Op(op) if isinstance(op, str) else op
    return o.as_xyz() if o.is_hkl() else o


def op_hkl_matrix(op: gemmi.Op | str) -> np.ndarray:
    """Integer M (3, 3) with h' = h @ M for a reindexing operation (gemmi applies it)."""
    o = _as_real_space_op(op)
    return np.array([o.apply_to_hkl(u) for u in ([1, 0, 0], [0, 1, 0], [0, 0, 1])], dtype=np.int64)


def op_as_hkl(op: gemmi.Op | str) -> str:
    """The reindexing operation as an 'h,k,l'-style triplet (identity is 'h,k,l')."""
    return _as_real_space_op(op).as_hkl().triplet("h")


def apply_reindexing(
    miller: np.ndarray, dataset_index: np.ndarray, ops: Sequence[gemmi.Op | str]
) -> np.ndarray:
    """Reindex each observation by its data set's operation: (n, 3) int -> (n, 3) int32.

    miller (n, 3); dataset_index (n,) in [0, len(ops)); ops per data set, gemmi Ops or
    triplets ('k,h,-l' or '-y,-x,-z'). Vectorised over observations (one matrix per distinct op).
    """
    miller = np.asarray(miller).reshape(-1, 3)
    dataset_index = np.asarray(dataset_index, dtype=np.int64)
    keys = [_as_real_space_op(o).triplet() for o in ops]
    distinct, op_of_set = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
    op_of_obs = op_of_set.reshape(-1)[dataset_index]  # (n,)
    out = np.empty(miller.shape, dtype=np.int32)
    for k, triplet in enumerate(distinct):  # one matrix product per distinct op (few)
        sel = op_of_obs == k
        out[sel] = miller[sel].astype(np.int64) @ op_hkl_matrix(triplet)
    return out


def _coset_labels(mats: np.ndarray, point_group: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Which candidate coset M_c G each matrix of `mats` (k, 3, 3) lies in: (k,), -1 if none."""
    table = np.einsum("cij,gjk->cgik", candidates, point_group)  # (m, |G|, 3, 3)
    eq = (mats[:, None, None] == table[None]).all(axis=(-1, -2)).any(axis=2)  # (k, m)
    return np.where(eq.any(axis=1), eq.argmax(axis=1), -1)


# --- normalised, per-data-set merged intensities ----------------------------------------------
@dataclass(frozen=True)
class _Rows:
    """Per candidate setting b, the merged rows of every data set: all arrays (n_rows_b,)."""

    dataset: list[np.ndarray]  # int64 data set of the row
    column: list[np.ndarray]  # int64 index of the ASU reflection in [0, n_unique)
    value: list[np.ndarray]  # float64 mean normalised intensity
    match: list[list[np.ndarray]]  # match[b][c] (n_rows_b,): row of setting c with the same
    #   (data set, column) as this row of setting b, or -1
    n_unique: int
    n_datasets: int


def _asu_keys(hkl: np.ndarray, space_group: gemmi.SpaceGroup) -> np.ndarray:
    """Packed non-anomalous ASU index (n,) of Miller indices (n, 3) (gemmi maps to the ASU)."""
    hkl = np.ascontiguousarray(hkl, dtype=np.int32)
    data = gemmi.IntAsuData(gemmi.UnitCell(1, 1, 1, 90, 90, 90), space_group, hkl, np.zeros(len(hkl), np.int32))
    data.ensure_asu()
    return pack_hkl(np.asarray(data.miller_array))


def _normalised_intensity(
    intensity: np.ndarray, dss: np.ndarray, dataset_index: np.ndarray, n_datasets: int, n_bins: int
) -> np.ndarray:
    """I / <I>_shell (equal-count d*^2 shells), then divided by each data set's own trend: (n,).

    The per-data-set trend is a straight line in d*^2 fitted to its shell-normalised values
    (a relative scale and B factor to first order), so that a data set's resolution fall-off
    does not correlate with the reference in every setting alike.
    """
    edges = np.quantile(dss, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    shell = np.searchsorted(edges, dss, side="right")
    shell_mean = np.bincount(shell, intensity, n_bins) / np.maximum(np.bincount(shell, minlength=n_bins), 1)
    e2 = intensity / np.where(shell_mean[shell] > 0, shell_mean[shell], np.inf)

    def set_sum(v: np.ndarray) -> np.ndarray:
        return np.bincount(dataset_index, v, n_datasets)

    n = np.maximum(set_sum(np.ones_like(e2)), 1.0)
    s_mean = set_sum(dss) / n
    y_mean = set_sum(e2) / n
    ds = dss - s_mean[dataset_index]
    sxx = set_sum(ds * ds)
    slope = np.where(sxx > 0, set_sum(ds * e2) / np.where(sxx > 0, sxx, 1.0), 0.0)
    trend = y_mean[dataset_index] + slope[dataset_index] * ds
    floor = 0.2 * np.abs(y_mean[dataset_index])
    trend = np.where(y_mean[dataset_index] > 0, np.maximum(trend, floor), np.inf)
    return e2 / trend


def _merged_rows(
    miller: np.ndarray, x: np.ndarray, dataset_index: np.ndarray, n_datasets: int,
    space_group: gemmi.SpaceGroup, mats: np.ndarray,
) -> _Rows:
    """Merge normalised intensities per (data set, ASU index) under every candidate setting."""
    keys = [_asu_keys(miller.astype(np.int64) @ m, space_group) for m in mats]  # m x (n,)
    unique_keys, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    columns = inverse.reshape(len(mats), -1)
    n_unique = len(unique_keys)
    out_d, out_c, out_v = [], [], []
    for col in columns:  # one pass per candidate setting (m is small)
        pair = dataset_index * n_unique + col
        upair, inv = np.unique(pair, return_inverse=True)
        out_v.append(np.bincount(inv, x) / np.bincount(inv))
        out_d.append(upair // n_unique)
        out_c.append(upair % n_unique)
    keys = [d * n_unique + c for d, c in zip(out_d, out_c)]  # each sorted (from np.unique)
    match = []
    for kb in keys:
        row = []
        for kc in keys:
            pos = np.minimum(np.searchsorted(kc, kb), max(len(kc) - 1, 0))
            row.append(np.where(kc[pos] == kb, pos, -1) if len(kc) else np.full(len(kb), -1))
        match.append(row)
    return _Rows(out_d, out_c, out_v, match, n_unique, n_datasets)


# --- pairwise correlations ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Pairs:
    """Pairs p < q of points p = i * m + b (data set i of the subset in setting b): all (k,)."""

    p: np.ndarray  # int64
    q: np.ndarray  # int64
    cc: np.ndarray  # float64 Pearson CC on common reflections
    n_common: np.ndarray  # float64 number of common reflections
    n_points: int


def _pair_correlations(rows: _Rows, subset: np.ndarray, min_common: int) -> _Pairs:
    """Pearson CC of every pair of (data set, setting) points sharing >= `min_common` reflections.

    With X the sparse (N, n_unique) matrix of merged values and B its 0/1 mask, every sum a
    Pearson CC needs is a sparse product: n = B B^T, sx = X B^T, sxx = X^2 B^T, sxy = X X^T,
    all with the sparsity pattern of B B^T (values are shifted positive), so the CCs are
    element-wise on the products' data arrays (no loop over pairs).
    """
    m = len(rows.value)
    local = np.full(rows.n_datasets, -1, dtype=np.int64)
    local[subset] = np.arange(len(subset))
    r_idx, c_idx, vals = [], [], []
    for b in range(m):
        li = local[rows.dataset[b]]
        keep = li >= 0
        r_idx.append(li[keep] * m + b)
        c_idx.append(rows.column[b][keep])
        vals.append(rows.value[b][keep])
    r_idx, c_idx, vals = np.concatenate(r_idx), np.concatenate(c_idx), np.concatenate(vals)
    n_points = len(subset) * m
    shape = (n_points, rows.n_unique)
    vals = vals - vals.min(initial=0.0) + 1.0  # > 0, so every product has the pattern of B B^T (CC is shift-free)
    X = sp.csr_matrix((vals, (r_idx, c_idx)), shape=shape)
    B = sp.csr_matrix((np.ones_like(vals), (r_idx, c_idx)), shape=shape)
    X2 = sp.csr_matrix((vals * vals, (r_idx, c_idx)), shape=shape)
    products = [B @ B.T, X @ B.T, X2 @ B.T, X @ X.T]
    products += [products[1].T, products[2].T]  # sy = (X B^T)^T, syy = (X^2 B^T)^T
    products = [sp.csr_matrix(M) for M in products]
    for M in products:
        M.sum_duplicates()  # canonical: sorted column indices per row
    first = products[0]
    if not all(np.array_equal(M.indptr, first.indptr) and np.array_equal(M.indices, first.indices) for M in products):
        raise AssertionError("pairwise sums lost the common sparsity pattern")
    row = np.repeat(np.arange(n_points), np.diff(first.indptr))
    upper = (first.indices > row) & (first.data >= min_common)
    n, sx, sxx, sxy, sy, syy = (M.data[upper] for M in products)
    p, q = row[upper].astype(np.int64), first.indices[upper].astype(np.int64)
    var = (n * sxx - sx * sx) * (n * syy - sy * sy)
    ok = var > 0
    cc = (n * sxy - sx * sy)[ok] / np.sqrt(var[ok])
    return _Pairs(p[ok], q[ok], cc, n[ok].astype(np.float64), n_points)


def _bucket(size: int) -> int:
    """Size rounded up to 16384 * 2^(k/2) steps, so array shapes (and jit compilations) repeat."""
    b = 16384.0
    while b < size:
        b *= np.sqrt(2.0)
    return int(np.ceil(b))


# --- embedding ----------------------------------------------------------------------------------
@functools.cache
def _lbfgs():
    import optax  # noqa: PLC0415 (~0.05 s to import: only where indexing is checked)

    return optax.lbfgs()


def _functional(x: jax.Array, p: jax.Array, q: jax.Array, r: jax.Array, w: jax.Array) -> jax.Array:
    """sum_k w_k (r_k - x_p . x_q)^2 over pairs k = (p, q); x (N, dim), the rest (k,)."""
    resid = r - jnp.sum(x[p] * x[q], axis=1)
    return jnp.sum(w * resid * resid)


@jax.jit
def _run_lbfgs(x0: jax.Array, p, q, r, w, max_iter: jax.Array, rtol: jax.Array):
    """L-BFGS (optax, zoom line search) on `_functional` until the relative change is below rtol."""
    import optax  # noqa: PLC0415

    fun = lambda x: _functional(x, p, q, r, w)  # noqa: E731
    value_and_grad = optax.value_and_grad_from_state(fun)

    def body(carry):
        x, state, f_prev, _, it = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = _lbfgs().update(grad, state, x, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(x, updates), state, value, f_prev, it + 1

    def cond(carry):
        _, _, f, f_prev, it = carry
        moving = jnp.abs(f_prev - f) > rtol * jnp.maximum(jnp.abs(f), 1e-30)
        return (it < max_iter) & (moving | (it < 3))

    inf = jnp.asarray(jnp.inf, x0.dtype)
    x, _, _, _, it = jax.lax.while_loop(cond, body, (x0, _lbfgs().init(x0), inf, inf, jnp.asarray(0)))
    return x, fun(x0), fun(x), it


def _embed(pairs: _Pairs, dim: int, seed: int, max_iter: int = 200) -> tuple[np.ndarray, float, float, int]:
    """Coordinates x (N, dim) minimising sum_pq w_pq (r_pq - x_p . x_q)^2 (cosym's functional).

    w is the number of common reflections. Start: the leading `dim` eigenvectors of the
    sparse correlation matrix, scaled by the root of their eigenvalues (Lanczos with a seeded
    start vector), then optax L-BFGS. Arrays are zero-padded to size classes so repeated calls
    reuse one compilation. Returns (x, functional at start, functional at end, iterations).
    """
    n = pairs.n_points
    rng = np.random.default_rng(seed)
    sym = sp.coo_matrix((np.r_[pairs.cc, pairs.cc], (np.r_[pairs.p, pairs.q], np.r_[pairs.q, pairs.p])), (n, n))
    if n > 4 * dim + 8:
        try:
            eigval, eigvec = eigsh(sym.tocsr(), k=dim, which="LA", v0=rng.standard_normal(n))
        except ArpackNoConvergence:  # start from random coordinates instead
            eigval, eigvec = np.full(dim, 0.01), rng.standard_normal((n, dim)) / np.sqrt(n)
    else:
        eigval, eigvec = np.linalg.eigh(sym.toarray())
    top = np.argsort(eigval)[::-1][:dim]
    x0 = eigvec[:, top] * np.sqrt(np.maximum(eigval[top], 1e-6))
    x0 += 1e-3 * rng.standard_normal(x0.shape)
    k_pad, n_pad = _bucket(len(pairs.cc)), _bucket(n)
    pad = lambda v, size, dtype: np.concatenate([v, np.zeros(size - len(v), dtype)]).astype(dtype)  # noqa: E731
    w = pairs.n_common / max(float(pairs.n_common.max(initial=0.0)), 1.0)
    x0_pad = np.zeros((n_pad, dim), np.float32)
    x0_pad[:n] = x0
    x, f0, f1, it = _run_lbfgs(
        jnp.asarray(x0_pad), jnp.asarray(pad(pairs.p, k_pad, np.int32)), jnp.asarray(pad(pairs.q, k_pad, np.int32)),
        jnp.asarray(pad(pairs.cc, k_pad, np.float32)), jnp.asarray(pad(w, k_pad, np.float32)), max_iter, 1e-6,
    )
    return np.asarray(x, dtype=np.float64)[:n], float(f0), float(f1), int(it)


def _assign_from_embedding(x: np.ndarray, m: int, max_iter: int = 100) -> np.ndarray:
    """Per data set, the setting whose point lies furthest along the main cluster direction.

    x (n_sets * m, dim), point p = i * m + b. The direction starts at the longest point and
    is updated to the sum of the chosen points until the choice is stable. Returns (n_sets,).
    """
    pts = x.reshape(-1, m, x.shape[1])  # (n_sets, m, dim)
    direction = x[np.argmax(np.linalg.norm(x, axis=1))]
    choice = np.full(len(pts), -1)
    for _ in range(max_iter):  # fixed-point iteration on one direction vector
        new = np.argmax(pts @ direction, axis=1)
        if np.array_equal(new, choice):
            break
        choice = new
        direction = pts[np.arange(len(pts)), choice].sum(axis=0)
    return choice


# --- greedy refinement against the leave-one-out reference ------------------------------------
@jax.jit
def _pearson_by_segment(x: jax.Array, y: jax.Array, use: jax.Array, segment: jax.Array, n_seg: jax.Array):
    """Pearson CC and pair count per segment (n_seg,) over rows with use=True; all inputs (k,)."""
    u = use.astype(x.dtype)
    stacked = jnp.stack([u, u * x, u * y, u * x * x, u * y * y, u * x * y], axis=1)  # (k, 6)
    s = jax.ops.segment_sum(stacked, segment, num_segments=n_seg.shape[0])
    n, sx, sy, sxx, syy, sxy = s.T
    var = (n * sxx - sx * sx) * (n * syy - sy * sy)
    cc = jnp.where(var > 0, (n * sxy - sx * sy) / jnp.sqrt(jnp.where(var > 0, var, 1.0)), jnp.nan)
    return cc, n


def _cc_to_reference(
    rows: _Rows, assign: np.ndarray, include: np.ndarray, evaluate: np.ndarray, min_common: int
) -> np.ndarray:
    """CC (n_sets, m) of the `evaluate`d data sets in every setting with the reference of the others.

    The reference is the mean over `include`d data sets (each in its assigned setting) per ASU
    reflection; a data set's own current rows are taken out of it (leave-one-out). Rows of
    data sets not evaluated are nan.
    """
    m, U, n_sets = len(rows.value), rows.n_unique, rows.n_datasets
    ref_sum = np.zeros(U)
    ref_n = np.zeros(U)
    for b in range(m):
        sel = (assign[rows.dataset[b]] == b) & include[rows.dataset[b]]
        ref_sum += np.bincount(rows.column[b][sel], rows.value[b][sel], U)
        ref_n += np.bincount(rows.column[b][sel], minlength=U)
    xs, ys, uses, segs = [], [], [], []
    for b in range(m):
        rows_b = np.nonzero(evaluate[rows.dataset[b]])[0]
        ds_b, col_b = rows.dataset[b][rows_b], rows.column[b][rows_b]
        current = assign[ds_b]
        mine = np.zeros(len(rows_b), dtype=bool)  # reflection is in the set's own reference rows
        mine_val = np.zeros(len(rows_b))
        for c in range(m):  # small loop over settings
            match = rows.match[b][c][rows_b]
            hit = (current == c) & (match >= 0)
            mine |= hit
            mine_val[hit] = rows.value[c][match[hit]]
        mine &= include[ds_b]
        s = ref_sum[col_b] - np.where(mine, mine_val, 0.0)
        n_ref = ref_n[col_b] - mine
        xs.append(rows.value[b][rows_b])
        ys.append(np.where(n_ref > 0, s / np.maximum(n_ref, 1), 0.0))
        uses.append(n_ref > 0)
        segs.append(ds_b * m + b)
    k, n_seg = sum(len(v) for v in xs), n_sets * m
    k_pad, seg_pad = _bucket(k), _bucket(n_seg)  # padded rows are unused: one compile per size class
    cc, n = _pearson_by_segment(
        jnp.asarray(np.concatenate(xs + [np.zeros(k_pad - k)])),
        jnp.asarray(np.concatenate(ys + [np.zeros(k_pad - k)])),
        jnp.asarray(np.concatenate(uses + [np.zeros(k_pad - k, dtype=bool)])),
        jnp.asarray(np.concatenate(segs + [np.zeros(k_pad - k, dtype=np.int64)])),
        jnp.zeros(seg_pad),
    )
    cc = np.asarray(cc)[:n_seg].reshape(n_sets, m)
    n = np.asarray(n)[:n_seg].reshape(n_sets, m)
    return np.where((n >= min_common) & evaluate[:, None], cc, np.nan)


def _greedy_refine(
    rows: _Rows, assign: np.ndarray, include: np.ndarray, min_common: int, max_sweeps: int,
    n_blocks: int, seed: int,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Re-pick every data set's setting by CC with the leave-one-out reference until stable.

    Each sweep visits the data sets in `n_blocks` seeded random blocks, rebuilding the
    reference after each block (updating all at once can oscillate when the start is poor).
    Data sets outside `include` (not resolved by the embedding) join the reference once placed.
    Returns (assign (n,), cc (n, m) as last evaluated, re-decided data sets per sweep).
    """
    n_sets, m = rows.n_datasets, len(rows.value)
    assign = assign.copy()
    include = include.copy()
    changes = []
    cc = np.full((n_sets, m), np.nan)
    blocks = np.array_split(np.random.default_rng(seed).permutation(n_sets), max(1, min(n_blocks, n_sets)))
    for _ in range(max_sweeps):  # sweeps until no data set changes its setting
        n_changed = 0
        for block in blocks:  # blocks in turn, each against the reference of all others
            evaluate = np.zeros(n_sets, dtype=bool)
            evaluate[block] = True
            cc_block = _cc_to_reference(rows, assign, include, evaluate, min_common)[block]
            cc[block] = cc_block
            filled = np.where(np.isnan(cc_block), -np.inf, cc_block)
            best = np.where(np.isfinite(filled).any(axis=1), np.argmax(filled, axis=1), assign[block])
            n_changed += int(((best != assign[block]) & include[block]).sum())
            assign[block] = best
            include[block] = True
        changes.append(n_changed)
        if n_changed == 0:
            break
    return assign, cc, changes


# --- public entry -------------------------------------------------------------------------------
@dataclass
class AmbiguityResult:
    """Chosen reindexing per data set and the numbers behind the choice."""

    ops: list[str]  # per data set, 'h,k,l'-style reindexing op ('h,k,l' = unchanged)
    op_index: np.ndarray  # (n_datasets,) index into candidate_ops
    candidate_ops: list[str]  # identity first, then one op per other coset
    reindexed_miller: np.ndarray  # (n_obs, 3) int32
    n_flipped: int
    confidence: np.ndarray  # (n_datasets,) CC(best) - CC(second best) vs reference; nan: no data
    cc_to_reference: np.ndarray  # (n_datasets, n_candidates) CC vs leave-one-out reference
    cc_matrix_summary: dict = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)


def resolve_indexing_ambiguity(
    miller: np.ndarray,
    intensity: np.ndarray,
    variance: np.ndarray,
    dataset_index: np.ndarray,
    n_datasets: int,
    space_group: gemmi.SpaceGroup,
    cell: gemmi.UnitCell,
    *,
    d_min: float | None = None,
    seed: int = 0,
    max_delta: float = 5.0,
    n_bins: int = 20,
    min_common: int = 3,
    max_embed_points: int = 2000,
    max_sweeps: int = 20,
    n_blocks: int = 8,
) -> AmbiguityResult:
    """Find per data set the reindexing op that makes all data sets consistently indexed.

    miller (n, 3), intensity (n,), variance (n,), dataset_index (n,) in [0, n_datasets).
    Observations with variance <= 0, non-finite values or d < d_min are not used for the
    decision (all are reindexed). Without an ambiguity, every op is the identity.
    `max_embed_points` bounds the (data set, setting) points of the pairwise/embedding stage;
    the remaining data sets are placed by the greedy reference pass, which visits the data
    sets in `n_blocks` blocks per sweep for at most `max_sweeps` sweeps.
    """
    miller = np.asarray(miller).reshape(-1, 3)
    intensity = np.asarray(intensity, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    dataset_index = np.asarray(dataset_index, dtype=np.int64)
    n_obs = len(miller)
    for name, arr in (("intensity", intensity), ("variance", variance), ("dataset_index", dataset_index)):
        if arr.shape != (n_obs,):
            raise InputError(None, f"{name} has shape {arr.shape}, expected ({n_obs},) like miller_index", field=name)
    if n_obs and (dataset_index.min() < 0 or dataset_index.max() >= n_datasets):
        raise InputError(
            None, f"data set indices must lie in [0, {n_datasets}), found {dataset_index.min()}..{dataset_index.max()}",
            field="dataset_index",
        )
    ops = ambiguity_operators(space_group, cell, max_delta)
    candidates = [op_as_hkl(o) for o in ops]
    m = len(ops)
    log = []
    identity_result = AmbiguityResult(
        ops=[IDENTITY] * n_datasets, op_index=np.zeros(n_datasets, dtype=np.int64), candidate_ops=candidates,
        reindexed_miller=miller.astype(np.int32), n_flipped=0, confidence=np.full(n_datasets, np.nan),
        cc_to_reference=np.full((n_datasets, m), np.nan), log_lines=log,
    )
    if m == 1:
        log.append(
            f"No indexing ambiguity: the lattice symmetry of {cell.parameters} (max delta {max_delta} deg) "
            f"adds nothing to {space_group.xhm()}; all {n_datasets} data sets keep h,k,l."
        )
        return identity_result
    log.append(f"Indexing ambiguity in {space_group.xhm()}: {m} settings, candidate ops {', '.join(candidates)}")
    if n_datasets < 2:
        log.append("Only one data set: nothing to make consistent.")
        return identity_result

    dss = d_star_sq(miller, cell)
    use = np.isfinite(intensity) & np.isfinite(variance) & (variance > 0) & (dss > 0)
    if d_min is not None:
        use &= dss <= 1.0 / d_min**2
    if use.sum() < min_common:
        log.append(f"Only {int(use.sum())} usable observations: all data sets keep h,k,l.")
        return identity_result
    mats = np.stack([op_hkl_matrix(o) for o in ops])  # (m, 3, 3)
    x = _normalised_intensity(intensity[use], dss[use], dataset_index[use], n_datasets, n_bins)
    rows = _merged_rows(miller[use], x, dataset_index[use], n_datasets, space_group, mats)

    # pairwise stage on the data sets with most reflections
    n_refl = np.bincount(rows.dataset[0], minlength=n_datasets)
    n_embed = int(min(n_datasets, max(2, max_embed_points // m)))
    subset = np.sort(np.argsort(-n_refl, kind="stable")[:n_embed])
    pairs = _pair_correlations(rows, subset, min_common)
    n_pairs = len(pairs.cc)
    log.append(
        f"Pairwise CC matrix: {len(subset)} data sets x {m} settings ({pairs.n_points} points), "
        f"{n_pairs} pairs with >= {min_common} common reflections"
    )
    assign = np.zeros(n_datasets, dtype=np.int64)
    if n_pairs:
        coords, f0, f1, iters = _embed(pairs, dim=m, seed=seed)
        assign[subset] = _assign_from_embedding(coords, m)
        log.append(f"Embedding in {m} dimensions: functional {f0:.4g} -> {f1:.4g} in {iters} L-BFGS iterations")
    else:
        log.append("No pairs of data sets share enough reflections: starting the greedy pass from h,k,l.")

    include = np.zeros(n_datasets, dtype=bool)
    include[subset] = True
    assign, cc, changes = _greedy_refine(rows, assign, include, min_common, max_sweeps, n_blocks, seed)
    log.append(f"Greedy refinement vs leave-one-out reference: changes per sweep {changes}")

    # fix the global choice: the most common setting becomes the identity
    point_group = rotation_matrices(space_group)
    decided = ~np.isnan(cc).all(axis=1)  # data sets with any usable CC to the reference
    counts = np.bincount(assign[decided], minlength=m)
    star = int(np.argmax(counts))
    relabel = _coset_labels(
        np.einsum("aij,jk->aik", mats, np.rint(np.linalg.inv(mats[star])).astype(np.int64)), point_group, mats
    )
    if star != 0 and (relabel >= 0).all():
        assign = relabel[assign]
        cc = cc[:, np.argsort(relabel)]
    elif star != 0:
        log.append("Global setting not normalised (the point group is not normal in the lattice group).")
    assign = np.where(decided, assign, 0)  # no data, no reason to reindex

    ranked = np.sort(np.where(np.isnan(cc), -np.inf, cc), axis=1)
    two = np.isfinite(ranked[:, -2])
    confidence = np.full(n_datasets, np.nan)
    confidence[two] = ranked[two, -1] - ranked[two, -2]
    op_strings = [candidates[a] for a in assign]
    summary = _summarise_pairs(pairs, assign[subset], m)
    summary["n_datasets_in_matrix"] = int(len(subset))
    log.append(
        f"Pairs consistent: mean CC {summary['mean_cc_consistent']:.3f} over {summary['n_pairs_consistent']}; "
        f"other settings: mean CC {summary['mean_cc_inconsistent']:.3f} over {summary['n_pairs_inconsistent']}"
    )
    n_flipped = int((assign != 0).sum())
    per_op = ", ".join(f"{candidates[b]}: {int(c)}" for b, c in enumerate(np.bincount(assign, minlength=m)))
    log.append(f"Reindexed {n_flipped} of {n_datasets} data sets ({per_op})")
    finite = np.isfinite(confidence)
    if finite.any():
        log.append(
            f"Confidence (CC margin best - next): median {np.median(confidence[finite]):.3f}, "
            f"{int((confidence[finite] < 0.1).sum())} data sets below 0.1, {int((~finite).sum())} undetermined"
        )
    return AmbiguityResult(
        ops=op_strings, op_index=assign, candidate_ops=candidates,
        reindexed_miller=apply_reindexing(miller, dataset_index, op_strings),
        n_flipped=n_flipped, confidence=confidence, cc_to_reference=cc, cc_matrix_summary=summary, log_lines=log,
    )


def _summarise_pairs(pairs: _Pairs, assign: np.ndarray, m: int) -> dict:
    """Weighted mean CC of pairs in the chosen settings and of chosen-vs-other-setting pairs."""
    chosen = np.zeros(pairs.n_points, dtype=bool)
    chosen[np.arange(len(assign)) * m + assign] = True
    other_set = pairs.p // m != pairs.q // m
    n_chosen = chosen[pairs.p].astype(int) + chosen[pairs.q]
    cons = other_set & (n_chosen == 2)
    inc = other_set & (n_chosen == 1)

    def wmean(sel: np.ndarray) -> float:
        w = pairs.n_common[sel]
        return float((pairs.cc[sel] * w).sum() / w.sum()) if w.sum() > 0 else float("nan")

    return {
        "mean_cc_consistent": wmean(cons),
        "n_pairs_consistent": int(cons.sum()),
        "mean_cc_inconsistent": wmean(inc),
        "n_pairs_inconsistent": int(inc.sum()),
        "median_common_reflections": float(np.median(pairs.n_common)) if len(pairs.cc) else 0.0,
    }
