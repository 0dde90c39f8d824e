"""A native CPU kernel (XLA FFI) for the two passes of the per-still KB target on one device.

`native_kb.cc` computes what `sharding._local_value_and_grad` computes for one device's rows,
in two custom calls so that the sharded path can `psum` the group sums between them:
`group_sums(x, obs)` -> f[n_groups, 2] (sum w g I, sum w g^2) and
`value_and_grad(x, ih, obs)` -> (sum w r^2, f[n_exp, 2]). XLA CPU's code for these passes is
bound by its exp, the scatter's per-update overhead and register spills (docs/serial.md); the
hand-written loop streams each row once per pass with a vectorised inline exp.

The shared library is built with the system C++ compiler (`-march=native`: it runs where it
is built) into `library_dir()` (the user's cache folder, apart from the XLA compilation cache:
it is a per-machine build, like an installed extension), named by a hash of the source,
compiler, jaxlib version, flags and CPU; built to a temp name and renamed, so processes
building at once do not see a partial file. A run never waits for it: where the library is
missing, `available()` starts the build in a detached background process and this process
uses the XLA path (`available(build=True)` builds first: benchmarks, tests). No compiler, a
failed build or JAXSCALE_NATIVE_KERNEL=0: `available()` is False and the XLA path is used.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kb.cc")
# IEEE arithmetic (no -ffast-math); `#pragma omp simd` loops vectorised (-fopenmp-simd, no OpenMP runtime).
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-fPIC", "-shared", "-w")
LIBS = ()
ENV_SWITCH = "JAXSCALE_NATIVE_KERNEL"  # "0": never build or use the kernel
THREADS_SWITCH = "JAXSCALE_NATIVE_THREADS"  # "1" or "2" threads per call (see threads_for)
DEFAULT_THREADS = "2"
_TARGETS = {np.dtype(np.float64): ("jaxscale_kb_group_sums_f64", "jaxscale_kb_value_and_grad_f64",
                                    "jaxscale_kb_evaluate_f64"),
            np.dtype(np.float32): ("jaxscale_kb_group_sums_f32", "jaxscale_kb_value_and_grad_f32",
                                   "jaxscale_kb_evaluate_f32")}
_SYMBOLS = {"jaxscale_kb_group_sums_f64": "KbGroupSumsF64", "jaxscale_kb_value_and_grad_f64": "KbValueAndGradF64",
            "jaxscale_kb_evaluate_f64": "KbEvaluateF64",
            "jaxscale_kb_group_sums_f32": "KbGroupSumsF32", "jaxscale_kb_value_and_grad_f32": "KbValueAndGradF32",
            "jaxscale_kb_evaluate_f32": "KbEvaluateF32"}
# Largest call (rows) whose first pass keeps exp(B s) per row for the second (`evaluate`): while
# the rows sit in cache, reading it back is cheaper than the exp (native_kb.cc `Evaluate`).
KEPT_DECAY_MAX_ROWS = 1 << 17
_lock = threading.Lock()


def compiler() -> str | None:
    """The C++ compiler to build with ($CXX, else c++ or g++ on PATH), None if there is none."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_dir() -> Path:
    """Folder of built libraries: $JAXSCALE_NATIVE_DIR, else <user cache>/jaxscale/native
    ($XDG_CACHE_HOME or ~/.cache). Not the compilation cache folder: a run timed with a fresh
    JAXSCALE_CACHE_DIR (a cold compile) should not rebuild the library each time."""
    env = os.environ.get("JAXSCALE_NATIVE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxscale" / "native"


def _cpu() -> str:
    """What `-march=native` compiles for: machine, processor and (Linux) the CPU's model and
    feature flags, so that a cache folder shared between different machines (a cluster
    home) holds one library per CPU kind."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            block = f.read().split("\n\n", 1)[0]  # the first processor
        parts += [line for line in block.splitlines() if line.split(":")[0].strip() in
                  ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part")]
    except OSError:
        pass
    return "\n".join(parts)


def _library_path(cxx: str) -> Path:
    """Where the library for this source, compiler, jaxlib, flags and CPU lives."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), jax.lib.__version__.encode(), " ".join(FLAGS + LIBS).encode(),
                 _cpu().encode()):
        key.update(part)
        key.update(b"\0")
    return library_dir() / f"native_kb_{key.hexdigest()[:20]}.so"


def _build(cxx: str, path: Path) -> None:
    """Compile the library to a temp name beside `path`, then rename (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp, *LIBS],
                       check=True, capture_output=True, timeout=300)
        os.chmod(tmp, 0o755)  # mkstemp's 0600 (and the compiler keeping it) would hide it from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _start_background_build() -> None:
    """Build the library in a detached process (it outlives this one), for the next run."""
    try:
        subprocess.Popen([sys.executable, "-m", "jaxscale.target.native_kb"], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log.debug("native KB kernel: building in the background; this run uses the XLA path")
    except OSError as err:
        log.debug("native KB kernel: background build not started (%s)", err)


def _load(build: bool) -> bool:
    """Load and register the kernels; where the library is missing, build it first (`build`)
    or start a background build and return False. False on any failure."""
    cxx = compiler()
    if cxx is None:
        log.debug("native KB kernel: no C++ compiler, using the XLA path")
        return False
    try:
        path = _library_path(cxx)
        if not path.exists():
            if not build:
                _start_background_build()
                return False
            _build(cxx, path)
        lib = ctypes.CDLL(str(path))
        for name, symbol in _SYMBOLS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as err:  # noqa: BLE001 (any failure to build, load or register: the XLA path)
        log.debug("native KB kernel unavailable (%s), using the XLA path", err)
        return False
    return True


_loaded: bool | None = None  # this process's answer, once given (programs traced later agree)
_build_tried = False


def available(dtype=jnp.float64, build: bool = False) -> bool:
    """Whether the native kernel runs for `dtype` (float64 or float32) in this process. The
    first call decides for the whole process; `build=True` builds a missing library first
    (blocking, ~4 s once per machine) instead of leaving it to a background build."""
    global _loaded, _build_tried
    if os.environ.get(ENV_SWITCH, "1") == "0" or np.dtype(dtype) not in _TARGETS:
        return False
    with _lock:
        if _loaded is None or (not _loaded and build and not _build_tried):
            _build_tried = _build_tried or build
            _loaded = _load(build)
        return _loaded


def threads_for(n_devices: int) -> int:
    """Threads per call: 2 for one device when this process may use 2+ cores (from 2^14 rows
    the second half of the rows is offered to a persistent helper thread, which stays out of
    the way while the other core is busy; native_kb.cc), else 1; JAXSCALE_NATIVE_THREADS=1
    keeps every call on one thread. Session 6 (docs/serial.md): with the other core free
    0.20-0.26 against 0.33-0.34 ms at 10^5 rows, 23-32 against 37 ms at 10^7; with one or
    two busy processes beside it, means within +-20 % of one thread's. Results do not
    depend on it (bitwise)."""
    if os.environ.get(THREADS_SWITCH, DEFAULT_THREADS) != "2" or n_devices != 1:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return 2 if cores >= 2 else 1


def group_sums(x: jax.Array, obs, threads: int = 1) -> jax.Array:
    """f[n_groups, 2] (sum w g I, sum w g^2) over `obs`'s (local) rows; `available()` first."""
    name = _TARGETS[np.dtype(x.dtype)][0]
    sums = jax.ShapeDtypeStruct((obs.n_groups, 2), x.dtype)
    call = jax.ffi.ffi_call(name, (sums, sums))  # the second: the second half's sums (scratch)
    return call(x, obs.intensity, obs.weight, obs.inv_two_d_sq, obs.group_id, obs.chunk_experiment,
                threads=np.int64(threads))[0]


def value_and_grad(x: jax.Array, ih: jax.Array, obs, threads: int = 1) -> tuple[jax.Array, jax.Array]:
    """(sum w r^2, f[n_exp, 2] (df/dk, df/dB)) over `obs`'s (local) rows given I_h f[n_groups]."""
    name = _TARGETS[np.dtype(x.dtype)][1]
    call = jax.ffi.ffi_call(name, (jax.ShapeDtypeStruct((), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype)))
    return call(x, ih, obs.intensity, obs.weight, obs.inv_two_d_sq, obs.group_id, obs.chunk_experiment,
                threads=np.int64(threads))


def evaluate(x: jax.Array, obs, threads: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum w r^2, f[n_exp, 2] (df/dk, df/dB), I_h f[n_groups]) over all of `obs`'s rows in one
    call: both passes and I_h between them (one device; the sharded path needs the psum of
    `group_sums` between the passes)."""
    name = _TARGETS[np.dtype(x.dtype)][2]
    sums = jax.ShapeDtypeStruct((obs.n_groups, 2), x.dtype)  # scratch: the group sums of each half
    n_rows = obs.intensity.shape[0]
    kept_decay = jax.ShapeDtypeStruct((n_rows if n_rows <= KEPT_DECAY_MAX_ROWS else 0,), x.dtype)  # scratch
    call = jax.ffi.ffi_call(name, (jax.ShapeDtypeStruct((), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   jax.ShapeDtypeStruct((obs.n_groups,), x.dtype), sums, sums, kept_decay))
    return call(x, obs.intensity, obs.weight, obs.inv_two_d_sq, obs.group_id, obs.chunk_experiment,
                threads=np.int64(threads))[:3]


if __name__ == "__main__":  # the detached background build (`_start_background_build`)
    _cxx = compiler()
    if _cxx is not None and os.environ.get(ENV_SWITCH, "1") != "0":
        _target = _library_path(_cxx)
        if not _target.exists():
            _build(_cxx, _target)
