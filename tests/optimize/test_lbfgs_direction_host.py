"""`lbfgs_direction_host` (the numpy L-BFGS direction of the host loop) equals optax's
`scale_by_lbfgs` direction, memory update and state, over more steps than the memory holds."""
import numpy as np
import optax

from jaxscale.optimize.lbfgs import _lbfgs_state, lbfgs_direction_host


def test_numpy_direction_matches_optax():
    rng = np.random.default_rng(3)
    n, memory = 30, 5
    a = rng.normal(size=(n, n))
    hessian = a @ a.T + n * np.eye(n)
    x = rng.normal(size=n)
    optax_lbfgs = optax.scale_by_lbfgs(memory_size=memory)
    state_ref = optax_lbfgs.init(x)
    state = _lbfgs_state(x, memory)
    for _ in range(12):  # past the memory size: the ring buffer wraps
        grad = hessian @ x + 0.1 * np.sin(x)
        updates, state_ref = optax_lbfgs.update(grad, state_ref, x)
        direction, state = lbfgs_direction_host(grad, state, x)
        np.testing.assert_allclose(direction, -np.asarray(updates), rtol=0, atol=1e-13 * np.abs(direction).max())
        np.testing.assert_allclose(state.weights_memory, np.asarray(state_ref.weights_memory), rtol=1e-13)
        assert int(state.count) == int(state_ref.count)
        x = x + 0.3 * direction
