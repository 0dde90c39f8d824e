"""jaxscale.compilation: fast-compile variant for small problems, background compilation,
numpy evaluation of g; and that each gives the same numbers as the plain jitted program."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxscale  # noqa: F401  (float64)
from jaxscale import compilation as C
from jaxscale.models.component import Component
from jaxscale.models.linear import apply_b_factor, apply_grid, apply_one_plus
from jaxscale.target.objective import ScalingTarget

COMPILE = "/jax/core/compile/backend_compile_duration"


class _Compiles:
    """Backend compilations per function name, from jax.monitoring."""

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, event, duration, **kw):
        if event == COMPILE:
            self.names.append(str(kw.get("fun_name", "?")))


@pytest.fixture(scope="module")
def compiles():
    c = _Compiles()
    jax.monitoring.register_event_duration_secs_listener(c)
    return c


def _objective(x, y):
    """A small reduction with transcendental functions (what the options could change)."""
    return jnp.sum(jnp.exp(-0.5 * x) * jnp.log1p(y * y)) + jnp.cumsum(x)[-1]


def test_small_problems_use_the_fast_variant_with_equal_results():
    program = C.Program(_objective, rows=lambda x, y: x.shape[0])
    rng = np.random.default_rng(0)
    small = (rng.normal(size=64), rng.normal(size=64))
    large_rows = C.FAST_COMPILE_MAX_ROWS + 1
    assert program.variant(*small) is program._fast
    assert program.variant(np.zeros(large_rows), np.zeros(large_rows)) is program._full
    assert program.variant(*small, rows=large_rows) is program._full  # a chunk of a large job
    # the options change code generation, not the arithmetic: same value to rounding
    fast, full = float(program._fast(*small)), float(program._full(*small))
    assert fast == pytest.approx(full, rel=1e-14)
    assert float(program(*small)) == fast


def test_precompiled_program_is_not_compiled_again(compiles):
    def precompiled_fn(x):
        return jnp.tanh(x) @ x

    program = C.Program(precompiled_fn, fast=True)
    C.precompile(program, jax.ShapeDtypeStruct((5,), np.float64))
    C.wait_for_precompiled()
    n_before = compiles.names.count("jit(precompiled_fn)")
    assert n_before == 1
    x = np.linspace(0.0, 1.0, 5)
    assert float(program(x)) == pytest.approx(float(np.tanh(x) @ x), rel=1e-14)
    assert compiles.names.count("jit(precompiled_fn)") == 1  # the call used the background's


def test_call_while_background_compiles_waits_instead_of_compiling_twice(compiles):
    def waited_fn(x):
        y = x
        for _ in range(40):  # enough work that the call arrives while it compiles
            y = jnp.sin(y) + jnp.cumsum(y) * 1e-3
        return y.sum()

    program = C.Program(waited_fn, fast=True)
    x = np.ones(33)
    C.precompile(program, jax.ShapeDtypeStruct(x.shape, np.float64))
    value = float(program(x))  # immediately: the background has not finished
    C.wait_for_precompiled()
    assert np.isfinite(value)
    assert compiles.names.count("jit(waited_fn)") == 1


def test_failed_background_compilation_leaves_the_error_to_the_call():
    def bad_shapes(x):
        return x @ jnp.ones(3)  # (4,) @ (3,): a shape error at trace time

    program = C.Program(bad_shapes, fast=True)
    C.precompile(program, jax.ShapeDtypeStruct((4,), np.float64))
    C.wait_for_precompiled()
    with pytest.raises(TypeError):
        program(np.ones(4))


def _linear_components(n: int, seed: int = 1):
    """Scale grid x B factor x absorption surface with planted parameters (models.linear)."""
    rng = np.random.default_rng(seed)
    comps = {"scale": Component("scale", apply_grid), "decay": Component("decay", apply_b_factor),
             "absorption": Component("absorption", apply_one_plus)}
    params = {"scale": 1.0 + 0.1 * rng.normal(size=7), "decay": rng.normal(size=5),
              "absorption": 0.01 * rng.normal(size=8)}
    bases = {
        "scale": {"idx": rng.integers(0, 7, (n, 3)).astype(np.int32), "w": rng.dirichlet(np.ones(3), n),
                  "absent": np.zeros(n)},
        "decay": {"idx": rng.integers(0, 5, (n, 3)).astype(np.int32), "w": rng.dirichlet(np.ones(3), n),
                  "inv_two_d_sq": rng.uniform(0.05, 0.5, n)},
        "absorption": {"idx": np.tile(np.arange(8, dtype=np.int32), (n, 1)), "w": rng.normal(size=(n, 8))},
    }
    return comps, params, bases


def test_numpy_inverse_scale_equals_the_compiled_program():
    comps, params, bases = _linear_components(500)
    target = ScalingTarget(comps, params)
    assert target.has_host_inverse_scale()
    x = target.x0 * 1.01
    host = target.inverse_scale_host(x, bases)
    compiled = np.asarray(target.inverse_scale(jnp.asarray(x), bases))
    np.testing.assert_allclose(host, compiled, rtol=1e-14, atol=0)
    # a component without a numpy twin: no host evaluation
    other = ScalingTarget({"scale": Component("scale", lambda p, b: p[b["idx"]][:, 0])}, {"scale": np.ones(3)})
    assert not other.has_host_inverse_scale()
    assert other.inverse_scale_host(np.ones(3), {"scale": {"idx": np.zeros((4, 1), np.int32)}}) is None


def test_program_row_limit_and_static_keywords(compiles):
    """`max_fast_rows` moves the variant boundary; static keyword arguments reach the jitted
    function, and a precompiled call with them is not compiled again."""
    def scaled_sum(x, power):
        return jnp.sum(jnp.abs(x) ** power)

    program = C.Program(scaled_sum, rows=lambda x: x.shape[0], max_fast_rows=100, static_argnames=("power",))
    assert program.variant(np.ones(100)) is program._fast
    assert program.variant(np.ones(101)) is program._full
    x = np.linspace(-1.0, 2.0, 50)
    C.precompile(program, jax.ShapeDtypeStruct(x.shape, np.float64), power=3)
    C.wait_for_precompiled()
    assert compiles.names.count("jit(scaled_sum)") == 1
    assert float(program(x, power=3)) == pytest.approx(float(np.sum(np.abs(x) ** 3)), rel=1e-14)
    assert compiles.names.count("jit(scaled_sum)") == 1  # the precompiled executable
    assert float(program(x, power=2)) == pytest.approx(float(np.sum(x * x)), rel=1e-14)
    assert compiles.names.count("jit(scaled_sum)") == 2  # another static value: its own program


def test_finishing_background_compilation_waits_for_the_running_one_and_drops_the_queue():
    """What the CLI does before os._exit: the compilation in progress (writing the persistent
    cache) completes, queued ones never start, and the compiler works again afterwards."""
    import threading
    import time

    started, ran = threading.Event(), []

    def slow():
        started.set()
        time.sleep(0.3)
        ran.append("running")

    C.wait_for_precompiled()
    C._COMPILER.submit(C._Once(slow))
    C._COMPILER.submit(C._Once(lambda: ran.append("queued")))
    assert started.wait(5.0)
    C.finish_background_compilation()
    assert ran == ["running"]
    C._COMPILER.submit(C._Once(lambda: ran.append("later")))
    C.wait_for_precompiled()
    assert ran == ["running", "later"]
