"""L-BFGS scaling rounds (optax L-BFGS with zoom line search) with DIALS' stopping rules.

DIALS (scitbx L-BFGS) stops a round when the RMSD changes by less than `rmsd_tolerance`
relative between accepted steps, or on the gradient test |g| <= 1e-5 max(1, |x|). The step
is one jitted function (compiled once per problem shape); the loop over iterations is Python
so the RMSD history is available for the log.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxscale.target.objective import ScalingTarget, TargetData, n_reflections

RMSD_CONVERGED = "RMSD no longer decreasing"
GRADIENT_SMALL = "gradient norm below tolerance"
MAX_ITERATIONS = "Reached maximum number of iterations"
NOT_FINITE = "objective not finite"


@dataclasses.dataclass
class OptimisationResult:
    """Final flat parameters, per-step RMSD history (start point first) and the stop reason."""

    x: np.ndarray  # f[n_params]
    rmsd_history: list[float]
    n_reflections: int
    reason: str
    n_iterations: int


_STEP_CACHE: dict[int, tuple] = {}


def _make_step(target: ScalingTarget, memory_size: int):
    key = (id(target), memory_size)
    if key in _STEP_CACHE and _STEP_CACHE[key][0] is target:
        return _STEP_CACHE[key][1], _STEP_CACHE[key][2]
    opt = optax.lbfgs(
        memory_size=memory_size,
        linesearch=optax.scale_by_zoom_linesearch(
            max_linesearch_steps=20, curv_rtol=0.9, initial_guess_strategy="one"
        ),
    )

    @jax.jit
    def init(x: jax.Array):
        return opt.init(x)

    @jax.jit
    def step(x: jax.Array, state, data: TargetData):
        fun = lambda y: target._value(y, data)  # noqa: E731
        value, grad = optax.value_and_grad_from_state(fun)(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fun)
        x_new = optax.apply_updates(x, updates)
        value_new = optax.tree_utils.tree_get(state, "value")
        grad_new = optax.tree_utils.tree_get(state, "grad")
        return x_new, state, value_new, jnp.linalg.norm(grad_new * data.free)

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

    Returns the flat parameters with fixed entries set to their anchor values.
    """
    x = jnp.asarray(data.anchor if x0 is None else x0)
    n_refl = int(n_reflections(data.problem))
    n_refl_f = float(max(n_refl, 1))
    value, grad = target.value_and_grad(x, data)
    gnorm = float(jnp.linalg.norm(grad * data.free))
    history = [float(np.sqrt(float(value) / n_refl_f))]
    init, step = _make_step(target, memory_size)
    state = init(x)
    limit = np.inf if max_iterations is None else max_iterations
    reason = MAX_ITERATIONS
    it = 0
    if gnorm <= gradient_tolerance * max(1.0, float(jnp.linalg.norm(x))):
        reason = GRADIENT_SMALL
    else:
        while it < limit:
            x_new, state_new, value, gnorm_new = step(x, state, data)
            it += 1
            value = float(value)
            if not np.isfinite(value):
                reason = NOT_FINITE
                break
            x, state = x_new, state_new
            history.append(float(np.sqrt(value / n_refl_f)))
            r_prev, r_now = history[-2], history[-1]
            if r_prev <= 0 or abs(r_prev - r_now) / r_prev < rmsd_tolerance:
                reason = RMSD_CONVERGED
                break
            if float(gnorm_new) <= gradient_tolerance * max(1.0, float(jnp.linalg.norm(x))):
                reason = GRADIENT_SMALL
                break
    x_eff = np.asarray(target.effective(x, data))
    return OptimisationResult(x=x_eff, rmsd_history=history, n_reflections=n_refl, reason=reason, n_iterations=it)
