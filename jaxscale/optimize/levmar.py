"""Full-matrix Levenberg–Marquardt / Gauss–Newton rounds, parameter covariance, and
per-observation inverse-scale variances (DIALS' `full_matrix` round, target.md §5.2–5.5).

The residual vector is `sqrt(w) (I - g I_h(g))` with the exact I_h dependence; its Jacobian is
taken by `jax.jacfwd` per chunk of whole symmetry groups and accumulated into J^T J and J^T r
by `lax.scan`, so the n_obs x n_params Jacobian is never held. Restraints add rows
`sqrt(w_p) p`. The objective is ½ sum w r^2 (lstbx convention).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.compilation import Program, host_evaluation, precompile
from jaxscale.models.component import take
from jaxscale.models.linear import slot_slope
from jaxscale.optimize.host_twins import HostProblem
from jaxscale.optimize.host_twins import has_slot_bases as _has_slot_bases
from jaxscale.optimize.host_twins import host_links as _host_links
from jaxscale.optimize.host_twins import host_slot_derivatives as _host_slot_derivatives
from jaxscale.optimize.lbfgs import MAX_ITERATIONS, RMSD_CONVERGED, OptimisationResult
from jaxscale.target.objective import (
    ChunkData,
    ScalingTarget,
    TargetData,
    chunk_by_groups,
    n_reflections,
    safe_divide,
)

MAX_TRIAL_ITERATIONS = "Reached maximum number of consecutive unsuccessful trial steps"
OBJECTIVE_FLAT = "objective flat"
OBJECTIVE_INCREASE = "Refinement failure: objective increased"


@dataclasses.dataclass
class FullMatrixResult(OptimisationResult):
    """LM/GN result with the normal matrices needed for the covariance."""

    free: np.ndarray = None  # bool[n_params]
    normal_matrix: np.ndarray = None  # f[n_free, n_free] undamped J^T W J at x (free block)
    damped_matrix: np.ndarray = None  # f[n_free, n_free] last solved (N + mu I)
    chi2_reduced: float = float("nan")
    n_equations: int = 0


def slot_derivatives(target: ScalingTarget, x_eff: jax.Array, bases: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """g and the non-zero entries of D = dg/dp, row by row (traced).

    Row i of component c reads `params_c[idx_c[i, k]]` for its K_c slots k and nothing else,
    so dg_i/dp is the per-row gradient with respect to these K_c values, scattered to their
    flat columns: the link's closed-form slope (`models.linear.slot_slope`, no autodiff to
    trace), else a vmapped per-row `jax.grad`. Either costs O(n sum_c K_c) instead of the
    O(n n_params sum_c K_c) of `jacfwd` over all parameters.
    Returns g: f[C], d: f[C, S], cols: i[C, S] (S = sum_c K_c; repeated columns add up).
    """
    params = target.unravel(x_eff)
    factors = {k: comp.apply(params[k], bases[k]) for k, comp in target.components.items()}
    g = None  # the product in the order of `inverse_scale`
    for f in factors.values():  # loop over model components (few)
        g = f if g is None else g * f
    d_parts, col_parts = [], []
    for k, comp in target.components.items():  # loop over model components (few)
        basis = bases[k]
        n_slots = basis["idx"].shape[1]
        others = jnp.ones_like(g)
        for other, f in factors.items():
            if other != k:
                others = others * f

        def row_factor(p_row, b_row, comp=comp, n_slots=n_slots):
            b1 = {name: v[None] for name, v in b_row.items()}
            b1["idx"] = jnp.arange(n_slots)[None]
            return comp.apply(p_row, b1)[0]

        slope = slot_slope(comp.apply)
        if slope is not None:
            df = slope(factors[k], basis)  # f[C, K_c]
        else:
            df = jax.vmap(jax.grad(row_factor))(params[k][basis["idx"]], basis)  # f[C, K_c]
        d_parts.append(others[:, None] * df)
        col_parts.append(basis["idx"].astype(jnp.int32) + target.slices[k].start)
    return g, jnp.concatenate(d_parts, axis=1), jnp.concatenate(col_parts, axis=1)


def _dense_rows(d: jax.Array, cols: jax.Array, n: int) -> jax.Array:
    """f[C, n] with row i holding d[i] at cols[i] (repeated columns summed)."""
    rows = jnp.broadcast_to(jnp.arange(d.shape[0])[:, None], cols.shape)
    return jnp.zeros((d.shape[0], n), d.dtype).at[rows, cols].add(d)


class NormalEquations:
    """Jitted builder of (N = J^T J, grad = J^T r, sum r^2) over chunks, for one target.

    For the profiled least-squares residual r_i = sqrt(w_i) (I_i - g_i I_h) the Jacobian is
    assembled from the sparse dg/dp (`slot_derivatives`):
    J_i = -sqrt(w_i) (I_h G_i + g_i S_h), S_h = dI_h/dp = sum_{j in h} w_j (I_j - 2 I_h g_j) G_j
    / sum_{j in h} w_j g_j^2 (exact, as `jacfwd` of the residuals, which is the fallback for
    other residual definitions or bases).
    """

    def __init__(self, target: ScalingTarget):
        self.target = target
        self.build = Program(self._build, rows=_chunk_rows)  # small problems compile fast

    def _chunk_jacobian(self, x: jax.Array, chunk: ChunkData) -> tuple[jax.Array, jax.Array]:
        t = self.target
        data = chunk.target
        p = data.problem
        free = data.free
        x_eff = jnp.where(free, x, data.anchor)
        g, d, cols = slot_derivatives(t, x_eff, data.bases)
        d = d * take(free, cols)  # no derivative for fixed parameters
        big_g = _dense_rows(d, cols, x.size)  # f[C, n]
        sw = jnp.sqrt(p.weight)
        if p.ih_reference is not None:
            ih_obs = take(p.ih_reference, p.group_id)
            return sw * (p.intensity - g * ih_obs), -(sw * ih_obs)[:, None] * big_g
        wg = p.weight * g
        num = jax.ops.segment_sum(wg * p.intensity, p.group_id, num_segments=p.n_groups)
        den = jax.ops.segment_sum(wg * g, p.group_id, num_segments=p.n_groups)
        ih = safe_divide(num, den)
        ih_obs = take(ih, p.group_id)
        c = p.weight * (p.intensity - 2.0 * ih_obs * g)
        ok = den > 0
        dih = jnp.where(ok[:, None], jax.ops.segment_sum(c[:, None] * big_g, p.group_id, num_segments=p.n_groups)
                        / jnp.where(ok, den, 1.0)[:, None], 0.0)  # f[n_groups, n]
        jac = -sw[:, None] * (ih_obs[:, None] * big_g + g[:, None] * take(dih, p.group_id))
        return sw * (p.intensity - g * ih_obs), jac

    def _build(self, x: jax.Array, chunks: ChunkData, free: jax.Array):
        t = self.target
        n = x.size
        profiled_ls = type(t).chunk_residuals is ScalingTarget.chunk_residuals

        def body(carry, chunk_target):
            nm, grad, s = carry
            chunk = ChunkData(target=chunk_target)
            if profiled_ls and _has_slot_bases(t, chunk_target.bases):
                r, jac = self._chunk_jacobian(x, chunk)  # f[C], f[C, n]
            else:
                r = t.chunk_residuals(x, chunk)  # f[C]
                jac = jax.jacfwd(t.chunk_residuals)(x, chunk)  # f[C, n]
            return (nm + jac.T @ jac, grad + jac.T @ r, s + r @ r), None

        init = (jnp.zeros((n, n)), jnp.zeros(n), jnp.zeros(()))
        if chunks.target.problem.weight.shape[0] == 1:  # one chunk (small problems): no loop to compile
            (nm, grad, s), _ = body(init, jax.tree.map(lambda a: a[0], chunks.target))
        else:
            (nm, grad, s), _ = jax.lax.scan(body, init, chunks.target)
        # restraint rows sqrt(w_p) p_eff with derivative sqrt(w_p) on free parameters
        wp = t.restraint_weights * free
        x_eff = jnp.where(free, x, chunks.target.anchor[0])
        nm = nm + jnp.diag(wp)
        grad = grad + wp * x_eff
        s = s + jnp.sum(t.restraint_weights * x_eff**2)
        return nm, grad, s


def host_normal_equations(target: ScalingTarget, data: TargetData, max_elements: int = 1 << 22,
                          route: str | None = None):
    """numpy twin of `NormalEquations.build` over the whole problem (x -> (N, grad, sum r^2)),
    the same exact Jacobian from the links' closed-form slot slopes, for problems small enough
    (`compilation.host_evaluation`, and the route's largest array at most `max_elements`
    entries: `_SlotNormalEquations`) that tracing and compiling the builder costs more than
    every build of the round; None where it does not apply (other residuals, bases or links,
    a fixed reference I_h, larger problems). route: one of `_SlotNormalEquations.ROUTES` to
    force it (tests), else the cheapest."""
    p = data.problem
    n_rows, n = int(np.shape(p.weight)[0]), target.n_params
    if (not host_evaluation(n_rows) or p.ih_reference is not None
            or type(target).chunk_residuals is not ScalingTarget.chunk_residuals):
        return None
    hp = HostProblem.of(target, data)
    if hp is None:
        return None
    # (weight-0 rows left out: padding rows all share one group, the largest of the group pairs else)
    assemble = _SlotNormalEquations.for_problem(hp.group_id, hp.n_groups, hp.cols, n, max_elements, route)
    if assemble is None:
        return None

    def build(x: np.ndarray, free: np.ndarray):
        x_eff = np.where(free, x, hp.anchor)
        g, d, ih, den = hp.scales(target, x_eff)
        d = d * free[hp.cols]  # fixed parameters: no derivative
        inv_den = np.where(den > 0, 1.0 / np.where(den > 0, den, 1.0), 0.0)
        nm, grad, s = assemble(hp.weight, hp.intensity, g, d, ih, den, inv_den)
        wp = hp.restraint * free  # restraint rows sqrt(w_p) p_eff, derivative sqrt(w_p) on free parameters
        return nm + np.diag(wp), grad + wp * x_eff, s + float(np.sum(hp.restraint * x_eff**2))

    return build


class _SlotNormalEquations:
    """(J^T J, J^T r, r^T r) of slot models without jacfwd. Row i's derivative touches its own
    slot columns and, through I_h, those of every row of its group h:
      J_i = -sqrt(w_i) (I_h d_i + g_i D_h),  D_h = sum_{j in h} c_j d_j / den_h,
      c_j = w_j (I_j - 2 I_h g_j),  r_i = sqrt(w_i) rho_i,  rho_i = I_i - g_i I_h,
    with d_i = dg_i/dp (S slot entries per row, slots sharing a column add up). Three routes
    to the same sums, in cost order chosen per problem (`for_problem`):
      "rows":   the dense J f[n_rows, n], J^T J by BLAS (n_rows n^2 flops);
      "groups": J^T J = sum_i w_i I_h^2 d_i^T d_i + sum_h [I_h (E_h^T D_h + D_h^T E_h)
                + den_h D_h^T D_h], E_h = sum_{j in h} w_j g_j d_j, with D and E dense
                f[n_groups, n] (two n_groups n^2 products: stills have few rows per parameter
                but many per group);
      "pairs":  the same sums over the pairs of slot entries of a group (sum_h (m_h S)^2
                scattered pairs, ~50 flops' cost each: few rows per group).
    J^T r = -sum_i w_i rho_i I_h d_i - sum_h q_h D_h, q_h = sum_{j in h} w_j g_j rho_j (0 but
    for rounding at the closed-form I_h)."""

    ROUTES = ("rows", "groups", "pairs")

    def __init__(self, gid: np.ndarray, n_groups: int, cols: np.ndarray, n: int, route: str):
        n_rows, n_slots = cols.shape
        self.gid, self.n_groups, self.n, self.route = gid, n_groups, n, route
        self.entry_cols = cols.ravel()  # entries (row, slot), row-major
        self.entry_group = np.repeat(gid, n_slots)
        self.group_cells = self.entry_group * n + self.entry_cols  # cells of a dense f[n_groups, n]
        if route == "rows":
            self.row_cells = (np.arange(n_rows)[:, None] * n + cols).ravel()  # cells of f[n_rows, n]
            return
        slot_a, slot_b = (m.ravel() for m in np.meshgrid(np.arange(n_slots), np.arange(n_slots), indexing="ij"))
        self.row_a = (np.arange(n_rows)[:, None] * n_slots + slot_a).ravel()  # pairs of one row's slots
        self.row_b = (np.arange(n_rows)[:, None] * n_slots + slot_b).ravel()
        self.row_pair_cells = self.entry_cols[self.row_a] * n + self.entry_cols[self.row_b]
        if route == "pairs":  # each entry paired with every entry of its group (sorted by group)
            by_group = np.argsort(self.entry_group, kind="stable")
            size = np.bincount(self.entry_group, minlength=n_groups)
            start = np.concatenate([[0], np.cumsum(size)[:-1]])
            per_entry = size[self.entry_group[by_group]]
            a_sorted = np.repeat(np.arange(by_group.size), per_entry)
            offset = np.arange(a_sorted.size) - np.repeat(np.cumsum(per_entry) - per_entry, per_entry)
            self.group_a = by_group[a_sorted]
            self.group_b = by_group[start[self.entry_group[self.group_a]] + offset]
            self.group_pair_cells = self.entry_cols[self.group_a] * n + self.entry_cols[self.group_b]

    @classmethod
    def for_problem(cls, gid: np.ndarray, n_groups: int, cols: np.ndarray, n: int, max_elements: int,
                    route: str | None = None) -> "_SlotNormalEquations | None":
        """The cheapest route whose arrays stay within max_elements (route: forced), else None."""
        n_rows, n_slots = cols.shape
        entries_per_group = np.bincount(gid, minlength=n_groups) * n_slots
        row_pairs = n_rows * n_slots * n_slots
        group_pairs = int(np.sum(entries_per_group.astype(np.int64) ** 2))
        cost = {"rows": (n_rows * n * n, n_rows * n),  # (cost in flops, largest array)
                "groups": (50 * row_pairs + 2 * n_groups * n * n, max(n_groups * n, row_pairs)),
                "pairs": (50 * (row_pairs + group_pairs), row_pairs + group_pairs)}
        fits = [r for r in ((route,) if route else cls.ROUTES) if cost[r][1] <= max_elements]
        return cls(gid, n_groups, cols, n, min(fits, key=lambda r: cost[r][0])) if fits else None

    def __call__(self, weight, intensity, g, d, ih, den, inv_den):
        n, gid, eg = self.n, self.gid, self.entry_group
        n_slots = d.shape[1]
        ih_obs = ih[gid]
        rho = intensity - g * ih_obs
        d_flat = d.ravel()
        delta = np.repeat(weight * (intensity - 2.0 * ih_obs * g), n_slots) * d_flat * inv_den[eg]  # D_h parts
        if self.route == "rows":
            n_rows = gid.size
            big_g = np.bincount(self.row_cells, d_flat, n_rows * n).reshape(n_rows, n)  # dg/dp
            dih = np.bincount(self.group_cells, delta, self.n_groups * n).reshape(self.n_groups, n)
            sw = np.sqrt(weight)
            jac = -sw[:, None] * (ih_obs[:, None] * big_g + g[:, None] * dih[gid])
            r = sw * rho
            return jac.T @ jac, jac.T @ r, float(r @ r)
        q = np.bincount(gid, weight * g * rho, self.n_groups)
        own = np.repeat(weight * rho * ih_obs, n_slots) * d_flat
        a, b = self.row_a, self.row_b
        own_w = np.repeat(weight * ih_obs**2, n_slots)
        nm = np.bincount(self.row_pair_cells, own_w[a] * d_flat[a] * d_flat[b], n * n).reshape(n, n)
        e = np.repeat(weight * g, n_slots) * d_flat  # E_h parts
        if self.route == "groups":
            big_d = np.bincount(self.group_cells, delta, self.n_groups * n).reshape(self.n_groups, n)
            big_e = np.bincount(self.group_cells, e, self.n_groups * n).reshape(self.n_groups, n)
            cross = (ih[:, None] * big_e).T @ big_d
            nm += cross + cross.T + big_d.T @ (den[:, None] * big_d)
            grad = -np.bincount(self.entry_cols, own, n) - big_d.T @ q
        else:
            a, b = self.group_a, self.group_b
            nm += np.bincount(self.group_pair_cells, ih[eg[a]] * (e[a] * delta[b] + delta[a] * e[b])
                              + den[eg[a]] * delta[a] * delta[b], n * n).reshape(n, n)
            grad = -np.bincount(self.entry_cols, own + q[eg] * delta, n)
        return nm, grad, float(np.sum(weight * rho * rho))


def _chunk_rows(x: Any, chunks: ChunkData, free: Any) -> int:
    """Observation rows of a `NormalEquations.build` call (all chunks, padding included)."""
    return int(np.prod(np.shape(chunks.target.problem.weight)))


_NE_CACHE: dict[int, tuple] = {}


def _normal_equations(target: ScalingTarget) -> NormalEquations:
    hit = _NE_CACHE.get(id(target))
    if hit is not None and hit[0] is target:
        return hit[1]
    ne = NormalEquations(target)
    _NE_CACHE[id(target)] = (target, ne)
    return ne


def _chunk_size(problem: Any, chunk_size: int) -> int:
    """Rows per chunk: at most the problem's (padded) rows, so a small problem is one chunk
    of its own size rather than mostly padding (the build costs rows x n_params^2)."""
    return int(max(1, min(chunk_size, np.shape(problem.weight)[0])))


def precompile_full_matrix(target: ScalingTarget, data: TargetData, chunk_size: int = 4096) -> None:
    """Compile the normal equations of `minimise_full_matrix(target, data)` in the background,
    for a problem that is one chunk (a later problem padded to the same sizes shares it;
    the number of chunks of a larger one follows its live rows, which outliers change)."""
    if host_normal_equations(target, data) is not None:  # built in numpy: nothing to compile
        return
    free = np.asarray(data.free, dtype=bool)
    chunks = chunk_by_groups(data.problem, data.bases, np.asarray(data.anchor), free,
                             chunk_size=_chunk_size(data.problem, chunk_size))
    if np.shape(chunks.target.problem.weight)[0] != 1:
        return
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), chunks)  # holds no data
    precompile(_normal_equations(target).build, jax.ShapeDtypeStruct(free.shape, np.float64), shapes,
               jax.ShapeDtypeStruct(free.shape, np.bool_))


def damping_update(mu: float, nu: float, rho: float) -> tuple[float, float, bool]:
    """dials.refinement's Levenberg-Marquardt damping rule for gain ratio rho:
    (new mu, new nu, give up: too many rejected trials)."""
    if rho > 0:
        return mu * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 2.0, False
    if nu >= 8192:
        return mu, nu, True
    return mu * nu, nu * 2.0, False


def minimise_full_matrix(
    target: ScalingTarget,
    data: TargetData,
    x0: np.ndarray | None = None,
    engine: str = "LevMar",
    rmsd_tolerance: float = 1e-4,
    max_iterations: int | None = None,
    chunk_size: int = 4096,
) -> FullMatrixResult:
    """Levenberg–Marquardt (DIALS/lstbx rules) or Gauss–Newton on the exact Jacobian.

    LM: mu0 = 1e-3 max diag N; per iteration solve (N + mu I) h = -grad, stop on the RMSD
    criterion or max_iterations (default 100; GN 20); rho = actual/expected decrease,
    mu *= max(1/3, 1 - (2 rho - 1)^3) on success, else step back, mu *= nu, nu *= 2
    (abort when nu >= 8192). Raises ValueError for a parameter with no data (zero gradient
    element), like DIALS.
    """
    free = np.asarray(data.free, dtype=bool)
    anchor = np.asarray(data.anchor)
    x = np.where(free, np.asarray(anchor if x0 is None else x0, dtype=np.float64), anchor)
    host_build = host_normal_equations(target, data)
    if host_build is None:
        chunks = chunk_by_groups(data.problem, data.bases, anchor, free,
                                 chunk_size=_chunk_size(data.problem, chunk_size))
        ne = _normal_equations(target)
        free_j = jax.device_put(free)
    idx = np.flatnonzero(free)
    n_free = idx.size
    n_refl = int(n_reflections(data.problem))
    n_restraint_rows = int(np.count_nonzero((target.restraint_weights > 0) & free))
    n_eq = n_refl + n_restraint_rows
    if max_iterations is None:
        max_iterations = 100 if engine == "LevMar" else 20

    def build(xv):
        if host_build is not None:  # small problem: numpy, nothing to compile
            nm, grad, s = host_build(np.asarray(xv, dtype=np.float64), free)
        else:
            nm, grad, s = ne.build(jax.device_put(np.asarray(xv, dtype=np.float64)), chunks, free_j)
        nm = np.asarray(nm)[np.ix_(idx, idx)]
        return nm, np.asarray(grad)[idx], float(s)

    nm, grad, s = build(x)
    if np.any(grad == 0.0):
        raise ValueError("The normal equations have an indeterminate solution (a parameter has no data)")
    rmsd = lambda s_: float(np.sqrt(s_ / max(n_refl, 1)))  # noqa: E731
    history = [rmsd(s)]
    mu = 1e-3 * float(np.max(np.diag(nm))) if engine == "LevMar" else 0.0
    nu = 2.0
    it = 0
    reason = MAX_ITERATIONS
    damped = nm
    while True:
        f = 0.5 * s
        damped = nm + mu * np.eye(n_free)
        h = _solve_cholesky(damped, -grad) if engine == "LevMar" else _solve_min_norm(damped, -grad)
        if len(history) >= 2:
            r1, r2 = history[-1], history[-2]
            if r2 <= 0 or abs((r2 - r1) / r2) < rmsd_tolerance:
                reason = RMSD_CONVERGED
                break
        if it == max_iterations:
            reason = MAX_ITERATIONS
            break
        expected = 0.5 * float(h @ (mu * h - grad))
        if expected == 0:
            reason = OBJECTIVE_FLAT
            break
        x_try = x.copy()
        x_try[idx] += h
        it += 1
        # one pass gives the trial objective and, if the step is accepted, the normal
        # equations there (the objective is sum w r^2 + restraints: least squares)
        nm_try, grad_try, s_new = build(x_try)
        f_new = 0.5 * s_new
        if engine == "LevMar":
            rho = (f - f_new) / expected
            mu, nu, give_up = damping_update(mu, nu, rho)
            if give_up:
                reason = MAX_TRIAL_ITERATIONS
                break
            if rho <= 0:
                continue  # same point: N and gradient unchanged
        elif not f_new <= f:
            reason = OBJECTIVE_INCREASE
            break
        x, nm, grad, s = x_try, nm_try, grad_try, s_new
        history.append(rmsd(s))
    dof = n_eq - n_free
    chi2 = s / dof if dof > 0 else float("nan")
    return FullMatrixResult(
        x=x,
        rmsd_history=history,
        n_reflections=n_refl,
        reason=reason,
        n_iterations=it,
        free=free,
        normal_matrix=nm,
        damped_matrix=damped,
        chi2_reduced=chi2,
        n_equations=n_eq,
    )


# From this many unknowns on, dense solves use scipy's triangular LAPACK routines: numpy has
# none, and solving with the Cholesky factor through LU costs 4/3 n^3 flops per system
# (n = 2,000: 0.26 s per LM step, against scipy's ~0.15 s import once).
LARGE_DENSE_SYSTEM = 768


def _solve_cholesky(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a x = b for symmetric positive definite a (least squares if not PD)."""
    try:
        if a.shape[0] >= LARGE_DENSE_SYSTEM:
            from scipy.linalg import cho_factor, cho_solve

            return cho_solve(cho_factor(a, lower=True, check_finite=False), b, check_finite=False)
        c = np.linalg.cholesky(a)
        y = np.linalg.solve(c, b)
        return np.linalg.solve(c.T, y)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def _solve_min_norm(a: np.ndarray, b: np.ndarray, rcond: float = 1e-12) -> np.ndarray:
    """Minimum-norm solution of a x = b for symmetric PSD a (eigenvalues below rcond * max dropped).

    Undamped Gauss-Newton steps: with nothing fixed, the overall scale is degenerate with I_h
    and N has an eigenvalue ~1e-17 of its largest; Cholesky then either fails or returns a
    step dominated by rounding along that direction (DIALS 3.12: a random few-% change of
    the overall scale, or a failed round). The min-norm step does not move along it.
    """
    vals, vecs = np.linalg.eigh(a)
    keep = vals > rcond * max(float(vals[-1]), 0.0)
    return vecs[:, keep] @ ((vecs[:, keep].T @ b) / vals[keep])


def parameter_covariance(result: FullMatrixResult, damped: bool = True) -> np.ndarray:
    """Sigma_p = chi2_red N^-1 over all parameters (zero rows/columns for fixed ones).

    damped=True reproduces DIALS (inverse of the last solved, LM-damped matrix);
    damped=False uses the undamped J^T W J at the optimum (the textbook choice).
    """
    mat = result.damped_matrix if damped else result.normal_matrix
    idx = np.flatnonzero(result.free)
    inv = np.linalg.pinv(mat) if not damped else _inverse_spd(mat)
    cov = np.zeros((result.free.size, result.free.size))
    cov[np.ix_(idx, idx)] = result.chi2_reduced * inv
    return cov


def _inverse_spd(a: np.ndarray) -> np.ndarray:
    try:
        if a.shape[0] >= LARGE_DENSE_SYSTEM:
            # LAPACK's inverse from the Cholesky factor (potri, n^3/3 flops) rather than solving
            # against the identity (n^3): 1000 stills' 2,000 unknowns 0.15 instead of 0.46 s
            from scipy.linalg import lapack

            factor, info = lapack.dpotrf(a, lower=True, clean=True)
            if info == 0:
                inv, info = lapack.dpotri(factor, lower=True)
            if info != 0:
                raise np.linalg.LinAlgError(f"potrf/potri info {info}")
            inv = inv + inv.T  # potri fills the lower triangle; potrf(clean) left zeros above
            inv[np.diag_indices_from(inv)] *= 0.5
            return inv
        c_inv = np.linalg.inv(np.linalg.cholesky(a))
        return c_inv.T @ c_inv
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a)


def inverse_scale_variance(
    target: ScalingTarget,
    x: np.ndarray,
    covariance: np.ndarray,
    bases: Any,
    n_obs: int,
    chunk_size: int = 8192,
) -> np.ndarray:
    """var(g_i) = D_i Sigma D_i^T with D_i = dg_i/dp, for every observation of `bases`
    (f[n_obs]); computed in chunks of rows (one compiled program for all chunks, the last
    padded) so neither D nor a copy of the bases is held whole."""
    host = _host_variance(target, x, covariance, bases, n_obs)
    if host is not None:
        return host
    size = int(min(chunk_size, max(n_obs, 1)))
    fn = _variance_function(target, bases)
    x_d = jax.device_put(np.asarray(x, dtype=np.float64))
    cov_d = jax.device_put(np.asarray(covariance, dtype=np.float64))
    host = jax.tree.map(np.asarray, bases)
    out = np.empty(n_obs)
    for start in range(0, n_obs, size):  # loop over chunks of rows
        rows = np.minimum(np.arange(start, start + size), n_obs - 1)
        chunk = jax.tree.map(lambda a: jax.device_put(a[rows]), host)
        stop = min(start + size, n_obs)
        out[start:stop] = np.asarray(fn.call((x_d, cov_d, chunk), rows=n_obs))[: stop - start]
    return out


def _host_variance(target: ScalingTarget, x: np.ndarray, covariance: np.ndarray, bases: Any,
                   n_obs: int) -> np.ndarray | None:
    """numpy twin of the variance program (`_variance_function`, dense rows): var(g_i) =
    D_i Sigma D_i^T with D_i = dg_i/dp from the links' closed-form slot slopes, for jobs small
    enough (`compilation.host_evaluation`) that tracing and compiling the program costs more
    than this; None where it does not apply."""
    links = _host_links(target, bases, n_obs)
    if links is None:
        return None
    host = {k: {name: np.asarray(v) for name, v in bases[k].items()} for k in target.components}
    _, slopes = _host_slot_derivatives(target, links, np.asarray(x, dtype=np.float64), host)
    d = np.concatenate(list(slopes.values()), axis=1)  # f[n_obs, S]: every component's slot slopes
    cols = np.concatenate([host[k]["idx"].astype(np.int64) + target.slices[k].start for k in slopes], axis=1)
    n, n_slots = target.n_params, cols.shape[1]
    cov = np.asarray(covariance, dtype=np.float64)
    dense = _dense_variance_rows(n, n_slots)
    out = np.empty(n_obs)
    size = max(1, min(n_obs, (1 << 20) // max(n if dense else n_slots * n_slots, 1)))  # chunks of <= 8 MB
    for start in range(0, n_obs, size):  # loop over chunks of rows
        stop = min(start + size, n_obs)
        d_c, cols_c = d[start:stop], cols[start:stop]
        if dense:  # dense rows of D
            cells = np.arange(stop - start)[:, None] * n + cols_c
            rows = np.bincount(cells.ravel(), d_c.ravel(), (stop - start) * n).reshape(stop - start, n)
            out[start:stop] = np.einsum("ij,ij->i", rows @ cov, rows)
        else:  # sum over slot pairs d_a Sigma_ab d_b
            out[start:stop] = np.einsum("ia,iab,ib->i", d_c, cov[cols_c[:, :, None], cols_c[:, None, :]], d_c)
    return out


def _dense_variance_rows(n_params: int, n_slots: int) -> bool:
    """Whether var(g) goes through dense rows D (C x n: C n^2 BLAS flops) rather than slot
    pairs (C S^2 gathers, each ~50x dearer than a flop)."""
    return n_params <= 8 * n_slots


def precompile_variance(target: ScalingTarget, bases: Any, n_obs: int, chunk_size: int = 8192) -> None:
    """Compile `inverse_scale_variance(target, x, covariance, bases, n_obs)` in the background
    (nothing to compile where its numpy twin runs)."""
    if _host_links(target, bases, n_obs) is not None:
        return
    size = int(min(chunk_size, max(n_obs, 1)))
    n = target.n_params
    chunk = jax.tree.map(lambda a: jax.ShapeDtypeStruct((size, *np.shape(a)[1:]), a.dtype), bases)
    precompile(_variance_function(target, bases), jax.ShapeDtypeStruct((n,), np.float64),
               jax.ShapeDtypeStruct((n, n), np.float64), chunk, rows=n_obs)


def _variance_function(target: ScalingTarget, bases: Any):
    """Jitted (x, Sigma, chunk bases) -> var(g) f[C], cached per target."""
    hit = _VAR_CACHE.get(id(target))
    if hit is not None and hit[0] is target:
        return hit[1]
    slots = _has_slot_bases(target, bases)
    n_slots = sum(int(np.shape(bases[k]["idx"])[1]) for k in target.components) if slots else 0
    dense = _dense_variance_rows(target.n_params, n_slots)

    def run(x, cov, chunk_bases):
        if not slots:
            d = jax.jacfwd(target._inverse_scale)(x, chunk_bases)  # f[C, n]
            return jnp.sum((d @ cov) * d, axis=1)
        _, d, cols = slot_derivatives(target, x, chunk_bases)  # f[C, S], i[C, S]
        if dense:
            big_d = _dense_rows(d, cols, x.size)  # f[C, n]
            return jnp.sum((big_d @ cov) * big_d, axis=1)
        sigma = cov[cols[:, :, None], cols[:, None, :]]  # f[C, S, S]
        return jnp.einsum("ia,iab,ib->i", d, sigma, d)

    program = Program(run)  # called with the job's total rows, which choose the compile options
    _VAR_CACHE[id(target)] = (target, program)
    return program


_VAR_CACHE: dict[int, tuple] = {}


def propagate_variance(
    variance: np.ndarray,
    intensity: np.ndarray,
    g: np.ndarray,
    g_variance: np.ndarray | None,
    error_model: tuple[float, float] | None,
) -> np.ndarray:
    """Output variance of the unscaled intensity (target.md §5.5), as DIALS:
    V <- a^2 (V + (b I)^2) if an error model exists, then V <- V (1 + sqrt(var g)/g)."""
    v = np.asarray(variance, dtype=np.float64)
    if error_model is not None:
        a, b = error_model
        v = a * a * (v + (b * np.asarray(intensity)) ** 2)
    if g_variance is not None:
        ok = np.asarray(g) != 0
        rel = np.where(ok, np.sqrt(np.maximum(g_variance, 0.0)) / np.where(ok, g, 1.0), 0.0)
        v = v * (1.0 + rel)
    return v
