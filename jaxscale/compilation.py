"""How jaxscale's XLA programs are compiled: fast-compiling options for small problems and
compilation ahead of need in a background thread.

On small data sets (10^3-10^4 observations) a first run is mostly XLA compilation, and most
of a compilation is XLA CPU's optimisation and code generation, which buys nothing when an
evaluation takes microseconds. `Program` jits a function twice, with XLA's defaults and with
`FAST_COMPILE_OPTIONS` (quartz's compilations ~4x faster, results equal to ~1e-14), and
picks one per call from the problem size (`fast_compile`); large problems keep full
optimisation, so their evaluations do not slow down.

Where a numpy twin of a computation exists (g = the product of the model's link
functions, `ScalingTarget.inverse_scale_host`), jobs up to `HOST_MAX_ROWS` rows evaluate it
in numpy and compile nothing (`host_evaluation`).

`precompile(program, *args)` lowers and compiles a program for the given argument shapes in
a background thread (XLA compiles without holding the GIL), so that programs needed later in
a run (the full-matrix normal equations, the variance propagation) compile while the
L-BFGS rounds run on the main thread. A call that needs a program still being compiled
waits for it instead of compiling it a second time; one never started in the background
compiles on the calling thread, as without precompilation.
"""
from __future__ import annotations

import atexit
import queue
import threading
from typing import Any, Callable

import jax
import numpy as np

# XLA CPU options that cut compile time 4-5x on the scaling programs: LLVM optimisation
# level 0, the classic fusion emitters, code generation in one piece (splitting it over
# threads costs more than it saves on programs this small). An evaluation is 2-4x slower,
# which on small problems costs far less than the compilation saved.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False,
                        "xla_cpu_parallel_codegen_split_count": 1}
# largest problem (observation rows of one evaluation) compiled with the fast options
FAST_COMPILE_MAX_ROWS = 1 << 13


# largest job evaluated in numpy instead of compiling a program where a numpy twin exists
# (g over all rows: ~10 ms at 10^5 rows, against 0.1-0.3 s to trace and compile)
HOST_MAX_ROWS = 1 << 17


def host_evaluation(n_rows: int) -> bool:
    """True when a job over n_rows rows should run in numpy (where it can) instead of XLA."""
    return int(n_rows) <= HOST_MAX_ROWS


def fast_compile(n_rows: int, max_rows: int = FAST_COMPILE_MAX_ROWS) -> bool:
    """True when a program over n_rows observation rows should compile with the fast options
    (`max_rows`: the largest such problem, where a program's own crossover differs)."""
    return int(n_rows) <= max_rows


def _signature(args: tuple) -> tuple:
    """Hashable shape/dtype/structure key of a call's arguments (static fields included)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(np.shape(a)) if not hasattr(a, "shape") else tuple(a.shape),
                           np.dtype(a.dtype) if hasattr(a, "dtype") else np.result_type(a)) for a in leaves)


class _Once:
    """One compilation, run by whichever thread gets to it first; others wait for it."""

    def __init__(self, compile_fn: Callable[[], Any]):
        self.compile_fn = compile_fn
        self.lock = threading.Lock()
        self.done = False

    def run(self) -> None:
        with self.lock:
            if self.done:
                return
            try:
                self.compile_fn()
            except Exception:  # noqa: BLE001 - the caller's own call compiles and raises
                pass
            self.done = True
            self.compile_fn = None  # let go of the argument shapes


class Program:
    """A jitted function with a full-optimisation and a fast-compile variant.

    `rows(*args) -> int` gives the observation rows of a call (the size that decides the
    variant); without it every call uses the fast variant (parameter-sized programs).
    `fast=True/False` at construction forces one variant; `max_fast_rows`: the largest call
    (rows) compiled with the fast options (default `FAST_COMPILE_MAX_ROWS`). Calls look like
    the function's (keyword arguments: the static ones, `static_argnames`).
    """

    def __init__(self, fun: Callable, rows: Callable[..., int] | None = None, fast: bool | None = None,
                 max_fast_rows: int = FAST_COMPILE_MAX_ROWS, **jit_kwargs: Any):
        self.fun = fun
        self.rows = rows
        self.fast = fast
        self.max_fast_rows = max_fast_rows
        self._full = jax.jit(fun, **jit_kwargs)
        self._fast = jax.jit(fun, compiler_options=FAST_COMPILE_OPTIONS, **jit_kwargs)
        self._pending: dict[tuple, _Once] = {}

    def variant(self, *args: Any, rows: int | None = None) -> Any:
        """The jitted function (fast or full) that a call with these arguments uses;
        `rows` overrides the size taken from the arguments (e.g. a chunk of a larger job)."""
        if self.fast is not None:
            return self._fast if self.fast else self._full
        if rows is None:
            if self.rows is None:
                return self._fast
            rows = self.rows(*args)
        return self._fast if fast_compile(rows, self.max_fast_rows) else self._full

    def __call__(self, *args: Any, **static: Any) -> Any:
        return self.call(args, **static)

    def call(self, args: tuple, rows: int | None = None, **static: Any) -> Any:
        """`self(*args, **static)`, with the compile options chosen for `rows` observation rows."""
        fn = self.variant(*args, rows=rows)
        if self._pending:  # a background compilation of this call may be running: wait for it
            task = self._pending.pop(_key(fn is self._fast, args, static), None)
            if task is not None:
                task.run()
        return fn(*args, **static)

    def lower(self, *args: Any, rows: int | None = None, **static: Any) -> Any:
        return self.variant(*args, rows=rows).lower(*args, **static)

    def _cache_size(self) -> int:
        """Compiled executables held (both variants), as `jax.jit(f)._cache_size()`."""
        return self._full._cache_size() + self._fast._cache_size()

    def _task(self, args: tuple, rows: int | None, static: dict) -> _Once:
        fn = self.variant(*args, rows=rows)
        key = _key(fn is self._fast, args, static)
        task = self._pending.get(key)
        if task is None:
            task = self._pending[key] = _Once(lambda: fn.lower(*args, **static).compile())
        return task


def _key(fast: bool, args: tuple, static: dict) -> tuple:
    """Which compilation a call needs: variant, argument shapes, static keyword values."""
    return fast, _signature(args), tuple(sorted(static.items()))


class _Compiler:
    """One daemon thread compiling queued programs in order (the machine may have 2 cores)."""

    def __init__(self):
        self.tasks: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.closing = False
        atexit.register(self.close)

    def submit(self, task: _Once) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.closing = False
                self.thread = threading.Thread(target=self._work, name="jaxscale-compile", daemon=True)
                self.thread.start()
        self.tasks.put(task)

    def _work(self) -> None:
        while True:
            task = self.tasks.get()
            if not self.closing:
                task.run()
            self.tasks.task_done()

    def close(self) -> None:
        """At exit: skip what has not started, let a running compilation finish (a thread
        killed inside XLA at interpreter shutdown could crash the process)."""
        self.closing = True
        self.tasks.join()
        self.closing = False  # the queue is empty: later submissions run again

    def wait(self) -> None:
        """Block until every queued compilation is finished (tests, timing)."""
        self.tasks.join()


_COMPILER = _Compiler()


def precompile(program: Program, *args: Any, rows: int | None = None, **static: Any) -> None:
    """Compile `program` for the shapes of `args` (arrays or `jax.ShapeDtypeStruct`s) and the
    values of its static keyword arguments in the background; the first call with those
    shapes waits for it instead of compiling. `rows`: as `Program.call`."""
    _COMPILER.submit(program._task(args, rows, static))


def _warm_up_program(x):
    return x + 1.0


def warm_up() -> None:
    """Compile a trivial program in the background: the first compilation of a process pays
    ~0.1 s of one-time set-up (JAX's lowering machinery, the MLIR context, the compile
    cache), which this moves off the main thread while it reads the input files. Called
    after the heavy imports, so that the two threads do not import modules concurrently."""
    precompile(Program(_warm_up_program, fast=True), jax.ShapeDtypeStruct((1,), np.float64))


def finish_background_compilation() -> None:
    """Skip queued background compilations and wait for the running one: its result is being
    written to the persistent compile cache, and a process ended in the middle (`os._exit`)
    would leave a truncated entry there."""
    _COMPILER.close()


def wait_for_precompiled() -> None:
    """Block until every background compilation has finished."""
    _COMPILER.wait()


__all__ = ["FAST_COMPILE_MAX_ROWS", "FAST_COMPILE_OPTIONS", "HOST_MAX_ROWS", "Program", "fast_compile",
           "finish_background_compilation", "host_evaluation", "precompile", "wait_for_precompiled", "warm_up"]
