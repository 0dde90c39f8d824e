"""jaxscale: JAX-accelerated, differentiable scaling of X-ray diffraction data.

float64 is the default so that results match DIALS; set JAXSCALE_X64=0 before import
for float32 throughput runs.

Compiled XLA programs are kept in a persistent cache so that a second run on data of the
same shapes skips compilation (on a small CPU most of a first run is compilation):
`$JAXSCALE_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxscale`, else `~/.cache/jaxscale`;
`JAXSCALE_CACHE_DIR=` (empty) turns it off. Entries are small (a few MB per data-set
shape); delete the folder to reclaim space.
"""
import gc as _gc
import os as _os

# numpy's BLAS only ever sees parameter-sized problems here (host twins of small jobs, a few
# hundred unknowns), where its threads cost more than they give; with the other cores busy,
# OpenBLAS's spinning threads made the 10 Cholesky factorisations of a 100-still job take 0.07-2 s
# instead of 3 ms. One thread unless the caller chose (set before numpy is first imported).
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Importing JAX creates ~200k long-lived objects; with the collector running, its passes
# over them cost ~0.1-0.2 s of every process. Nothing collectable is made here, so they are
# frozen (never scanned again) before the collector is turned back on: else its first pass,
# right after the import, scans them all once (~0.05-0.09 s measured).
_gc_was_enabled = _gc.isenabled()
_gc.disable()
try:
    import jax as _jax
finally:
    if _gc_was_enabled:
        _gc.freeze()
        _gc.enable()

if _os.environ.get("JAXSCALE_X64", "1") != "0":
    _jax.config.update("jax_enable_x64", True)

# Source locations of lowered programs without Python tracebacks: JAX otherwise attaches up
# to 100 frames to every operation, which doubles the MLIR text and costs ~15 % of each XLA
# compile and part of each lowering (quartz: the objective compiles in 54 instead of 62 ms).
# Only XLA dumps and profiles lose detail; set the JAX_* variables to keep them.
for _name, _value in (("jax_include_full_tracebacks_in_locations", False), ("jax_traceback_in_locations_limit", 0)):
    if _name.upper() not in _os.environ:
        _jax.config.update(_name, _value)

# CPU programs run on the calling thread instead of being handed to XLA's worker pool: the job
# waits on nearly every result at once (host line search, convergence tests), so the hand-off
# (a futex wake-up and a thread switch each way) bought no overlap and cost ~0.1 ms per call,
# a quarter of a 10^5-row KB evaluation (0.34-0.37 against 0.45-0.63 ms). Multi-device
# (sharded) programs are not affected. JAX_CPU_ENABLE_ASYNC_DISPATCH=1 restores the pool.
if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in _os.environ:
    _jax.config.update("jax_cpu_enable_async_dispatch", False)


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc malloc: blocks under `mmap_bytes` from the heap, the heap trimmed only when
    `trim_bytes` are free at its top (setting them fixes both: glibc stops adapting them).
    Returns whether it applied (False off glibc)."""
    try:
        if not _os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, ValueError, OSError):  # not a GNU system
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_bytes) and mallopt(m_trim_threshold, trim_bytes))


def _keep_heap_slack() -> None:
    """Start at the end state of glibc's own adaptive thresholds (32 MB, 64 MB). With its
    start state each evaluation's ~1 MB of XLA scratch went back to the kernel at its free
    and was faulted in again on a later call (26-72 page faults per 10^5-row call on
    average). Not where a MALLOC_* variable is set (the command line raises them further)."""
    if not any(name.startswith("MALLOC_") for name in _os.environ):
        set_malloc_thresholds(32 << 20, 64 << 20)


_keep_heap_slack()

__version__ = "0.1.0"

def compilation_cache_dir() -> str | None:
    """The persistent compilation cache folder from the environment (None: off)."""
    env = _os.environ.get("JAXSCALE_CACHE_DIR")
    if env is not None:
        return env or None
    base = _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache")
    return _os.path.join(base, "jaxscale")


def _enable_compilation_cache() -> None:
    """Point JAX's persistent cache at `compilation_cache_dir()` (unless the caller chose a
    folder through JAX's own setting), caching every program, also the tiny ones (each costs
    a compile per process otherwise), unless the caller set JAX's thresholds."""
    path = compilation_cache_dir()
    if path is None:
        return
    if not _jax.config.jax_compilation_cache_dir:
        try:
            _os.makedirs(path, exist_ok=True)
        except OSError:  # read-only home etc.: run without the cache
            return
        _jax.config.update("jax_compilation_cache_dir", path)
    for name, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                        ("jax_persistent_cache_min_entry_size_bytes", -1)):
        if name.upper() not in _os.environ:
            _jax.config.update(name, value)


_enable_compilation_cache()
