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
search fails (scitbx restores the best point and ends the round). The step is one jitted
function (compiled once per problem shape); the loop over iterations is Python so the RMSD
history is available for the log.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from jaxscale.target.objective import ScalingTarget, TargetData, n_reflections

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


def _cubic_minimiser(s_a, f_a, d_a, s_b, f_b, d_b, clip_sqrt=False):
    """Step of the minimiser of the cubic through (s_a, f_a, d_a), (s_b, f_b, d_b)."""
    theta = 3.0 * (f_a - f_b) / (s_b - s_a) + d_a + d_b
    s = jnp.maximum(jnp.maximum(jnp.abs(theta), jnp.abs(d_a)), jnp.abs(d_b))
    s = jnp.where(s > 0, s, 1.0)
    disc = (theta / s) ** 2 - (d_a / s) * (d_b / s)
    gamma = s * jnp.sqrt(jnp.maximum(disc, 0.0) if clip_sqrt else disc)
    return theta, gamma


def _mcstep(stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stpmin, stpmax):
    """One update of the interval of uncertainty and the trial step (More & Thuente's
    CSTEP as in scitbx's mcstep). Returns (stx, fx, dx, sty, fy, dy, stp, brackt, info)."""
    invalid = (brackt & ((stp <= jnp.minimum(stx, sty)) | (stp >= jnp.maximum(stx, sty)))) | (
        dx * (stp - stx) >= 0.0) | (stpmax < stpmin)
    sgnd = dp * jnp.sign(dx)
    case1 = fp > fx
    case2 = ~case1 & (sgnd < 0.0)
    case3 = ~case1 & ~case2 & (jnp.abs(dp) < jnp.abs(dx))
    # case 1: higher function value; minimum bracketed
    theta, gamma = _cubic_minimiser(stx, fx, dx, stp, fp, dp)
    gamma1 = jnp.where(stp < stx, -gamma, gamma)
    r = ((gamma1 - dx) + theta) / (((gamma1 - dx) + gamma1) + dp)
    stpc1 = stx + r * (stp - stx)
    stpq1 = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
    stpf1 = jnp.where(jnp.abs(stpc1 - stx) < jnp.abs(stpq1 - stx), stpc1, stpc1 + (stpq1 - stpc1) / 2.0)
    # case 2: lower value, derivatives of opposite sign; minimum bracketed
    gamma2 = jnp.where(stp > stx, -gamma, gamma)
    r = ((gamma2 - dp) + theta) / (((gamma2 - dp) + gamma2) + dx)
    stpc2 = stp + r * (stx - stp)
    stpq2 = stp + (dp / (dp - dx)) * (stx - stp)
    stpf2 = jnp.where(jnp.abs(stpc2 - stp) > jnp.abs(stpq2 - stp), stpc2, stpq2)
    # case 3: lower value, same sign, derivative magnitude decreases
    theta3, gamma3 = _cubic_minimiser(stx, fx, dx, stp, fp, dp, clip_sqrt=True)
    gamma3 = jnp.where(stp > stx, -gamma3, gamma3)
    r = ((gamma3 - dp) + theta3) / ((gamma3 + (dx - dp)) + gamma3)
    stpc3 = jnp.where((r < 0.0) & (gamma3 != 0.0), stp + r * (stx - stp), jnp.where(stp > stx, stpmax, stpmin))
    stpq3 = stp + (dp / (dp - dx)) * (stx - stp)
    closer = jnp.abs(stp - stpc3) < jnp.abs(stp - stpq3)
    stpf3 = jnp.where(brackt, jnp.where(closer, stpc3, stpq3),
                      jnp.where(jnp.abs(stp - stpc3) > jnp.abs(stp - stpq3), stpc3, stpq3))
    # case 4: lower value, same sign, derivative magnitude does not decrease
    theta4, gamma4 = _cubic_minimiser(sty, fy, dy, stp, fp, dp)
    gamma4 = jnp.where(stp > sty, -gamma4, gamma4)
    r = ((gamma4 - dp) + theta4) / (((gamma4 - dp) + gamma4) + dy)
    stpf4 = jnp.where(brackt, stp + r * (sty - stp), jnp.where(stp > stx, stpmax, stpmin))

    stpf = jnp.where(case1, stpf1, jnp.where(case2, stpf2, jnp.where(case3, stpf3, stpf4)))
    bound = case1 | case3
    info = jnp.where(case1, 1, jnp.where(case2, 2, jnp.where(case3, 3, 4)))
    brackt_new = brackt | case1 | case2
    # interval update (independent of the case analysis)
    new_sty = jnp.where(case1, stp, jnp.where(sgnd < 0.0, stx, sty))
    new_fy = jnp.where(case1, fp, jnp.where(sgnd < 0.0, fx, fy))
    new_dy = jnp.where(case1, dp, jnp.where(sgnd < 0.0, dx, dy))
    new_stx = jnp.where(case1, stx, stp)
    new_fx = jnp.where(case1, fx, fp)
    new_dx = jnp.where(case1, dx, dp)
    # safeguard with C++ std::min / std::max semantics, as scitbx: a NaN trial (the cubic of
    # case 1 has no real minimiser when the trial is far uphill) becomes stpmax and then, the
    # minimum being bracketed, the 0.66 point of the interval
    stpf = jnp.where(stpf < stpmax, stpf, stpmax)
    stpf = jnp.where(stpmin < stpf, stpf, stpmin)
    limit = new_stx + 0.66 * (new_sty - new_stx)
    stpf = jnp.where(brackt_new & bound, jnp.where(new_sty > new_stx, jnp.where(stpf < limit, stpf, limit),
                                                   jnp.where(limit < stpf, stpf, limit)), stpf)
    keep = lambda old, new: jnp.where(invalid, old, new)  # noqa: E731
    return (keep(stx, new_stx), keep(fx, new_fx), keep(dx, new_dx), keep(sty, new_sty), keep(fy, new_fy),
            keep(dy, new_dy), keep(stp, stpf), jnp.where(invalid, brackt, brackt_new), jnp.where(invalid, 0, info))


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
    one found (scitbx evaluates it last and DIALS keeps the best point).
    """
    dginit = jnp.vdot(g0, direction)
    dgtest = ftol * dginit
    width = stpmax - stpmin
    f64 = jnp.result_type(float)

    def evaluate(stp):
        f, g = value_and_grad_fn(x + stp * direction)
        return f, g

    state0 = dict(
        stp=jnp.asarray(step0, f64), stx=jnp.asarray(0.0, f64), fx=f0, dgx=dginit, sty=jnp.asarray(0.0, f64),
        fy=f0, dgy=dginit, brackt=jnp.asarray(False), stage1=jnp.asarray(True), infoc=jnp.asarray(1),
        width=jnp.asarray(width, f64), width1=jnp.asarray(2.0 * width, f64), nfev=jnp.asarray(0),
        f=f0, g=g0, done=~(dginit < 0.0), failed=~(dginit < 0.0), stp_eval=jnp.asarray(0.0, f64))

    def body(s):
        brackt, stx, sty, stp = s["brackt"], s["stx"], s["sty"], s["stp"]
        stmin = jnp.where(brackt, jnp.minimum(stx, sty), stx)
        stmax = jnp.where(brackt, jnp.maximum(stx, sty), stp + 4.0 * (stp - stx))
        stp = jnp.clip(stp, stpmin, stpmax)
        unusual = ((brackt & ((stp <= stmin) | (stp >= stmax))) | (s["nfev"] >= maxfev - 1) | (s["infoc"] == 0)
                   | (brackt & (stmax - stmin <= xtol * stmax)))
        stp = jnp.where(unusual, stx, stp)
        f, g = evaluate(stp)
        nfev = s["nfev"] + 1
        # a trial that overflows (e.g. exp(C z / d^2) of dose_decay after the unit first step)
        # is shortened tenfold towards the best point and tried again (scitbx would get a NaN)
        overflow = ~jnp.isfinite(f) & (nfev < maxfev) & (stp > stx)
        dg = jnp.vdot(g, direction)
        ftest1 = f0 + stp * dgtest
        fail = ((brackt & ((stp <= stmin) | (stp >= stmax))) | (s["infoc"] == 0)
                | ((stp == stpmax) & (f <= ftest1) & (dg <= dgtest))
                | ((stp == stpmin) & ((f > ftest1) | (dg >= dgtest)))
                | (nfev >= maxfev) | (brackt & (stmax - stmin <= xtol * stmax)) | ~jnp.isfinite(f)) & ~overflow
        converged = ~fail & (f <= ftest1) & (jnp.abs(dg) <= gtol * (-dginit))
        stage1 = s["stage1"] & ~((f <= ftest1) & (dg >= min(ftol, gtol) * dginit))
        modified = stage1 & (f <= s["fx"]) & (f > ftest1)
        shift = jnp.where(modified, dgtest, 0.0)
        # modified function psi(stp) = f - stp dgtest while in stage 1 with insufficient decrease
        out = _mcstep(s["stx"], s["fx"] - jnp.where(modified, s["stx"] * dgtest, 0.0), s["dgx"] - shift,
                      s["sty"], s["fy"] - jnp.where(modified, s["sty"] * dgtest, 0.0), s["dgy"] - shift,
                      stp, f - jnp.where(modified, stp * dgtest, 0.0), dg - shift, brackt, stmin, stmax)
        n_stx, n_fx, n_dx, n_sty, n_fy, n_dy, n_stp, n_brackt, infoc = out
        n_fx = n_fx + jnp.where(modified, n_stx * dgtest, 0.0)
        n_fy = n_fy + jnp.where(modified, n_sty * dgtest, 0.0)
        n_dx, n_dy = n_dx + shift, n_dy + shift
        # force a sufficient decrease of the interval
        halve = n_brackt & (jnp.abs(n_sty - n_stx) >= 0.66 * s["width1"])
        n_stp = jnp.where(halve, n_stx + 0.5 * (n_sty - n_stx), n_stp)
        n_width1 = jnp.where(n_brackt, s["width"], s["width1"])
        n_width = jnp.where(n_brackt, jnp.abs(n_sty - n_stx), s["width"])
        done = fail | converged
        pick = lambda old, new: jnp.where(done | overflow, old, new)  # noqa: E731
        return dict(
            stp=jnp.where(overflow, stx + 0.1 * (stp - stx), pick(stp, n_stp)), stx=pick(stx, n_stx),
            fx=pick(s["fx"], n_fx), dgx=pick(s["dgx"], n_dx),
            sty=pick(sty, n_sty), fy=pick(s["fy"], n_fy), dgy=pick(s["dgy"], n_dy), brackt=pick(brackt, n_brackt),
            stage1=pick(s["stage1"], stage1), infoc=pick(s["infoc"], infoc), width=pick(s["width"], n_width),
            width1=pick(s["width1"], n_width1), nfev=nfev, f=f, g=g, done=done, failed=fail, stp_eval=stp)

    s = jax.lax.while_loop(lambda s: ~s["done"], body, state0)
    return s["stp_eval"], s["f"], s["g"], s["nfev"], s["failed"]


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


_STEP_CACHE: dict[tuple, tuple] = {}


def _make_step(target: ScalingTarget, memory_size: int):
    key = (id(target), memory_size)
    if key in _STEP_CACHE and _STEP_CACHE[key][0] is target:
        return _STEP_CACHE[key][1], _STEP_CACHE[key][2]
    opt = optax.lbfgs(memory_size=memory_size, linesearch=scale_by_more_thuente_linesearch())

    @jax.jit
    def init(x: jax.Array):
        return opt.init(x)

    @jax.jit
    def step(x: jax.Array, state, data: TargetData):
        fun = lambda y: target._value(y, data)  # noqa: E731
        value, grad = optax.value_and_grad_from_state(fun)(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fun)
        x_new = optax.apply_updates(x, updates)
        value_new = optax.tree.get(state, "value")
        grad_new = optax.tree.get(state, "grad")
        failed = optax.tree.get(state, "failed")
        return x_new, state, value_new, jnp.linalg.norm(grad_new * data.free), failed

    _STEP_CACHE[key] = (target, init, step)
    return init, step


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
    x = jnp.asarray(data.anchor if x0 is None else x0)
    n_refl = int(n_reflections(data.problem))
    n_refl_f = float(max(n_refl, 1))
    free = np.asarray(data.free)
    value, grad = target.value_and_grad(x, data)
    gnorm = float(jnp.linalg.norm(grad * data.free))
    history = [float(np.sqrt(float(value) / n_refl_f))]
    init, step = _make_step(target, memory_size)
    state = init(x)
    limit = np.inf if max_iterations is None else max_iterations
    reason = MAX_ITERATIONS
    it = 0
    if gnorm == 0.0:
        reason = GRADIENT_SMALL
    while reason != GRADIENT_SMALL and it < limit:
        x_new, state_new, value, gnorm_new, failed = step(x, state, data)
        it += 1
        value = float(value)
        if not np.isfinite(value):
            reason = NOT_FINITE
            break
        x, state = x_new, state_new
        history.append(float(np.sqrt(value / n_refl_f)))
        if bool(failed):
            reason = LINESEARCH_FAILED
            break
        if it >= 2:  # DIALS journals from the first accepted step on
            r_prev, r_now = history[-2], history[-1]
            if r_prev <= 0 or abs(r_prev - r_now) / r_prev < rmsd_tolerance:
                reason = RMSD_CONVERGED
                break
        x_norm = float(np.linalg.norm(np.asarray(x)[free]))
        if float(gnorm_new) <= gradient_tolerance * max(1.0, x_norm):
            reason = GRADIENT_SMALL
            break
    x_eff = np.asarray(target.effective(x, data))
    return OptimisationResult(x=x_eff, rmsd_history=history, n_reflections=n_refl, reason=reason, n_iterations=it)
