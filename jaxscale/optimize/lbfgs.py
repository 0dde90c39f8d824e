"""L-BFGS scaling rounds: optax L-BFGS directions, a More-Thuente line search, DIALS' stops.

DIALS minimises with scitbx's L-BFGS (Nocedal's LBFGS with More and Thuente's MCSRCH line
search: ftol 1e-4, gtol 0.9, xtol 1e-16, stpmin 1e-20, stpmax 1e20, at most 20 evaluations,
first step 1/|g|, later steps start at 1). The direction here is optax's
`scale_by_lbfgs` (the same two-loop recursion with the s.y/y.y initial scaling and, on the
first iteration, the 1/|g| scaling); `scale_by_more_thuente_linesearch` is the line search
as an optax transformation, so the accepted steps, and with them where a round stops,
follow scitbx's.

Stopping as DIALS: after each accepted step the RMSD is journalled; a round stops when the
relative change between the last two journalled RMSDs is below `rmsd_tolerance` (the start
point is not journalled, so the earliest stop is after two steps), when
|g| <= 1e-5 max(1, |x|) (scitbx's traditional test), at `max_iterations`, or when the line
search fails (scitbx restores the best point and ends the round).

`minimise_lbfgs` runs the iterations and the line search as a host loop around the target's
one compiled `value_and_grad` plus a small jitted optax direction update: the search logic
is plain numpy on scalars (`more_thuente_search_host`), so nothing besides the objective is
traced or compiled per problem. Up to `compilation.HOST_MAX_ROWS` parameters (every rotation
job) the direction is optax's computed by its numpy twin (`_host_lbfgs_direction`, the same
operations; tested against optax), since tracing, lowering and compiling the optax program
(~0.2 s, and ~0.05 s to import optax) cost more than all the directions of a run; optax is
then not imported at all. `scale_by_more_thuente_linesearch` is the same search
(shared code, `xp=jax.numpy`) as a traceable optax transformation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from jaxscale.compilation import Program, host_evaluation, precompile
from jaxscale.optimize.host_twins import host_value_and_grad
from jaxscale.target.objective import ScalingTarget, TargetData, n_reflections

if TYPE_CHECKING:  # annotations only: optax is imported where it is used
    import optax

RMSD_CONVERGED = "RMSD no longer decreasing"
GRADIENT_SMALL = "gradient norm below tolerance"
MAX_ITERATIONS = "Reached maximum number of iterations"
NOT_FINITE = "objective not finite"
LINESEARCH_FAILED = "line search failed (best point kept)"


# ------------------------------------------------------------------ More-Thuente line search
class MoreThuenteState(NamedTuple):
    """Value and gradient at the accepted point (read by `optax.value_and_grad_from_state`),
    the accepted step length, evaluations used and whether the search failed."""

    value: jax.Array  # f[]
    grad: Any  # pytree like params
    step: jax.Array  # f[]
    n_evaluations: jax.Array  # i[]
    failed: jax.Array  # bool[]
    count: jax.Array  # i[] searches done


def _cubic_minimiser(s_a, f_a, d_a, s_b, f_b, d_b, clip_sqrt=False, xp=jnp):
    """Step of the minimiser of the cubic through (s_a, f_a, d_a), (s_b, f_b, d_b)."""
    theta = 3.0 * (f_a - f_b) / (s_b - s_a) + d_a + d_b
    s = xp.maximum(xp.maximum(xp.abs(theta), xp.abs(d_a)), xp.abs(d_b))
    s = xp.where(s > 0, s, 1.0)
    disc = (theta / s) ** 2 - (d_a / s) * (d_b / s)
    gamma = s * xp.sqrt(xp.maximum(disc, 0.0) if clip_sqrt else disc)
    return theta, gamma


def _mcstep(stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stpmin, stpmax, xp=jnp):
    """One update of the interval of uncertainty and the trial step (More & Thuente's
    CSTEP as in scitbx's mcstep). Returns (stx, fx, dx, sty, fy, dy, stp, brackt, info).
    xp: jax.numpy (traced) or numpy (host scalars); the arithmetic is the same."""
    invalid = (brackt & ((stp <= xp.minimum(stx, sty)) | (stp >= xp.maximum(stx, sty)))) | (
        dx * (stp - stx) >= 0.0) | (stpmax < stpmin)
    sgnd = dp * xp.sign(dx)
    case1 = fp > fx
    case2 = ~case1 & (sgnd < 0.0)
    case3 = ~case1 & ~case2 & (xp.abs(dp) < xp.abs(dx))
    # case 1: higher function value; minimum bracketed
    theta, gamma = _cubic_minimiser(stx, fx, dx, stp, fp, dp, xp=xp)
    gamma1 = xp.where(stp < stx, -gamma, gamma)
    r = ((gamma1 - dx) + theta) / (((gamma1 - dx) + gamma1) + dp)
    stpc1 = stx + r * (stp - stx)
    stpq1 = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
    stpf1 = xp.where(xp.abs(stpc1 - stx) < xp.abs(stpq1 - stx), stpc1, stpc1 + (stpq1 - stpc1) / 2.0)
    # case 2: lower value, derivatives of opposite sign; minimum bracketed
    gamma2 = xp.where(stp > stx, -gamma, gamma)
    r = ((gamma2 - dp) + theta) / (((gamma2 - dp) + gamma2) + dx)
    stpc2 = stp + r * (stx - stp)
    stpq2 = stp + (dp / (dp - dx)) * (stx - stp)
    stpf2 = xp.where(xp.abs(stpc2 - stp) > xp.abs(stpq2 - stp), stpc2, stpq2)
    # case 3: lower value, same sign, derivative magnitude decreases
    theta3, gamma3 = _cubic_minimiser(stx, fx, dx, stp, fp, dp, clip_sqrt=True, xp=xp)
    gamma3 = xp.where(stp > stx, -gamma3, gamma3)
    r = ((gamma3 - dp) + theta3) / ((gamma3 + (dx - dp)) + gamma3)
    stpc3 = xp.where((r < 0.0) & (gamma3 != 0.0), stp + r * (stx - stp), xp.where(stp > stx, stpmax, stpmin))
    stpq3 = stp + (dp / (dp - dx)) * (stx - stp)
    closer = xp.abs(stp - stpc3) < xp.abs(stp - stpq3)
    stpf3 = xp.where(brackt, xp.where(closer, stpc3, stpq3),
                      xp.where(xp.abs(stp - stpc3) > xp.abs(stp - stpq3), stpc3, stpq3))
    # case 4: lower value, same sign, derivative magnitude does not decrease
    theta4, gamma4 = _cubic_minimiser(sty, fy, dy, stp, fp, dp, xp=xp)
    gamma4 = xp.where(stp > sty, -gamma4, gamma4)
    r = ((gamma4 - dp) + theta4) / (((gamma4 - dp) + gamma4) + dy)
    stpf4 = xp.where(brackt, stp + r * (sty - stp), xp.where(stp > stx, stpmax, stpmin))

    stpf = xp.where(case1, stpf1, xp.where(case2, stpf2, xp.where(case3, stpf3, stpf4)))
    bound = case1 | case3
    info = xp.where(case1, 1, xp.where(case2, 2, xp.where(case3, 3, 4)))
    brackt_new = brackt | case1 | case2
    # interval update (independent of the case analysis)
    new_sty = xp.where(case1, stp, xp.where(sgnd < 0.0, stx, sty))
    new_fy = xp.where(case1, fp, xp.where(sgnd < 0.0, fx, fy))
    new_dy = xp.where(case1, dp, xp.where(sgnd < 0.0, dx, dy))
    new_stx = xp.where(case1, stx, stp)
    new_fx = xp.where(case1, fx, fp)
    new_dx = xp.where(case1, dx, dp)
    # safeguard with C++ std::min / std::max semantics, as scitbx: a NaN trial (the cubic of
    # case 1 has no real minimiser when the trial is far uphill) becomes stpmax and then, the
    # minimum being bracketed, the 0.66 point of the interval
    stpf = xp.where(stpf < stpmax, stpf, stpmax)
    stpf = xp.where(stpmin < stpf, stpf, stpmin)
    limit = new_stx + 0.66 * (new_sty - new_stx)
    stpf = xp.where(brackt_new & bound, xp.where(new_sty > new_stx, xp.where(stpf < limit, stpf, limit),
                                                   xp.where(limit < stpf, stpf, limit)), stpf)
    keep = lambda old, new: xp.where(invalid, old, new)  # noqa: E731
    return (keep(stx, new_stx), keep(fx, new_fx), keep(dx, new_dx), keep(sty, new_sty), keep(fy, new_fy),
            keep(dy, new_dy), keep(stp, stpf), xp.where(invalid, brackt, brackt_new), xp.where(invalid, 0, info))


class _HostScalars:
    """numpy's semantics (NaN handling included) for the functions the search applies to
    scalars, in plain Python: numpy's per-call dispatch (~1 us, some 60 calls per trial) cost
    more than a small job's objective evaluation. Values stay numpy or Python scalars, so the
    arithmetic and its rounding are numpy's."""

    float64 = np.float64
    asarray = staticmethod(np.asarray)

    @staticmethod
    def where(condition, a, b):
        return a if condition else b

    @staticmethod
    def minimum(a, b):  # numpy: (isnan(a) || a <= b) ? a : b
        return a if (a != a or a <= b) else b

    @staticmethod
    def maximum(a, b):
        return a if (a != a or a >= b) else b

    @staticmethod
    def clip(x, lo, hi):
        return _HostScalars.minimum(_HostScalars.maximum(x, lo), hi)

    @staticmethod
    def abs(a):
        return abs(a)

    @staticmethod
    def sign(a):
        return 1.0 if a > 0 else (-1.0 if a < 0 else a)  # 0 and NaN as numpy: themselves

    @staticmethod
    def sqrt(a):
        return math.sqrt(a) if a >= 0 else math.nan  # NaN and negative: NaN, as numpy

    @staticmethod
    def isfinite(a):
        return np.bool_(math.isfinite(a))


def _search_start(f0, dginit, step0, stpmin: float, stpmax: float, xp=jnp) -> dict:
    """Initial More-Thuente search state (f0, dginit: value and slope at step 0)."""
    width = stpmax - stpmin
    f64 = jnp.result_type(float) if xp is jnp else xp.float64
    return dict(
        stp=xp.asarray(step0, f64), stx=xp.asarray(0.0, f64), fx=f0, dgx=dginit, sty=xp.asarray(0.0, f64),
        fy=f0, dgy=dginit, brackt=xp.asarray(False), stage1=xp.asarray(True), infoc=xp.asarray(1),
        width=xp.asarray(width, f64), width1=xp.asarray(2.0 * width, f64), nfev=xp.asarray(0),
        done=~(dginit < 0.0), failed=~(dginit < 0.0), stp_eval=xp.asarray(0.0, f64))


def _search_iteration(s: dict, evaluate: Callable, f0, dginit, ftol: float, gtol: float, xtol: float,
                      stpmin: float, stpmax: float, maxfev: int, xp=jnp) -> tuple[dict, Any]:
    """One trial of scitbx's mcsrch: choose the trial step, evaluate it (`evaluate(stp) ->
    (f, g, dg)`), update the interval. Returns (new state, g at the trial)."""
    dgtest = ftol * dginit
    brackt, stx, sty, stp = s["brackt"], s["stx"], s["sty"], s["stp"]
    stmin = xp.where(brackt, xp.minimum(stx, sty), stx)
    stmax = xp.where(brackt, xp.maximum(stx, sty), stp + 4.0 * (stp - stx))
    stp = xp.clip(stp, stpmin, stpmax)
    unusual = ((brackt & ((stp <= stmin) | (stp >= stmax))) | (s["nfev"] >= maxfev - 1) | (s["infoc"] == 0)
               | (brackt & (stmax - stmin <= xtol * stmax)))
    stp = xp.where(unusual, stx, stp)
    f, g, dg = evaluate(stp)
    nfev = s["nfev"] + 1
    # a trial that overflows (e.g. exp(C z / d^2) of dose_decay after the unit first step)
    # is shortened tenfold towards the best point and tried again (scitbx would get a NaN)
    overflow = ~xp.isfinite(f) & (nfev < maxfev) & (stp > stx)
    ftest1 = f0 + stp * dgtest
    fail = ((brackt & ((stp <= stmin) | (stp >= stmax))) | (s["infoc"] == 0)
            | ((stp == stpmax) & (f <= ftest1) & (dg <= dgtest))
            | ((stp == stpmin) & ((f > ftest1) | (dg >= dgtest)))
            | (nfev >= maxfev) | (brackt & (stmax - stmin <= xtol * stmax)) | ~xp.isfinite(f)) & ~overflow
    converged = ~fail & (f <= ftest1) & (xp.abs(dg) <= gtol * (-dginit))
    stage1 = s["stage1"] & ~((f <= ftest1) & (dg >= min(ftol, gtol) * dginit))
    modified = stage1 & (f <= s["fx"]) & (f > ftest1)
    shift = xp.where(modified, dgtest, 0.0)
    # modified function psi(stp) = f - stp dgtest while in stage 1 with insufficient decrease
    out = _mcstep(s["stx"], s["fx"] - xp.where(modified, s["stx"] * dgtest, 0.0), s["dgx"] - shift,
                  s["sty"], s["fy"] - xp.where(modified, s["sty"] * dgtest, 0.0), s["dgy"] - shift,
                  stp, f - xp.where(modified, stp * dgtest, 0.0), dg - shift, brackt, stmin, stmax, xp=xp)
    n_stx, n_fx, n_dx, n_sty, n_fy, n_dy, n_stp, n_brackt, infoc = out
    n_fx = n_fx + xp.where(modified, n_stx * dgtest, 0.0)
    n_fy = n_fy + xp.where(modified, n_sty * dgtest, 0.0)
    n_dx, n_dy = n_dx + shift, n_dy + shift
    # force a sufficient decrease of the interval
    halve = n_brackt & (xp.abs(n_sty - n_stx) >= 0.66 * s["width1"])
    n_stp = xp.where(halve, n_stx + 0.5 * (n_sty - n_stx), n_stp)
    n_width1 = xp.where(n_brackt, s["width"], s["width1"])
    n_width = xp.where(n_brackt, xp.abs(n_sty - n_stx), s["width"])
    done = fail | converged
    pick = lambda old, new: xp.where(done | overflow, old, new)  # noqa: E731
    return dict(
        stp=xp.where(overflow, stx + 0.1 * (stp - stx), pick(stp, n_stp)), stx=pick(stx, n_stx),
        fx=pick(s["fx"], n_fx), dgx=pick(s["dgx"], n_dx),
        sty=pick(sty, n_sty), fy=pick(s["fy"], n_fy), dgy=pick(s["dgy"], n_dy), brackt=pick(brackt, n_brackt),
        stage1=pick(s["stage1"], stage1), infoc=pick(s["infoc"], infoc), width=pick(s["width"], n_width),
        width1=pick(s["width1"], n_width1), nfev=nfev, f=f, done=done, failed=fail, stp_eval=stp), g


def more_thuente_search(
    value_and_grad_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    x: jax.Array,  # f[n]
    direction: jax.Array,  # f[n]
    f0: jax.Array,
    g0: jax.Array,  # f[n]
    step0: float | jax.Array = 1.0,
    ftol: float = 1e-4,
    gtol: float = 0.9,
    xtol: float = 1e-16,
    stpmin: float = 1e-20,
    stpmax: float = 1e20,
    maxfev: int = 20,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Step along `direction` satisfying the strong Wolfe conditions (scitbx's mcsrch).

    Returns (step, f, g, n_evaluations, failed); f, g are at x + step direction. On a
    failure (no descent, rounding errors, maxfev, xtol, step bounds) the step is the best
    one found (scitbx evaluates it last and DIALS keeps the best point). Traceable (a
    `lax.while_loop`); `more_thuente_search_host` is the same search as a host loop.
    """
    dginit = jnp.vdot(g0, direction)

    def evaluate(stp):
        f, g = value_and_grad_fn(x + stp * direction)
        return f, g, jnp.vdot(g, direction)

    def body(carry):
        s, _ = carry
        return _search_iteration(s, evaluate, f0, dginit, ftol, gtol, xtol, stpmin, stpmax, maxfev)

    state0 = _search_start(f0, dginit, step0, stpmin, stpmax) | {"f": f0}
    s, g = jax.lax.while_loop(lambda c: ~c[0]["done"], body, (state0, g0))
    return s["stp_eval"], s["f"], g, s["nfev"], s["failed"]


def more_thuente_search_host(
    value_and_grad_fn: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x: np.ndarray,  # f[n]
    direction: np.ndarray,  # f[n]
    f0: float,
    g0: np.ndarray,  # f[n]
    step0: float = 1.0,
    ftol: float = 1e-4,
    gtol: float = 0.9,
    xtol: float = 1e-16,
    stpmin: float = 1e-20,
    stpmax: float = 1e20,
    maxfev: int = 20,
    xp: Any = _HostScalars,
) -> tuple[float, float, np.ndarray, int, bool]:
    """`more_thuente_search` as a Python loop over numpy scalars around an already
    compiled `value_and_grad_fn` (host arrays in and out): the search logic is never
    traced or compiled, and each trial costs one objective evaluation. xp: the scalar
    functions (`_HostScalars`; numpy gives the same steps, slower)."""
    f0 = np.float64(f0)
    dginit = np.float64(np.dot(g0, direction))

    def evaluate(stp):
        f, g = value_and_grad_fn(x + stp * direction)
        return np.float64(f), g, np.float64(np.dot(g, direction))

    s, g = _search_start(f0, dginit, step0, stpmin, stpmax, xp=xp) | {"f": f0}, g0
    with np.errstate(all="ignore"):  # every case of the step update is evaluated, as traced
        while not s["done"]:
            s, g = _search_iteration(s, evaluate, f0, dginit, ftol, gtol, xtol, stpmin, stpmax, maxfev, xp=xp)
    return float(s["stp_eval"]), float(s["f"]), g, int(s["nfev"]), bool(s["failed"])


def scale_by_more_thuente_linesearch(
    ftol: float = 1e-4,
    gtol: float = 0.9,
    xtol: float = 1e-16,
    stpmin: float = 1e-20,
    stpmax: float = 1e20,
    maxfev: int = 20,
) -> optax.GradientTransformationExtraArgs:
    """optax line search (for `optax.lbfgs(linesearch=...)`) with scitbx's More-Thuente
    search; the trial step starts at 1 (optax scales the first L-BFGS direction by 1/|g|,
    which is scitbx's first step)."""
    import optax  # noqa: PLC0415 (imported where used: small jobs need none of it)

    def init_fn(params):
        return MoreThuenteState(
            value=jnp.asarray(jnp.inf, jnp.result_type(float)), grad=optax.tree.zeros_like(params),
            step=jnp.asarray(1.0, jnp.result_type(float)), n_evaluations=jnp.asarray(0), failed=jnp.asarray(False),
            count=jnp.asarray(0))

    def update_fn(updates, state, params, *, value, grad, value_fn, **extra_args):
        flat_x, unravel = jax.flatten_util.ravel_pytree(params)
        flat_d, _ = jax.flatten_util.ravel_pytree(updates)
        flat_g, _ = jax.flatten_util.ravel_pytree(grad)

        def value_and_grad_flat(y):
            f, g = jax.value_and_grad(value_fn)(unravel(y), **extra_args)
            return f, jax.flatten_util.ravel_pytree(g)[0]

        # optax's first direction is -g min(1, 1/|g|); scitbx's first step is 1/|g| along -g
        gnorm = jnp.linalg.norm(flat_g)
        step0 = jnp.where(state.count == 0, jnp.maximum(1.0, 1.0 / jnp.where(gnorm > 0, gnorm, 1.0)), 1.0)
        step, f, g, nfev, failed = more_thuente_search(
            value_and_grad_flat, flat_x, flat_d, value, flat_g, step0, ftol, gtol, xtol, stpmin, stpmax, maxfev)
        new_updates = jax.tree.map(lambda u: step * u, updates)
        return new_updates, MoreThuenteState(value=f, grad=unravel(g), step=step, n_evaluations=nfev, failed=failed,
                                             count=state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------ driver
@dataclasses.dataclass
class OptimisationResult:
    """Final flat parameters, per-step RMSD history (start point first) and the stop reason."""

    x: np.ndarray  # f[n_params]
    rmsd_history: list[float]
    n_reflections: int
    reason: str
    n_iterations: int


_DIRECTION_CACHE: dict[int, Callable] = {}


def _lbfgs_direction(memory_size: int) -> Callable:
    """Jitted optax L-BFGS direction: (grad, state, x) -> (-P grad, state), the memory
    updated with (x - x_prev, grad - grad_prev) first (`optax.lbfgs` without its line
    search: `scale_by_lbfgs` then the sign flip). Small (parameter-sized) program, one per
    memory size and parameter count."""
    if memory_size not in _DIRECTION_CACHE:
        import optax  # noqa: PLC0415 (~0.05 s to import; small jobs take the host twin below)

        precondition = optax.scale_by_lbfgs(memory_size=memory_size)

        def direction(grad: jax.Array, state, x: jax.Array):
            updates, state = precondition.update(grad, state, x)
            return -1.0 * updates, state

        # parameter-sized: XLA's optimisation would cost compile time and save nothing
        _DIRECTION_CACHE[memory_size] = Program(direction, fast=True)
    return _DIRECTION_CACHE[memory_size]


class HostLBFGSState(NamedTuple):
    """`optax.ScaleByLBFGSState` as numpy arrays (fields and meaning the same)."""

    count: int
    params: np.ndarray  # f[n]
    updates: np.ndarray  # f[n]
    diff_params_memory: np.ndarray  # f[m, n]
    diff_updates_memory: np.ndarray  # f[m, n]
    weights_memory: np.ndarray  # f[m]


def _host_lbfgs_direction(grad: np.ndarray, state: HostLBFGSState, x: np.ndarray) -> tuple[np.ndarray, HostLBFGSState]:
    """numpy twin of `_lbfgs_direction` (optax 0.2's `scale_by_lbfgs` update, then the sign
    flip), operation for operation: the new pair goes into slot (k-1) mod m, gamma = s.y/y.y
    (first step: min(1, 1/|g|)), and the two-loop recursion visits the slots from
    k mod m on, the first loop in reverse. For parameter-sized jobs, where compiling the
    optax program (~0.2 s of tracing, lowering and XLA) costs more than every direction of
    a run computed here; tests/optimize check it against optax."""
    m = state.weights_memory.size
    k = state.count
    memory_idx, prev_idx = k % m, (k - 1) % m
    diff_params, diff_updates = x - state.params, grad - state.updates
    curvature = float(np.dot(diff_updates, diff_params))
    weight = 0.0 if curvature == 0.0 else 1.0 / curvature
    if k == 0:
        diff_params, diff_updates, weight = np.zeros_like(diff_params), np.zeros_like(diff_updates), 0.0
    dp_mem, du_mem, w_mem = state.diff_params_memory.copy(), state.diff_updates_memory.copy(), state.weights_memory.copy()
    dp_mem[prev_idx], du_mem[prev_idx], w_mem[prev_idx] = diff_params, diff_updates, weight
    if k > 0:
        numerator, denominator = float(np.dot(diff_updates, diff_params)), float(np.dot(diff_updates, diff_updates))
        identity_scale = numerator / denominator if denominator > 0.0 else 1.0
    else:
        norm = float(np.sqrt(np.dot(grad, grad)))
        identity_scale = min(1.0, 1.0 / norm) if norm > 0.0 else 1.0
    order = (memory_idx + np.arange(m)) % m
    vec = grad.copy()
    alphas = np.zeros(m)
    for j in range(m - 1, -1, -1):  # the memory slots (m ~ 5), last first
        i = order[j]
        alphas[j] = w_mem[i] * float(np.dot(dp_mem[i], vec))
        vec = vec - alphas[j] * du_mem[i]
    vec = identity_scale * vec
    for j in range(m):
        i = order[j]
        beta = w_mem[i] * float(np.dot(du_mem[i], vec))
        vec = vec + (alphas[j] - beta) * dp_mem[i]
    return -1.0 * vec, HostLBFGSState(k + 1, x, grad, dp_mem, du_mem, w_mem)


def _host_lbfgs_state(x: np.ndarray, memory_size: int) -> HostLBFGSState:
    """`optax.scale_by_lbfgs(memory_size).init(x)` as numpy arrays."""
    zeros = np.zeros((memory_size, x.size))
    return HostLBFGSState(0, np.zeros_like(x), np.zeros_like(x), zeros, zeros.copy(), np.zeros(memory_size))


def _lbfgs_state(x: np.ndarray, memory_size: int):
    """`optax.scale_by_lbfgs(memory_size).init(x)` built on the host (no compilation)."""
    import optax  # noqa: PLC0415

    fields = _host_lbfgs_state(x, memory_size)._asdict()
    return optax.ScaleByLBFGSState(**{**fields, "count": np.asarray(0, np.int32)})


def precompile_direction(n_params: int, memory_size: int = 5) -> None:
    """Compile the L-BFGS direction for n_params parameters in the background (nothing to
    compile where the host twin computes it)."""
    if host_evaluation(n_params):
        return
    x = jax.ShapeDtypeStruct((n_params,), np.float64)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                         _lbfgs_state(np.zeros(n_params), memory_size))
    precompile(_lbfgs_direction(memory_size), x, state, x)


def lbfgs_steps(
    value_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x: np.ndarray,  # f[n]
    memory_size: int = 5,
    value: float | None = None,
    grad: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, float, np.ndarray, bool]]:
    """scitbx's L-BFGS as a host loop: yields (x, f, g, line_search_failed) after each
    accepted step (optax direction, More-Thuente search); the caller decides when to stop.
    `value`, `grad`: at the start point, if already evaluated."""
    x = np.array(x, dtype=np.float64)
    if value is None or grad is None:
        value, grad = value_and_grad(x)
    if host_evaluation(x.size):  # parameter-sized: numpy, nothing to compile
        direction_of, state = _host_lbfgs_direction, _host_lbfgs_state(x, memory_size)
    else:
        direction_of, state = _lbfgs_direction(memory_size), _lbfgs_state(x, memory_size)
    first = True
    while True:
        direction, state = direction_of(grad, state, x)
        direction = np.asarray(direction)
        # optax's first direction is -g min(1, 1/|g|); scitbx's first step is 1/|g| along -g
        step0 = 1.0
        if first:
            g_norm = float(np.linalg.norm(grad))
            step0 = max(1.0, 1.0 / (g_norm if g_norm > 0 else 1.0))
            first = False
        step, value, grad, _, failed = more_thuente_search_host(value_and_grad, x, direction, value, grad, step0)
        x = x + step * direction
        yield x, value, grad, failed


def minimise_lbfgs(
    target: ScalingTarget,
    data: TargetData,
    x0: np.ndarray | None = None,
    rmsd_tolerance: float = 1e-4,
    max_iterations: int | None = None,
    gradient_tolerance: float = 1e-5,
    memory_size: int = 5,
) -> OptimisationResult:
    """Minimise the scaling objective from x0 (default data.anchor) until the RMSD converges.

    `rmsd_history[0]` is the start point (DIALS' step table starts at `rmsd_history[1]`).
    Returns the flat parameters with fixed entries set to their anchor values.
    """
    x = np.array(data.anchor if x0 is None else x0, dtype=np.float64)
    n_refl = int(n_reflections(data.problem))
    n_refl_f = float(max(n_refl, 1))
    free = np.asarray(data.free)

    host = host_value_and_grad(target, data)  # small problems: numpy, no compile

    def value_and_grad(y: np.ndarray) -> tuple[float, np.ndarray]:
        if host is not None:
            return host(y)
        f, g = target.value_and_grad(y, data)  # the one compiled objective program
        return float(f), np.asarray(g)

    value, grad = value_and_grad(x)
    gnorm = float(np.linalg.norm(grad * free))
    history = [float(np.sqrt(value / n_refl_f))]
    limit = np.inf if max_iterations is None else max_iterations
    reason = MAX_ITERATIONS
    it = 0
    if gnorm == 0.0:
        reason = GRADIENT_SMALL
    steps = lbfgs_steps(value_and_grad, x, memory_size, value, grad)
    while reason != GRADIENT_SMALL and it < limit:
        x_new, value, grad, failed = next(steps)
        it += 1
        if not np.isfinite(value):
            reason = NOT_FINITE
            break
        x = x_new
        history.append(float(np.sqrt(value / n_refl_f)))
        if failed:
            reason = LINESEARCH_FAILED
            break
        if it >= 2:  # DIALS journals from the first accepted step on
            r_prev, r_now = history[-2], history[-1]
            if r_prev <= 0 or abs(r_prev - r_now) / r_prev < rmsd_tolerance:
                reason = RMSD_CONVERGED
                break
        x_norm = float(np.linalg.norm(x[free]))
        if float(np.linalg.norm(grad * free)) <= gradient_tolerance * max(1.0, x_norm):
            reason = GRADIENT_SMALL
            break
    x_eff = np.asarray(target.effective(x, data))
    return OptimisationResult(x=x_eff, rmsd_history=history, n_reflections=n_refl, reason=reason, n_iterations=it)
