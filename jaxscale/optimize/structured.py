"""Gauss–Newton / Levenberg–Marquardt and parameter variances for many small parameter blocks.

Serial data: 10^4–10^6 stills, each with a few parameters (KB: k, B), coupled only through the
group means I_h of the profiled residual. The normal matrix N = J^T J is then "block diagonal
plus coupling": N_ee (b x b per still) is cheap, the coupling between stills runs through the
groups they share. N is never formed: N v = J^T (J v) is one `jax.linearize` (J v) and its
`jax.linear_transpose` (J^T u) per product, and the LM system (N + mu I) h = -J^T r is solved by
preconditioned conjugate gradients with the block-Jacobi preconditioner (inverses of the
diagonal blocks), inside one jitted `lax.while_loop`.

Parameters are one array x f[n_blocks, b]; `free` bool[n_blocks, b] masks fixed parameters
(the system is solved on free entries, identity rows for fixed ones).

Variances diag(N_FF^-1) (N restricted to free parameters, the covariance up to chi2):
* "exact": dense inverse (small problems only; the reference for tests);
* "block": inverses of the diagonal blocks (ignores all coupling; a lower bound);
* "block_gauge": the block inverses transformed to the fixed gauge. N has a (near) null space
  U (n_params x r: for KB, a common scale factor and a common B), removed by fixing r
  parameters. The fixed-gauge covariance is P N^+ P^T with P = I - U (E^T U)^-1 E^T
  (E selects the fixed parameters); approximating N^+ by the block inverse M^-1 gives
  diag(P M^-1 P^T) in closed form: every still's variance gains the (transformed) variance of
  the reference still. No solves.
* "stochastic": block_gauge plus a Hutchinson estimate of the remainder,
  diag(N_FF^-1) ~ diag(Q) + mean_z z * (N_FF^-1 z - Q z), Q = P M^-1 P^T, with Rademacher
  probes z and PCG solves. Unbiased; Q as control variate keeps its noise small because
  N_FF^-1 - Q has small entries.
The error of each against "exact" is measured in tests/optimize/test_structured.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.compilation import Program, precompile
from jaxscale.optimize.lbfgs import MAX_ITERATIONS, RMSD_CONVERGED
from jaxscale.optimize.levmar import MAX_TRIAL_ITERATIONS, OBJECTIVE_FLAT, OBJECTIVE_INCREASE, damping_update

ResidualFn = Callable[[jax.Array, Any], jax.Array]  # (x f[n_blocks, b], data) -> r f[n_rows]
BlockFn = Callable[[jax.Array, Any], jax.Array]  # (x, data) -> f[n_blocks, b, b] diag blocks of J^T J

# Largest problem (rows of the residual data) whose solver programs compile with the fast
# options (compilation.FAST_COMPILE_OPTIONS). The LM step (linearised residuals, their
# transpose and a PCG loop) takes 1.3-1.6 s to compile with XLA's defaults and 0.3-0.5 s with
# the fast options, and a job runs it ~10 times: at 10^5 rows 60 instead of 27 ms a step.
FAST_COMPILE_MAX_ROWS = 1 << 17
# solvers kept (one per residual/block function pair), so that a process traces each once
MAX_CACHED_SOLVERS = 8
# Largest problem (rows) whose diagonal blocks outside the LM iterations (variances) are taken
# from the step program run without CG iterations instead of a program of their own: one
# program fewer to trace and compile (~0.15 s) for an evaluation ~3x the blocks' cost, which
# at these sizes is ~1 ms.
BLOCKS_BY_STEP_MAX_ROWS = 1 << 17


# ------------------------------------------------------------------ linear algebra pieces
def pcg(
    matvec: Callable[[jax.Array], jax.Array],
    rhs: jax.Array,
    precond: Callable[[jax.Array], jax.Array],
    tol: float,
    max_iterations: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Preconditioned conjugate gradients for SPD A x = rhs (any array shape).

    Stops when |r| <= tol |rhs| or after max_iterations; returns (x, iterations, |r|/|rhs|).
    """
    x, it, r, b_norm = _pcg(matvec, rhs, precond, tol, max_iterations)
    return x, it, jnp.sqrt(jnp.sum(r * r)) / jnp.where(b_norm > 0, b_norm, 1.0)


def _pcg(matvec, rhs, precond, tol, max_iterations):
    """pcg's loop; returns (x, iterations, final residual r = rhs - A x (recurrence), |rhs|)."""
    dot = lambda a, b: jnp.sum(a * b)  # noqa: E731
    b_norm = jnp.sqrt(dot(rhs, rhs))
    x = jnp.zeros_like(rhs)
    r = rhs
    z = precond(r)
    rz = dot(r, z)

    def cond(state):
        _, r, _, _, it = state
        return (it < max_iterations) & (jnp.sqrt(dot(r, r)) > tol * b_norm)

    def body(state):
        x, r, p, rz, it = state
        ap = matvec(p)
        alpha = rz / dot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        z = precond(r)
        rz_new = dot(r, z)
        p = z + (rz_new / rz) * p
        return x, r, p, rz_new, it + 1

    x, r, _, _, it = jax.lax.while_loop(cond, body, (x, r, z, rz, jnp.asarray(0)))
    return x, it, r, b_norm


def masked_blocks(blocks: jax.Array, free: jax.Array, mu: jax.Array | float = 0.0) -> jax.Array:
    """F (N_ee + mu I) F + (I - F) per block: f[n_blocks, b, b] (fixed rows -> identity)."""
    b = blocks.shape[-1]
    eye = jnp.eye(b, dtype=blocks.dtype)
    f = free.astype(blocks.dtype)
    fm = f[:, :, None] * f[:, None, :]
    return fm * (blocks + mu * eye) + (1.0 - f)[:, :, None] * eye


def block_solve(blocks_inv: jax.Array, v: jax.Array) -> jax.Array:
    """Apply block-diagonal inverses f[n, b, b] to v f[n, b]."""
    return jnp.einsum("nij,nj->ni", blocks_inv, v)


def _inv_blocks(blocks: jax.Array) -> jax.Array:
    """Batched inverse of small SPD blocks; a singular block (no data) gets a pseudo-inverse.

    2 x 2 blocks (KB) in closed form: the eigen-decomposition of `jnp.linalg.pinv` costs
    ~0.2 s of compilation in every program that preconditions with it. Same rank decision
    as pinv (eigenvalues below 20 eps of the largest are dropped)."""
    if blocks.shape[-1] != 2:
        return jnp.linalg.pinv(blocks, hermitian=True)
    a, d = blocks[..., 0, 0], blocks[..., 1, 1]
    b = 0.5 * (blocks[..., 0, 1] + blocks[..., 1, 0])
    half_trace, radius = 0.5 * (a + d), jnp.hypot(0.5 * (a - d), b)
    large, small = half_trace + radius, half_trace - radius  # eigenvalues, large >= small
    cutoff = 20.0 * jnp.finfo(blocks.dtype).eps * jnp.maximum(jnp.abs(large), jnp.abs(small))
    full_rank = jnp.abs(small) > cutoff
    rank_one = ~full_rank & (jnp.abs(large) > cutoff)
    det = jnp.where(full_rank, a * d - b * b, 1.0)
    inverse = jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-b, a], -1)], -2) / det[..., None, None]
    # rank one: v v^T / large with v v^T = (A - small I) / (large - small)
    eye = jnp.eye(2, dtype=blocks.dtype)
    scale = jnp.where(rank_one, 1.0 / jnp.where(rank_one, (large - small) * large, 1.0), 0.0)
    symmetric = jnp.stack([jnp.stack([a, b], -1), jnp.stack([b, d], -1)], -2)
    projected = (symmetric - small[..., None, None] * eye) * scale[..., None, None]
    return jnp.where(full_rank[..., None, None], inverse, projected)


# ------------------------------------------------------------------ the normal-equation operator
def normal_system(residual_fn: ResidualFn, x: jax.Array, data: Any):
    """(r, N v -> J^T J v, u -> J^T u) at x; J from jax.linearize (forward) and its transpose."""
    r, jvp = jax.linearize(lambda y: residual_fn(y, data), x)
    vjp = jax.linear_transpose(jvp, x)
    return r, (lambda v: vjp(jvp(v))[0]), (lambda u: vjp(u)[0])


@dataclasses.dataclass
class StructuredResult:
    """Result of the block-structured GN/LM round."""

    x: np.ndarray  # f[n_blocks, b]
    rmsd_history: list[float]
    n_reflections: int
    reason: str
    n_iterations: int
    cg_iterations: list[int]
    free: np.ndarray  # bool[n_blocks, b]
    chi2_reduced: float
    n_equations: int
    mu: float  # final LM damping (0 for GN)


def _on_device(a: Any) -> jax.Array:
    """An array on the device, copied without a program (`jnp.asarray` of a numpy array
    compiles a conversion program per shape and dtype: ~15 ms each on a cold start)."""
    return a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a))


def _default_tol(dtype) -> float:
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def data_rows(x: jax.Array, data: Any, *rest: Any) -> int:
    """Rows of a call f(x, data, ...): the longest leading axis among data's arrays (the size
    that chooses a program's compile options)."""
    return max((int(a.shape[0]) for a in jax.tree.leaves(data) if getattr(a, "ndim", 0) > 0), default=0)


class StructuredSolver:
    """Jitted LM/GN step and variance estimators for one residual function.

    One instance per (residual_fn, block_fn) pair (the last `MAX_CACHED_SOLVERS` pairs):
    constructing it again returns the same object and its compiled programs, so a process
    traces each program once (bound methods of one object compare equal). Problems up to
    `FAST_COMPILE_MAX_ROWS` rows compile with the fast options.
    """

    _instances: dict[tuple, "StructuredSolver"] = {}

    def __new__(cls, residual_fn: ResidualFn, block_fn: BlockFn):
        key = (cls, residual_fn, block_fn)
        solver = cls._instances.pop(key, None)
        if solver is None:
            solver = super().__new__(cls)
            solver._configure(residual_fn, block_fn)
        cls._instances[key] = solver  # most recently used last
        while len(cls._instances) > MAX_CACHED_SOLVERS:
            cls._instances.pop(next(iter(cls._instances)))
        return solver

    def __init__(self, residual_fn: ResidualFn, block_fn: BlockFn):
        pass  # configured once, in __new__

    def _configure(self, residual_fn: ResidualFn, block_fn: BlockFn) -> None:
        self.residual_fn = residual_fn
        self.block_fn = block_fn
        program = lambda fn, **kw: Program(fn, rows=data_rows, max_fast_rows=FAST_COMPILE_MAX_ROWS, **kw)  # noqa: E731
        # jitted once here: called eagerly, block_fn would compile each of its ~20 operations
        self.blocks = program(block_fn)
        self.step = program(self._step, static_argnames=("max_cg",))
        self.sum_sq = program(self._sum_sq)
        self.solve = program(self._solve, static_argnames=("max_cg",))

    def _sum_sq(self, x, data):
        return jnp.sum(self.residual_fn(x, data) ** 2)

    def _step(self, x, data, free, mu, tol, max_cg: int):
        """Solve (N + mu I) h = -J^T r on free entries; returns (h, sum r^2, expected, cg its, cg res, blocks).
        mu < 0: LM's initial damping `initial_damping(blocks, free)` from this x's blocks (no
        separate blocks evaluation first)."""
        f = free.astype(x.dtype)
        r, nv, jt = normal_system(self.residual_fn, x, data)
        grad = jt(r) * f
        blocks = self.block_fn(x, data)
        diag = jnp.where(free, jnp.diagonal(blocks, axis1=1, axis2=2), -jnp.inf)
        mu = jnp.where(mu < 0, jnp.where(jnp.any(free), 1e-3 * jnp.max(diag), 0.0), mu)
        inv = _inv_blocks(masked_blocks(blocks, free, mu))

        def matvec(v):
            return f * nv(f * v) + mu * f * v + (1.0 - f) * v

        h, its, cg_r, b_norm = _pcg(matvec, -grad, lambda v: block_solve(inv, v), tol, max_cg)
        h = h * f
        # expected decrease -(g.h + h.N h / 2) with N h = -g - cg_r - mu h on the free entries
        # (the CG residual cg_r = -g - (N + mu) h): no third pass of J and J^T through the data
        expected = -0.5 * jnp.sum(grad * h) + 0.5 * jnp.sum(h * f * cg_r) + 0.5 * mu * jnp.sum(h * h)
        res = jnp.sqrt(jnp.sum(cg_r * cg_r)) / jnp.where(b_norm > 0, b_norm, 1.0)
        return h, jnp.sum(r * r), expected, its, res, blocks

    def _solve(self, x, data, free, rhs, tol, max_cg: int):
        """N_FF^-1 rhs for a batch of right-hand sides rhs f[n_rhs, n_blocks, b] (0 on fixed)."""
        f = free.astype(x.dtype)
        _, nv, _ = normal_system(self.residual_fn, x, data)
        inv = _inv_blocks(masked_blocks(self.block_fn(x, data), free))

        def one(b):
            y, _, _ = pcg(lambda v: f * nv(f * v) + (1.0 - f) * v, b * f, lambda v: block_solve(inv, v), tol, max_cg)
            return y * f

        return jax.lax.map(one, rhs)

    def diagonal_blocks(self, x, data, free, max_cg: int = 500) -> np.ndarray:
        """f[n_blocks, b, b] the diagonal blocks of J^T J at x. Up to BLOCKS_BY_STEP_MAX_ROWS rows
        by the step program (max_cg: as its other calls), run without CG iterations (tol = inf);
        above by the blocks program."""
        if data_rows(x, data) <= BLOCKS_BY_STEP_MAX_ROWS:
            return np.asarray(self.step(x, data, free, 0.0, np.inf, max_cg=max_cg)[5])
        return np.asarray(self.blocks(x, data))


def initial_damping(blocks: np.ndarray, free: np.ndarray) -> float:
    """DIALS' initial LM damping: 1e-3 x the largest diagonal element of N on free parameters."""
    diag = np.diagonal(np.asarray(blocks), axis1=1, axis2=2)[np.asarray(free)]
    return 1e-3 * float(diag.max()) if diag.size else 0.0


def precompile_step(solver: StructuredSolver, x: Any, data: Any, free: Any, max_cg: int = 500,
                    sum_sq: bool = True) -> None:
    """Compile the programs `minimise_structured` runs (the LM step, the trial sum of squares,
    the diagonal blocks) for these shapes in a background thread (`compilation.precompile`),
    e.g. while first-order rounds run. x, free: arrays or `jax.ShapeDtypeStruct`s; the damping
    and tolerance are Python floats in the calls (weakly typed scalars). sum_sq=False: the
    caller gives minimise_structured its own sum of squares."""
    x = jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    scalar = jax.ShapeDtypeStruct((), x.dtype, weak_type=True)
    free = jax.ShapeDtypeStruct(np.shape(free), np.bool_)
    precompile(solver.step, x, data, free, scalar, scalar, max_cg=max_cg)
    if sum_sq:
        precompile(solver.sum_sq, x, data)
    if data_rows(x, data) > BLOCKS_BY_STEP_MAX_ROWS:  # else solver.diagonal_blocks runs the step
        precompile(solver.blocks, x, data)


def minimise_structured(
    residual_fn: ResidualFn,
    block_fn: BlockFn,
    x0: np.ndarray,
    data: Any,
    free: np.ndarray,
    n_reflections: int,
    *,
    engine: str = "LevMar",
    rmsd_tolerance: float = 1e-4,
    max_iterations: int | None = None,
    cg_tolerance: float | None = None,
    max_cg_iterations: int = 500,
    solver: StructuredSolver | None = None,
    sum_sq: Callable[[Any, Any], Any] | None = None,
) -> StructuredResult:
    """LM (DIALS/lstbx rules, as optimize.levmar) or GN with PCG-solved steps.

    LM: mu0 = 1e-3 max diag N; stop on the RMSD criterion or max_iterations (default 100;
    GN 20); rho = actual/expected decrease; mu *= max(1/3, 1 - (2 rho - 1)^3) on success,
    else mu *= nu, nu *= 2, abort at nu >= 8192. The objective is ½ sum r^2.
    sum_sq(x, data) -> sum r^2 at a trial point: default the solver's program; a caller that
    already has a compiled program computing it passes it, so that none is compiled for it.
    """
    solver = solver or StructuredSolver(residual_fn, block_fn)
    sum_sq = sum_sq or solver.sum_sq
    free_j = _on_device(free)
    x = _on_device(x0)
    tol = _default_tol(x.dtype) if cg_tolerance is None else cg_tolerance
    if max_iterations is None:
        max_iterations = 100 if engine == "LevMar" else 20
    rmsd = lambda s_: float(np.sqrt(max(s_, 0.0) / max(n_reflections, 1)))  # noqa: E731

    nu = 2.0
    # LM: the first step takes mu0 from its own blocks (mu < 0), returned to set mu here
    h, s, expected, its, _, blocks = solver.step(x, data, free_j, -1.0 if engine == "LevMar" else 0.0, tol,
                                                 max_cg=max_cg_iterations)
    mu = initial_damping(blocks, free) if engine == "LevMar" else 0.0
    s = float(s)
    history = [rmsd(s)]
    cg_its = [int(its)]
    it = 0
    reason = MAX_ITERATIONS
    while True:
        if len(history) >= 2:
            r1, r2 = history[-1], history[-2]
            if r2 <= 0 or abs((r2 - r1) / r2) < rmsd_tolerance:
                reason = RMSD_CONVERGED
                break
        if it == max_iterations:
            break
        expected_f = float(expected)
        if not expected_f > 0:
            reason = OBJECTIVE_FLAT
            break
        x_try = np.asarray(x) + np.asarray(h)  # in numpy: no program compiled for one addition
        it += 1
        s_new = float(sum_sq(x_try, data))
        if engine == "LevMar":
            rho = 0.5 * (s - s_new) / expected_f
            mu, nu, give_up = damping_update(mu, nu, rho)
            if give_up:
                reason = MAX_TRIAL_ITERATIONS
                break
            if rho > 0:
                x = x_try
            else:
                h, _, expected, its, _, _ = solver.step(x, data, free_j, mu, tol, max_cg=max_cg_iterations)
                cg_its.append(int(its))
                continue
        else:
            if not s_new <= s:
                reason = OBJECTIVE_INCREASE
                break
            x = x_try
        h, s, expected, its, _, _ = solver.step(x, data, free_j, mu, tol, max_cg=max_cg_iterations)
        s = float(s)
        cg_its.append(int(its))
        history.append(rmsd(s))
    n_free = int(np.count_nonzero(free))
    dof = n_reflections - n_free
    return StructuredResult(
        x=np.asarray(x), rmsd_history=history, n_reflections=n_reflections, reason=reason, n_iterations=it,
        cg_iterations=cg_its, free=np.asarray(free), chi2_reduced=s / dof if dof > 0 else float("nan"),
        n_equations=n_reflections, mu=float(mu),
    )


# ------------------------------------------------------------------ variances
def _gauge_diagonal(minv: np.ndarray, gauge: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, Callable]:
    """diag(Q) and v -> Q v for Q = P M^-1 P^T (module docstring); minv f[n, b, b] unmasked.

    gauge f[n, b, r]: the r null-space directions of N; the fixed parameters (r of them)
    must pin the gauge (E^T U invertible).
    """
    n, b = free.shape
    fixed = np.flatnonzero(~free.reshape(-1))
    u = gauge.reshape(n * b, -1)  # f[n_params, r]
    t = np.linalg.inv(u[fixed])  # (E^T U)^-1, r x r
    # M^-1 E: columns of the block inverse at the fixed parameters (n_params x r)
    minv_e = np.zeros((n * b, fixed.size))
    blk, comp = np.divmod(fixed, b)
    for j in range(fixed.size):  # r (= 2) columns
        minv_e[blk[j] * b : (blk[j] + 1) * b, j] = minv[blk[j], :, comp[j]]
    wt_minv = t @ minv_e.T  # W^T M^-1 (r x n_params), W = E (E^T U)^-T
    inner = t @ minv_e[fixed].T @ t.T if fixed.size else np.zeros((0, 0))  # W^T M^-1 W
    m_diag = np.diagonal(minv, axis1=1, axis2=2).reshape(-1)
    diag = m_diag - 2.0 * np.sum(u * wt_minv.T, axis=1) + np.einsum("ia,ab,ib->i", u, inner, u)
    diag = np.where(free.reshape(-1), diag, 0.0).reshape(n, b)

    def apply(v: jax.Array) -> jax.Array:  # Q v = P M^-1 P^T v, v f[n, b]
        vf = v.reshape(-1)
        # P^T v = v - E T^T U^T v (subtract at the fixed parameters)
        pt_v = vf.at[fixed].add(-(jnp.asarray(t.T) @ (jnp.asarray(u.T) @ vf)))
        y = block_solve(jnp.asarray(minv), pt_v.reshape(n, b)).reshape(-1)
        # P y = y - U T E^T y
        py = y - jnp.asarray(u) @ (jnp.asarray(t) @ y[fixed])
        return py.reshape(n, b)

    return diag, apply


def variance_diagonal(
    residual_fn: ResidualFn,
    block_fn: BlockFn,
    x: np.ndarray,
    data: Any,
    free: np.ndarray,
    *,
    method: str = "block_gauge",
    gauge: np.ndarray | None = None,
    n_probes: int = 16,
    seed: int = 0,
    cg_tolerance: float | None = None,
    max_cg_iterations: int = 1000,
    solver: StructuredSolver | None = None,
    blocks: np.ndarray | None = None,
) -> np.ndarray:
    """diag(N_FF^-1) f[n_blocks, b] (0 for fixed parameters); multiply by chi2 for variances.

    method: "exact" | "block" | "block_gauge" | "stochastic" (module docstring); the gauge
    methods need `gauge` f[n_blocks, b, r] (the null-space directions pinned by the fixed
    parameters). blocks: the diagonal blocks of J^T J at x when the caller has them.
    """
    free = np.asarray(free, dtype=bool)
    x = _on_device(x)
    if blocks is None:
        blocks = solver.diagonal_blocks(x, data, free) if solver is not None else jax.jit(block_fn)(x, data)
    blocks = np.asarray(blocks, dtype=np.float64)
    if method == "exact":
        n = free.size
        _, nv, _ = normal_system(residual_fn, x, data)
        eye = jnp.eye(n, dtype=x.dtype).reshape(n, *free.shape)
        dense = np.asarray(jax.vmap(nv)(eye)).reshape(n, n)
        idx = np.flatnonzero(free.reshape(-1))
        out = np.zeros(n)
        out[idx] = np.diag(np.linalg.inv(dense[np.ix_(idx, idx)]))
        return out.reshape(free.shape)
    if method == "block":  # numpy: a few 2x2 inverses do not need a compiled program
        f = free.astype(np.float64)
        masked = f[:, :, None] * f[:, None, :] * blocks + (1.0 - f)[:, :, None] * np.eye(free.shape[1])
        inv = np.linalg.pinv(masked, hermitian=True)
        return np.where(free, np.diagonal(inv, axis1=1, axis2=2), 0.0)
    if gauge is None:
        raise ValueError(f"variance method {method!r} needs the gauge (null-space) directions")
    minv = np.linalg.pinv(blocks, hermitian=True)
    diag_q, apply_q = _gauge_diagonal(minv, np.asarray(gauge, dtype=np.float64), free)
    if method == "block_gauge":
        return diag_q
    if method != "stochastic":
        raise ValueError(f"unknown variance method {method!r}")
    solver = solver or StructuredSolver(residual_fn, block_fn)
    tol = _default_tol(x.dtype) if cg_tolerance is None else cg_tolerance
    rng = np.random.default_rng(seed)
    z = rng.choice(np.array([-1.0, 1.0]), size=(n_probes,) + free.shape) * free
    y = np.asarray(solver.solve(x, data, jnp.asarray(free), jnp.asarray(z, dtype=x.dtype), tol, max_cg=max_cg_iterations))
    qz = np.asarray(jax.vmap(apply_q)(jnp.asarray(z)))
    correction = np.mean(z * (y - qz), axis=0)
    return np.where(free, diag_q + correction, 0.0)
