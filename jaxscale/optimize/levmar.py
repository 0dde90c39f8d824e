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

from jaxscale.optimize.lbfgs import MAX_ITERATIONS, RMSD_CONVERGED, OptimisationResult
from jaxscale.target.objective import ChunkData, ScalingTarget, TargetData, chunk_by_groups, n_reflections

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


class NormalEquations:
    """Jitted builder of (N = J^T J, grad = J^T r, sum r^2) over chunks, for one target."""

    def __init__(self, target: ScalingTarget):
        self.target = target
        self.build = jax.jit(self._build)

    def _build(self, x: jax.Array, chunks: ChunkData, free: jax.Array):
        t = self.target
        n = x.size

        def body(carry, chunk_target):
            nm, grad, s = carry
            chunk = ChunkData(target=chunk_target)
            r = t.chunk_residuals(x, chunk)  # f[C]
            jac = jax.jacfwd(t.chunk_residuals)(x, chunk)  # f[C, n]
            return (nm + jac.T @ jac, grad + jac.T @ r, s + r @ r), None

        init = (jnp.zeros((n, n)), jnp.zeros(n), jnp.zeros(()))
        (nm, grad, s), _ = jax.lax.scan(body, init, chunks.target)
        # restraint rows sqrt(w_p) p_eff with derivative sqrt(w_p) on free parameters
        wp = t.restraint_weights * free
        x_eff = jnp.where(free, x, chunks.target.anchor[0])
        nm = nm + jnp.diag(wp)
        grad = grad + wp * x_eff
        s = s + jnp.sum(t.restraint_weights * x_eff**2)
        return nm, grad, s


_NE_CACHE: dict[int, tuple] = {}


def _normal_equations(target: ScalingTarget) -> NormalEquations:
    hit = _NE_CACHE.get(id(target))
    if hit is not None and hit[0] is target:
        return hit[1]
    ne = NormalEquations(target)
    _NE_CACHE[id(target)] = (target, ne)
    return ne


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
    chunks = chunk_by_groups(data.problem, data.bases, anchor, free, chunk_size=chunk_size)
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
            if rho > 0:
                mu *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
                nu = 2.0
            else:
                if nu >= 8192:
                    reason = MAX_TRIAL_ITERATIONS
                    break
                mu *= nu
                nu *= 2.0
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


def _solve_cholesky(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a x = b for symmetric positive definite a (least squares if not PD)."""
    try:
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
    (f[n_obs]); computed in chunks of rows so D is never held whole."""
    n_chunks = max(1, -(-n_obs // chunk_size))
    size = min(chunk_size, max(n_obs, 1))
    rows = np.minimum(np.arange(n_chunks * size).reshape(n_chunks, size), max(n_obs - 1, 0))
    chunk_bases = jax.tree.map(lambda a: jax.device_put(np.asarray(a)[rows]), bases)
    var = _variance_chunks(target, jax.device_put(np.asarray(x, dtype=np.float64)),
                           jax.device_put(np.asarray(covariance, dtype=np.float64)), chunk_bases)
    return np.asarray(var).reshape(-1)[:n_obs]


def _variance_chunks(target, x, cov, chunk_bases):
    fn = _VAR_CACHE.get(id(target))
    if fn is None or fn[0] is not target:

        @jax.jit
        def run(x, cov, chunk_bases):
            def one(b):
                d = jax.jacfwd(target._inverse_scale)(x, b)  # f[C, n]
                return jnp.einsum("ip,pq,iq->i", d, cov, d)

            return jax.lax.map(one, chunk_bases)

        _VAR_CACHE[id(target)] = (target, run)
        fn = _VAR_CACHE[id(target)]
    return fn[1](x, cov, chunk_bases)


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
