"""Compilation behaviour: host-side set-up compiles nothing, one compiled objective serves
every free mask / anchor / round of the same shapes, and the persistent-cache location."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxscale
from jaxscale.target import ScalingTarget, chunk_by_groups, make_problem, n_reflections, select_rows
from tests.target.synthetic import make_synthetic

COMPILE = "/jax/core/compile/backend_compile_duration"


class _Count:
    def __init__(self):
        self.n = 0

    def __call__(self, event, duration, **kw):
        if event == COMPILE:
            self.n += 1


@pytest.fixture(scope="module")
def counter():
    c = _Count()
    jax.monitoring.register_event_duration_secs_listener(c)
    return c


def test_host_setup_compiles_nothing(counter):
    comps, true, start, bases, i_obs, var, gid, _ = make_synthetic(n_groups=77, seed=5)
    before = counter.n
    weight = 1.0 / var
    weight[:7] = 0.0
    problem = make_problem(i_obs, weight, gid)
    target = ScalingTarget(comps, start)
    free = target.free_mask({"scale": np.eye(5, dtype=bool)[0]})
    data = target.data(problem, bases, anchor=target.flatten(true), free=free)
    rows = np.flatnonzero(np.asarray(problem.weight) > 0)
    select_rows(bases, rows)
    chunk_by_groups(problem, bases, target.x0, free, chunk_size=50)
    assert n_reflections(problem) == gid.size - 7
    params = target.params_of(target.x0)
    assert set(params) == {"decay", "scale"} and isinstance(params["scale"], np.ndarray)
    np.testing.assert_array_equal(target.effective(target.x0 + 1, data)[~free], target.flatten(true)[~free])
    assert counter.n == before


def test_one_compiled_objective_for_all_masks_and_anchors():
    comps, true, start, bases, i_obs, var, gid, _ = make_synthetic(n_groups=60, seed=6)
    problem = make_problem(i_obs, 1.0 / var, gid)
    target = ScalingTarget(comps, start)
    x = jnp.asarray(target.flatten(true))
    masks = [np.ones(target.n_params, bool), target.free_mask({"scale": True}), target.free_mask({"decay": True})]
    for k, free in enumerate(masks):  # rounds / consecutive cycles: new mask and anchor each time
        data = target.data(problem, bases, anchor=target.x0 + 0.01 * k, free=free)
        value, grad = target.value_and_grad(x, data)
        assert np.all(np.asarray(grad)[~free] == 0.0) and np.isfinite(float(value))
    assert target.value_and_grad._cache_size() == 1


def test_compilation_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXSCALE_CACHE_DIR", "")
    assert jaxscale.compilation_cache_dir() is None
    monkeypatch.setenv("JAXSCALE_CACHE_DIR", str(tmp_path / "c"))
    assert jaxscale.compilation_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("JAXSCALE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jaxscale.compilation_cache_dir() == str(tmp_path / "jaxscale")


def test_a_cache_folder_chosen_through_jax_still_caches_small_programs(tmp_path):
    """JAX_COMPILATION_CACHE_DIR picks the folder; jaxscale's thresholds (cache every program)
    still apply unless JAX's own threshold variables are set."""
    import subprocess
    import sys

    code = ("import jaxscale, jax; c = jax.config; print(c.jax_compilation_cache_dir, "
            "c.jax_persistent_cache_min_compile_time_secs, c.jax_persistent_cache_min_entry_size_bytes)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JAXSCALE_"))}
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jaxdir")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path / "jaxdir"), "0.0", "-1"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "5"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[1] == "5.0"


def test_lowered_programs_carry_no_tracebacks_unless_asked():
    """jaxscale drops the Python call stacks JAX attaches to every lowered operation (smaller
    programs, faster compiles); a caller's JAX_* setting wins."""
    import subprocess
    import sys

    code = ("import jaxscale, jax, jax.numpy as jnp\n"
            "def f(x):\n    return jnp.sin(x) * 2.0\n"
            "print(jax.jit(f).lower(1.0).as_text(debug_info=True).count('callsite('))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JAXSCALE_"))}
    env["JAXSCALE_CACHE_DIR"] = ""
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env["JAX_TRACEBACK_IN_LOCATIONS_LIMIT"] = "10"
    env["JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS"] = "1"
    full = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(quiet.stdout) == 0 < int(full.stdout)
