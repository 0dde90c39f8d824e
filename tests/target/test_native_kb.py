"""The native CPU kernel (XLA FFI) of the per-still KB evaluation against the XLA path:
group sums, value and gradient at 1e-12 relative (padding rows, excluded rows, empty groups,
stills over several chunks, random x), the target using it, and the fallback without it."""
from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.serial import simulate_flat_stills
from jaxscale.target import native_kb
from jaxscale.target.sharding import (CPU_BLOCK_CHUNKS, KBStillsTarget, _local_value_and_grad, make_observations,
                                      still_layout)

needs_compiler = pytest.mark.skipif(native_kb.compiler() is None, reason="no C++ compiler")


@pytest.fixture(autouse=True, scope="module")
def _library_built():
    """The kernels built and registered (a run would leave a missing library to a background
    build and use the XLA path meanwhile)."""
    if native_kb.compiler() is not None:
        assert native_kb.available(jnp.float64, build=True)


def _observations(n_exp=60, per=37, n_groups=500, seed=0, dtype=jnp.float64):
    """Stills of 37 rows (5 chunks, the last padded with 3 zero-weight rows), every 11th row
    excluded (weight 0), 50 groups that no row measures, k and B random."""
    sim = simulate_flat_stills(n_exp, per, n_groups, seed=seed)
    w = 1.0 / sim["variance"]
    w[::11] = 0.0
    rng = np.random.default_rng(seed)
    x = np.stack([np.exp(rng.normal(0, 0.3, n_exp)), rng.normal(0, 8, n_exp)], 1)
    obs = make_observations(sim["intensity"], w, sim["d"], sim["group_id"], sim["experiment_index"], n_groups + 50,
                            n_exp, dtype=dtype)
    return obs, jnp.asarray(x, dtype=dtype)


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@needs_compiler
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_passes_equal_the_xla_path_float64(seed):
    obs, x = _observations(seed=seed)
    assert obs.intensity.shape[0] == 60 * 5 * 8  # 5 chunks per still, padding included
    assert native_kb.available(jnp.float64)  # built by the fixture
    for block_chunks in (CPU_BLOCK_CHUNKS, 7, None):  # the XLA loop in blocks, and one block
        ref_value, ref_grad, ref_ih = jax.jit(lambda x_, o: _local_value_and_grad(x_, o, None, block_chunks))(x, obs)
        value, grad, ih = jax.jit(lambda x_, o: _local_value_and_grad(x_, o, None, block_chunks, native=True))(x, obs)
        assert abs(float(value) - float(ref_value)) <= 1e-12 * abs(float(ref_value))
        assert _relative(grad, ref_grad) <= 1e-12
        assert _relative(ih, ref_ih) <= 1e-12
        assert np.all(np.asarray(ih)[-50:] == 0)  # groups without rows: I_h 0, as the XLA path
    # the group sums themselves, against numpy in float64
    sums = np.asarray(jax.jit(native_kb.group_sums)(x, obs))
    e = np.repeat(np.asarray(obs.chunk_experiment), obs.chunk)
    xn, s, w, i_obs = np.asarray(x), np.asarray(obs.inv_two_d_sq), np.asarray(obs.weight), np.asarray(obs.intensity)
    g = xn[e, 0] * np.exp(xn[e, 1] * s)
    gid = np.asarray(obs.group_id)
    expected = np.stack([np.bincount(gid, w * g * i_obs, obs.n_groups), np.bincount(gid, w * g * g, obs.n_groups)], 1)
    assert _relative(sums, expected) <= 1e-12
    assert np.allclose(sums, expected, rtol=1e-12, atol=0)


@needs_compiler
@pytest.mark.parametrize("chunk", [4, 16, 3])
def test_native_passes_other_chunk_sizes(chunk):
    """Chunks of 4 and 16 rows (compiled sizes) and of 3 (the generic loop) give the XLA numbers."""
    sim = simulate_flat_stills(30, 23, 200, seed=5)
    rng = np.random.default_rng(5)
    x = jnp.asarray(np.stack([np.exp(rng.normal(0, 0.3, 30)), rng.normal(0, 8, 30)], 1))
    layout = still_layout(sim["experiment_index"], 30, None, chunk=chunk)
    obs = make_observations(sim["intensity"], 1.0 / sim["variance"], sim["d"], sim["group_id"],
                            sim["experiment_index"], 200, 30, layout=layout)
    assert obs.chunk == chunk
    ref_value, ref_grad, ref_ih = _local_value_and_grad(x, obs, None, None)
    value, grad, ih = _local_value_and_grad(x, obs, None, None, native=True)
    assert abs(float(value) - float(ref_value)) <= 1e-12 * abs(float(ref_value))
    assert _relative(grad, ref_grad) <= 1e-12
    assert _relative(ih, ref_ih) <= 1e-12


@needs_compiler
def test_native_passes_in_two_threads_equal_one_thread_bitwise(monkeypatch):
    """From 2^14 rows a call offers the second half of its rows (split at a still boundary) to a
    helper thread; each half has its own sums, added in a fixed order, so one thread, two
    threads, exp(B s) kept from the first pass or computed again, and the two-call path of the
    sharded target (group sums, I_h, value and gradient) give the same bits, and the XLA numbers
    to rounding. Repeated: which thread does the second half varies from call to call."""
    obs, x = _observations(n_exp=400, per=100, n_groups=3000, seed=6)  # 400 x 104 rows
    assert obs.intensity.shape[0] >= 1 << 15
    one = _local_value_and_grad(x, obs, None, None, native=True, native_threads=1)
    ref = _local_value_and_grad(x, obs, None, CPU_BLOCK_CHUNKS)
    assert abs(float(one[0]) - float(ref[0])) <= 1e-12 * abs(float(ref[0]))
    assert _relative(one[1], ref[1]) <= 1e-12
    assert _relative(one[2], ref[2]) <= 1e-12
    two = jax.jit(lambda x_, o: _local_value_and_grad(x_, o, None, None, native=True, native_threads=2))
    for _ in range(20):
        got = two(x, obs)
        for a, b in zip(got, one):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    monkeypatch.setattr(native_kb, "KEPT_DECAY_MAX_ROWS", 0)  # exp(B s) computed again in the second pass
    for threads in (1, 2):
        got = _local_value_and_grad(x, obs, None, None, native=True, native_threads=threads)
        for a, b in zip(got, one):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for threads in (1, 2):  # the two calls of the sharded path, on one device
        sums = native_kb.group_sums(x, obs, threads)
        ih = jnp.where(sums[:, 1] > 0, sums[:, 0] / jnp.where(sums[:, 1] > 0, sums[:, 1], 1.0), 0.0)
        np.testing.assert_array_equal(np.asarray(ih), np.asarray(one[2]))
        value, grad = native_kb.value_and_grad(x, ih, obs, threads)
        assert float(value) == float(one[0])
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(one[1]))


def test_thread_switch(monkeypatch):
    """JAXSCALE_NATIVE_THREADS picks 1 or 2 threads per call (else the default), 2 only for one
    device where the process may use 2+ cores."""
    monkeypatch.setattr(native_kb.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv(native_kb.THREADS_SWITCH, raising=False)
    assert native_kb.threads_for(1) == 2  # the default where two cores may be used
    monkeypatch.setenv(native_kb.THREADS_SWITCH, "2")
    assert native_kb.threads_for(1) == 2
    assert native_kb.threads_for(4) == 1
    monkeypatch.setenv(native_kb.THREADS_SWITCH, "1")
    assert native_kb.threads_for(1) == 1
    monkeypatch.setenv(native_kb.THREADS_SWITCH, "2")
    monkeypatch.setattr(native_kb.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert native_kb.threads_for(1) == 1


@needs_compiler
def test_native_exp_is_accurate_over_a_wide_range_of_b():
    """The kernel's own exp: rows whose B s spans -700..700 (1 ulp-level agreement with numpy)."""
    n = 8 * 64
    s = np.linspace(0.0, 7.0, n)
    b = 100.0
    obs = make_observations(np.ones(n), np.ones(n), np.sqrt(0.5 / np.maximum(s, 1e-300)), np.arange(n) % n,
                            np.zeros(n, np.int64), n, 1)
    x = jnp.asarray([[1.0, b]])
    sums = np.asarray(jax.jit(native_kb.group_sums)(x, obs))  # column 0: w g I = exp(B s)
    expected = np.exp(b * np.asarray(obs.inv_two_d_sq))
    np.testing.assert_allclose(sums[:, 0], expected, rtol=4e-16)
    x_neg = jnp.asarray([[1.0, -b]])
    sums = np.asarray(jax.jit(native_kb.group_sums)(x_neg, obs))
    np.testing.assert_allclose(sums[:, 0], np.exp(-b * np.asarray(obs.inv_two_d_sq)), rtol=4e-16, atol=0)


def _library_exp(name, v):
    """out = exp(v) by the library's exported `name` (KbExpF64: the kernel's exp, by the table
    where AVX-512 is there; KbExpPortableF64: the portable exp_of; F32 likewise)."""
    lib = ctypes.CDLL(str(native_kb._library_path(native_kb.compiler())))  # built by the fixture
    v = np.ascontiguousarray(v)
    out = np.full_like(v, -1.0)
    getattr(lib, name)(v.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(v.size))
    return out


@needs_compiler
@pytest.mark.parametrize("name", ["KbExpF64", "KbExpPortableF64"])
def test_native_exp_float64_against_numpy(name):
    """The kernel's exp (table-driven where AVX-512 is there, else exp_of) and exp_of itself
    agree with numpy's to 4e-16 relative over -708..709, also in the lanes of a last, partial
    vector; 0 below -708, inf above 709, NaN kept."""
    rng = np.random.default_rng(3)
    v = np.concatenate([np.linspace(-708.0, 709.0, 200_003), rng.uniform(-708.0, 709.0, 100_000),
                        rng.uniform(-0.05, 0.05, 10_000), [0.0, -0.0, 5e-324, 1.0, -1.0]])
    np.testing.assert_allclose(_library_exp(name, v), np.exp(v), rtol=4e-16, atol=0)
    assert _library_exp(name, np.array([0.0, 1.0]))[0] == 1.0
    for n in range(1, 18):  # lengths that end in a partial vector
        np.testing.assert_allclose(_library_exp(name, v[1000:1000 + n]), np.exp(v[1000:1000 + n]), rtol=4e-16, atol=0)
    special = np.array([-np.inf, -1e300, -709.0, -708.001, 709.001, 710.0, 1e300, np.inf, np.nan, 2.0])
    got = _library_exp(name, special)
    np.testing.assert_array_equal(got[:3], 0.0)
    np.testing.assert_array_equal(got[4:8], np.inf)
    assert np.isnan(got[8]) and got[9] == pytest.approx(np.exp(2.0), rel=4e-16)
    assert got[3] == 0.0  # the kernel's cut-off: 0 below -708


@needs_compiler
@pytest.mark.parametrize("name", ["KbExpF32", "KbExpPortableF32"])
def test_native_exp_float32_against_float64(name):
    """Both float exps within 2 float32 ulp (2.4e-7 relative) of exp in float64 over -87..88,
    0 below -87, inf above 88, NaN kept."""
    v = np.concatenate([np.linspace(-87.0, 88.0, 100_003), [0.0, 1.0, -1.0]]).astype(np.float32)
    np.testing.assert_allclose(_library_exp(name, v), np.exp(v.astype(np.float64)), rtol=2.4e-7, atol=0)
    for n in range(1, 34):
        np.testing.assert_allclose(_library_exp(name, v[500:500 + n]), np.exp(v[500:500 + n].astype(np.float64)),
                                   rtol=2.4e-7, atol=0)
    got = _library_exp(name, np.array([-np.inf, -88.0, 89.0, np.inf, np.nan], np.float32))
    np.testing.assert_array_equal(got[:2], 0.0)
    np.testing.assert_array_equal(got[2:4], np.inf)
    assert np.isnan(got[4])


@needs_compiler
def test_native_passes_float32_close_to_xla_path():
    obs, x = _observations(dtype=jnp.float32)
    ref_value, ref_grad, ref_ih = jax.jit(lambda x_, o: _local_value_and_grad(x_, o, None, CPU_BLOCK_CHUNKS))(x, obs)
    value, grad, ih = jax.jit(lambda x_, o: _local_value_and_grad(x_, o, None, CPU_BLOCK_CHUNKS, native=True))(x, obs)
    assert value.dtype == grad.dtype == jnp.float32
    assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
    assert _relative(grad, ref_grad) <= 1e-5
    assert _relative(ih, ref_ih) <= 1e-5


@needs_compiler
def test_target_uses_native_kernel_on_cpu_and_matches_xla():
    obs, x = _observations(seed=3)
    t = KBStillsTarget()
    on_cpu = jax.devices()[0].platform == "cpu"
    assert t.uses_native_kernel(jnp.float64) == on_cpu
    free = jnp.ones(x.shape, bool)
    value, grad = t.value_and_grad(x, obs, free, x)
    ref_value, ref_grad, _ = _local_value_and_grad(x, obs, None, t.block_chunks, native=False)
    assert abs(float(value) - float(ref_value)) <= 1e-12 * abs(float(ref_value))
    assert _relative(grad, ref_grad) <= 1e-12


def test_fallback_without_compiler_or_when_switched_off(monkeypatch, tmp_path):
    """No compiler, a failing build or JAXSCALE_NATIVE_KERNEL=0: the kernel is not used and
    the target evaluates the XLA path (same numbers)."""
    monkeypatch.setattr(native_kb, "compiler", lambda: None)
    assert native_kb._load(build=True) is False
    monkeypatch.undo()
    if native_kb.compiler() is not None:  # a build that fails (bad flag): no library, False
        monkeypatch.setattr(native_kb, "FLAGS", native_kb.FLAGS + ("-fno-such-flag-for-jaxscale",))
        monkeypatch.setattr(native_kb, "_library_path", lambda cxx: tmp_path / "native_kb_test.so")
        assert native_kb._load(build=True) is False
        assert not (tmp_path / "native_kb_test.so").exists() and not list(tmp_path.iterdir())
        monkeypatch.undo()
    monkeypatch.setenv(native_kb.ENV_SWITCH, "0")
    assert not native_kb.available(jnp.float64)
    t = KBStillsTarget()
    assert not t.uses_native_kernel(jnp.float64)
    obs, x = _observations(seed=4)
    value, grad, ih = t.raw_value_and_grad(x, obs)  # traced now, with the switch off: the XLA loops
    jaxpr = str(jax.make_jaxpr(t.raw_value_and_grad)(x, obs))
    assert "ffi_call" not in jaxpr
    ref_value, ref_grad, _ = _local_value_and_grad(x, obs, None, t.block_chunks)
    assert float(value) == float(ref_value)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(ref_grad))
    assert not native_kb.available(jnp.float16)


@needs_compiler
def test_a_missing_library_is_built_in_the_background_not_by_the_run(monkeypatch, tmp_path):
    """Without `build`, a missing library is not built by the calling process (a run never
    waits ~4 s for the compiler): a detached build is started and the XLA path is used. That
    build (`python -m jaxscale.target.native_kb`) writes the library where the next run looks."""
    started = []
    monkeypatch.setenv("JAXSCALE_NATIVE_DIR", str(tmp_path / "lib"))
    monkeypatch.setattr(native_kb, "_start_background_build", lambda: started.append(1))
    assert native_kb._load(build=False) is False
    assert started == [1] and not (tmp_path / "lib").exists()
    import os
    import subprocess
    import sys
    subprocess.run([sys.executable, "-m", "jaxscale.target.native_kb"], check=True, timeout=300,
                   env=dict(os.environ, JAXSCALE_NATIVE_DIR=str(tmp_path / "lib")))
    built = native_kb._library_path(native_kb.compiler())
    assert built.parent == tmp_path / "lib" and built.exists()
    assert [p.name for p in (tmp_path / "lib").iterdir()] == [built.name]  # no temp file left


def test_library_folder_and_name(monkeypatch, tmp_path):
    """The library lives apart from the compilation cache (a fresh JAXSCALE_CACHE_DIR does not
    rebuild it) and its name depends on the CPU it is built for (-march=native)."""
    monkeypatch.delenv("JAXSCALE_NATIVE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("JAXSCALE_CACHE_DIR", str(tmp_path / "cold"))
    assert native_kb.library_dir() == tmp_path / "xdg" / "jaxscale" / "native"
    monkeypatch.setenv("JAXSCALE_NATIVE_DIR", str(tmp_path / "n"))
    assert native_kb.library_dir() == tmp_path / "n"
    cxx = native_kb.compiler()
    if cxx is not None:
        here = native_kb._library_path(cxx)
        monkeypatch.setattr(native_kb, "_cpu", lambda: "another CPU")
        assert native_kb._library_path(cxx) != here and native_kb._library_path(cxx).parent == here.parent
