#!/usr/bin/env python
"""Profile one `jaxscale scale` run: import time, time per phase, XLA compilations.

Usage: profile_scale.py [--where] [--json OUT] [--keep DIR] FILE.refl FILE.expt [...] [key=value ...]

Runs the same code path as the CLI (`jaxscale.scale.run` with the CLI's parameters) in this
process, with `jax.monitoring` listeners on tracing, lowering and XLA compilation. Prints
the import time of jaxscale, the run's own phase timings, the number of compilations and
their time per jitted function (`--where`: also the jaxscale source line that triggered
each compilation, or "background" for those compiled ahead by jaxscale.compilation), the
part of trace + lower + compile spent on the main thread (the rest overlapped the run),
persistent-cache hits, CPU time and peak RSS. Outputs go to a
temporary directory (`--keep DIR`: to DIR). The machine may be shared: compare CPU seconds and repeated runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import collections
import json
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

T_START = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("jaxscale") is None:  # else PYTHONPATH / the installed package decide which tree runs
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402

T_JAX = time.perf_counter()
import jaxscale  # noqa: E402,F401
import jaxscale.scale  # noqa: E402

T_IMPORT = time.perf_counter()

COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class CompileLog:
    """Per-function counts and seconds of tracing, lowering and backend compilation."""

    def __init__(self, where: bool):
        self.where = where
        self.count: dict[str, collections.Counter] = {e: collections.Counter() for e in (TRACE, LOWER, COMPILE)}
        self.seconds: dict[str, collections.Counter] = {e: collections.Counter() for e in (TRACE, LOWER, COMPILE)}
        self.sites: collections.Counter = collections.Counter()
        self.cache_hits = 0
        self.cache_misses = 0
        self.main_thread_s = 0.0  # trace + lower + compile seconds spent on the main thread

    def on_duration(self, event: str, duration: float, **kw) -> None:
        if event not in self.count:
            return
        name = str(kw.get("fun_name", "?"))
        if name.startswith("jit(") and name.endswith(")"):  # compile/lower events say jit(f), tracing f
            name = name[4:-1]
        self.count[event][name] += 1
        self.seconds[event][name] += duration
        if threading.current_thread() is threading.main_thread():
            self.main_thread_s += duration
        if event == COMPILE and self.where:
            self.sites[(name, _caller())] += 1

    def on_event(self, event: str, **kw) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1
        elif event == "/jax/compilation_cache/cache_misses":
            self.cache_misses += 1


def _caller() -> str:
    """Innermost jaxscale frame (file:line function) of the current stack."""
    if threading.current_thread() is not threading.main_thread():
        return f"background ({threading.current_thread().name})"
    for frame in reversed(traceback.extract_stack()):
        if "/jaxscale/" in frame.filename and not frame.filename.endswith(("profile_scale.py", "compilation.py")):
            return f"{Path(frame.filename).relative_to(REPO)}:{frame.lineno} {frame.name}"
    return "?"


def _time_background_waits() -> list[float]:
    """Seconds the main thread spends waiting for (or running) compilations queued for the
    background by jaxscale.compilation (appended to the returned list)."""
    from jaxscale import compilation

    waits: list[float] = []
    run = compilation._Once.run

    def timed_run(self):
        if threading.current_thread() is not threading.main_thread():
            return run(self)
        t0 = time.perf_counter()
        try:
            return run(self)
        finally:
            waits.append(time.perf_counter() - t0)

    compilation._Once.run = timed_run
    return waits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--where", action="store_true", help="source line of each compilation")
    ap.add_argument("--json", help="write the numbers as JSON here")
    ap.add_argument("--keep", help="write the run's outputs into this folder")
    ap.add_argument("args", nargs="+", help="inputs and key=value parameters, as for `jaxscale scale`")
    ns = ap.parse_args(argv)

    from jaxscale.cli import main as cli

    log = CompileLog(ns.where)
    waited = _time_background_waits()
    jax.monitoring.register_event_duration_secs_listener(log.on_duration)
    jax.monitoring.register_event_listener(log.on_event)

    files, overrides = cli._split_args(list(ns.args))
    pns = argparse.Namespace(phil=[], config=[], verbose=0, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        files = [str(Path(f).resolve()) for f in files]
        if ns.keep:
            Path(ns.keep).mkdir(parents=True, exist_ok=True)
        os.chdir(ns.keep or tmp)
        try:
            params, inputs = cli._parameters(pns, overrides, files, [])
            params, inputs = cli._with_inputs(params, inputs)
            t0 = time.perf_counter()
            result = jaxscale.scale.run(params, inputs)
            t_run = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    t_total = time.perf_counter() - T_START
    n_compile = sum(log.count[COMPILE].values())
    out = {
        "import_jax_s": T_JAX - T_START,
        "import_jaxscale_s": T_IMPORT - T_JAX,
        "run_s": t_run,
        "total_s": t_total,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mb": ru.ru_maxrss / 1024.0,
        "phases_s": result.timings,
        "n_compilations": n_compile,
        "compile_s": sum(log.seconds[COMPILE].values()),
        "trace_s": sum(log.seconds[TRACE].values()),
        "lower_s": sum(log.seconds[LOWER].values()),
        "main_thread_compile_s": log.main_thread_s,
        "main_thread_waits_s": [round(w, 4) for w in waited],
        "cache_hits": log.cache_hits,
        "cache_misses": log.cache_misses,
        "per_function": {
            k: {"n": log.count[COMPILE][k], "compile_s": round(log.seconds[COMPILE][k], 4),
                "trace_s": round(log.seconds[TRACE][k], 4), "lower_s": round(log.seconds[LOWER][k], 4)}
            for k, _ in log.seconds[COMPILE].most_common()
        },
    }
    print(f"import jax {out['import_jax_s']:.2f} s, jaxscale {out['import_jaxscale_s']:.2f} s; "
          f"run {t_run:.2f} s; total {t_total:.2f} s; CPU {out['cpu_s']:.2f} s; peak RSS {out['peak_rss_mb']:.0f} MB")
    print("phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    print(f"{n_compile} compilations: compile {out['compile_s']:.2f} s, trace {out['trace_s']:.2f} s, "
          f"lower {out['lower_s']:.2f} s (on the main thread: {log.main_thread_s:.2f} s of these); "
          f"persistent cache hits {log.cache_hits}, misses {log.cache_misses}")
    print(f"main thread waited {sum(waited):.2f} s for background compilations ("
          + ", ".join(f"{w:.3f}" for w in waited) + ")")
    print(f"{'function':40s} {'n':>3s} {'compile s':>9s} {'trace s':>8s} {'lower s':>8s}")
    for k, v in out["per_function"].items():
        print(f"{k[:40]:40s} {v['n']:3d} {v['compile_s']:9.3f} {v['trace_s']:8.3f} {v['lower_s']:8.3f}")
    if ns.where:
        print("\ncompilations by call site:")
        for (name, site), n in log.sites.most_common():
            print(f"{n:3d}  {name[:30]:30s} {site}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
