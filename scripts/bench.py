#!/usr/bin/env python
"""Serial-scale throughput benchmark of `jaxscale.serial.scale_stills` on planted-truth stills.

    python scripts/bench.py --sizes 100000,1000000[,10000000] [--json] [--float32-eval]
    python scripts/bench.py --sizes 10000,20000,50000 --json --dials [--dials-timeout 900]
    python scripts/bench.py --sizes 1000000,10000000 --json --no-job [--host-devices 2]   # evaluation only

Per size (n_obs; 100 observations per still; sizes below 10^5 are fine): seconds per
target+gradient evaluation (eval_s, median after compile; eval_cpu_s, CPU seconds of all
threads), observations per second, the ratio of that time to a numpy streaming pass over
the same bytes the evaluation reads (bandwidth_ratio: I, w, 1/(2d^2) + group ids in the
chunked still layout, padding included, + the still of each chunk; bandwidth_ratio_min: the
same from the fastest of the repeats of each, less sensitive to other work on the machine;
the two are timed interleaved, call by call, and bandwidth_ratio_paired is the median of the
per-round ratios, the figure least moved by drifts of the machine's speed;
below 2^17 rows the job's program is compiled with XLA's fast options, and eval_optimised_s /
bandwidth_ratio_optimised[_min] time the same program with XLA's default optimisation);
the full scaling job (all rounds) in a child process: wall_s (scale_stills alone,
compilation included) and cpu_s (all threads), its phases (`timings`: setup, outliers, lbfgs,
error_model, full_matrix), the wall and CPU seconds of the functions it calls (`steps`:
_initial_scales, group_order, determine_outliers, lbfgs_round, minimise_structured, ...) and
the JAX trace / lower / compile seconds inside it (`jax_s`), process_s and peak_mb of that
child (data generation included), CC of merged I with truth and RMS error of the per-still
scales (gauge removed). --job-repeats N runs the job N times (fresh processes) and reports the
minimum wall_s (all walls in wall_s_runs).

--dials (every size with n_obs <= --dials-max-obs): the same stills written as .refl/.expt
(jaxscale.sim.simulate_stills, which has Miller indices), then on those files, each a whole
process, wall / CPU seconds and peak RSS (GNU time, else wait4):
  dials.scale model=KB (time limit --dials-timeout): dials_s, dials_cpu_s, dials_peak_mb;
  (--dials-repeats runs: the median, all in dials_runs_s);
  `jaxscale scale` with its default options (the general engine up to 1,000 stills, the serial
  path above: what a user runs), --process-repeats runs each with an empty compilation cache
  (cli_cold_*: median wall, _min_s, _runs_s) and as many with the cache the first one left
  (cli_warm_*); the same with compute.serial=true (cli_serial_cold_s, cli_serial_warm_s,
  dials_ratio_serial: the serial path at this size);
  in one process, the same `jaxscale scale` called twice with the warm cache: its phases
  (import, read, prepare, scaling and its sub-phases, statistics, write; JAX trace/lower/
  compile seconds) for the first call (cli_phases) and the second call's wall (in_process_s:
  everything compiled, the work alone).
Before each timed process (both programs) an untimed one imports its modules, so that both
start with their libraries in the OS page cache (--no-prime: not; page_cache_primed).
dials_ratio = dials_s / cli_cold_s (medians of whole processes on both sides, jaxscale with
its default options and an empty cache); dials_ratio_serial = dials_s / cli_serial_cold_s;
dials_ratio_cli_warm = dials_s / cli_warm_s; dials_ratio_in_process = dials_s / in_process_s.
null where DIALS was not run or did not finish. Set JAXSCALE_X64=0 for float32 throughout;
--float32-eval adds a float32 timing of the evaluation (child process) to each float64 row.

--host-devices N (default 1): N CPU devices for this process and its children (XLA_FLAGS
--xla_force_host_platform_device_count, set before JAX starts its backend), so the evaluation and
the job's programs are sharded over N threads (`devices` in each row); an XLA_FLAGS that already
sets the count is left as it is. The numpy baseline is one thread either way.

On CPU the evaluation is the native kernel (jaxscale/target/native_kb.py) where it builds:
the benchmark builds it first if this machine has none yet (native_kernel: whether it is used,
native_setup_s: build or load seconds), as every later run would find it; JAXSCALE_NATIVE_KERNEL=0
times the XLA loops instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

OBS_PER_STILL = 100
_T_START = time.perf_counter()  # for the import time of the in-process CLI child


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated numbers of observations")
    p.add_argument("--json", action="store_true", help="one JSON object per size")
    p.add_argument("--dials", action="store_true", help="compare with dials.scale (sizes up to --dials-max-obs)")
    p.add_argument("--dials-timeout", type=float, default=600.0, help="seconds per dials.scale run")
    p.add_argument("--dials-max-obs", type=int, default=50_000, help="largest size given to dials.scale")
    p.add_argument("--dials-repeats", type=int, default=1, help="dials.scale runs per size (median reported)")
    p.add_argument("--no-prime", action="store_true",
                   help="--dials: no untimed import before each timed process (see _prime_page_cache)")
    p.add_argument("--process-repeats", type=int, default=2, help="cold and warm `jaxscale scale` runs each (--dials: medians reported)")
    p.add_argument("--job-repeats", type=int, default=1, help="full-job child processes per size (minimum reported)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation timing (job and DIALS only)")
    p.add_argument("--no-job", action="store_true", help="skip the full scaling job (evaluation and DIALS only)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float32-eval", action="store_true", help="also time the evaluation in float32 (child process)")
    p.add_argument("--host-devices", type=int, default=1,
                   help="CPU devices (threads) the evaluation and jobs are sharded over (this process and children)")
    p.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)  # child: one full job
    p.add_argument("--eval", type=int, default=None, help=argparse.SUPPRESS)  # child: evaluation timing only
    p.add_argument("--cli-phases", default=None, help=argparse.SUPPRESS)  # child: `jaxscale scale` twice, phases
    return p.parse_args(argv)


def _median_time(fn, repeats: int) -> float:
    return _median_times(fn, repeats)[0]


WARM_UP_S = 0.03


def _interleaved_times(fns: list, repeats: int) -> list[tuple[list[float], list[float]]]:
    """(walls, CPU seconds) of each fn over `repeats` rounds that call every fn once in turn,
    after warm-up rounds (at least one, and WARM_UP_S seconds: a job evaluates hundreds of
    times, so the first few calls' start-up, such as the native kernel's helper thread
    waking, which took up to ~5 ms on this VM, is not what a call costs): a drift of the
    machine's speed (on this VM ±20 % over minutes) then affects all of them alike, and
    their ratios stay meaningful."""
    start = time.perf_counter()
    while True:
        for fn in fns:
            fn()
        if time.perf_counter() - start >= WARM_UP_S:
            break
    out = [([], []) for _ in fns]
    for _ in range(repeats):
        for fn, (walls, cpus) in zip(fns, out):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return out


def _median_times(fn, repeats: int, walls_out: list | None = None) -> tuple[float, float]:
    """Median wall and CPU (all threads of this process) seconds of fn() after one warm-up call
    (every wall time appended to walls_out)."""
    import numpy as np

    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if walls_out is not None:
        walls_out.extend(walls)
    return float(np.median(walls)), float(np.median(cpus))


def measure_evaluation(n_obs: int, repeats: int, seed: int) -> dict:
    """eval_s, obs_per_s, bandwidth baseline and ratio for one size (in this process)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxscale  # noqa: F401
    from jaxscale.serial import simulate_flat_stills
    from jaxscale.target.sharding import KBStillsTarget, make_observations, observation_mesh

    n_exp = max(n_obs // OBS_PER_STILL, 1)
    sim = simulate_flat_stills(n_exp, OBS_PER_STILL, seed=seed)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    mesh = observation_mesh() if len(jax.devices()) > 1 else None
    obs = make_observations(sim["intensity"], 1.0 / sim["variance"], sim["d"], sim["group_id"],
                            sim["experiment_index"], int(sim["n_groups"]), n_exp, mesh=mesh, dtype=dtype)
    target = KBStillsTarget(mesh)
    x = jnp.asarray(np.stack([np.ones(n_exp), np.zeros(n_exp)], 1), dtype=dtype)
    free = jnp.ones((n_exp, 2), bool)
    # bandwidth baseline: one numpy streaming pass over the same arrays, same dtypes; timed
    # interleaved with the evaluation. Over copies: np.asarray would share the evaluation's
    # buffers, and then the baseline's speed at 10^5 rows (2.8 MB) depended on where the
    # evaluation left them cached (one thread: partly in this core's L2, 0.09 ms; halves on
    # two threads: half in the other core's L2, 0.13-0.14 ms)
    host = [np.array(a, copy=True) for a in (obs.intensity, obs.weight, obs.inv_two_d_sq, obs.group_id,
                                             obs.chunk_experiment)]
    (eval_walls, eval_cpus), (base_walls, _) = _interleaved_times(
        [lambda: jax.block_until_ready(target.value_and_grad(x, obs, free, x)), lambda: [a.sum() for a in host]],
        repeats)
    eval_s, eval_cpu_s, base_s = float(np.median(eval_walls)), float(np.median(eval_cpus)), float(np.median(base_walls))
    n_bytes = sum(a.nbytes for a in host)
    optimised = {}
    program = target.value_and_grad
    if program.variant(x, obs, free, x) is not program._full:
        # below FAST_COMPILE_MAX_ROWS the job runs the fast-compiled program (less compile
        # time, slower per call); the kernel with XLA's default optimisation, for reference
        jax.block_until_ready(program._full(x, obs, free, x))
        opt_walls: list[float] = []
        opt_s = _median_times(lambda: jax.block_until_ready(program._full(x, obs, free, x)), repeats, opt_walls)[0]
        optimised = {"eval_optimised_s": opt_s, "bandwidth_ratio_optimised": opt_s / base_s,
                     "bandwidth_ratio_optimised_min": min(opt_walls) / min(base_walls)}
    return {**optimised, "eval_s": eval_s, "eval_cpu_s": eval_cpu_s, "obs_per_s": n_obs / eval_s, "baseline_s": base_s,
            "bandwidth_ratio": eval_s / base_s, "bandwidth_ratio_min": min(eval_walls) / min(base_walls),
            "bandwidth_ratio_paired": float(np.median(np.asarray(eval_walls) / np.asarray(base_walls))),
            "eval_min_s": min(eval_walls), "baseline_min_s": min(base_walls),
            "baseline_GBps": n_bytes / base_s / 1e9, "dtype": jnp.dtype(dtype).name,
            "devices": len(jax.devices()), "platform": jax.devices()[0].platform}


class _JaxEvents:
    """Sums of JAX's compile-duration events (trace, lower to MLIR, XLA compile or cache fetch)."""

    NAMES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
             "/jax/core/compile/backend_compile_duration": "compile"}

    def __init__(self):
        import jax

        self.totals: dict[str, float] = {}
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_kw) -> None:
        name = self.NAMES.get(event)
        if name is not None:
            self.totals[name] = self.totals.get(name, 0.0) + duration
            self.count += name == "compile"

    def take(self) -> dict:
        """Totals since the last take (seconds; 'programs': XLA programs compiled or fetched)."""
        out = {k: round(v, 4) for k, v in self.totals.items()}
        out["programs"] = self.count
        self.totals, self.count = {}, 0
        return out


def run_job(n_obs: int, seed: int) -> dict:
    """Child process: generate data, run scale_stills with all rounds, accuracy vs truth."""
    import numpy as np

    import jaxscale  # noqa: F401
    from jaxscale.serial import scale_errors, scale_stills, simulate_flat_stills

    events = _JaxEvents()
    steps = _time_serial_steps()
    t0 = time.perf_counter()
    n_exp = max(n_obs // OBS_PER_STILL, 1)
    sim = simulate_flat_stills(n_exp, OBS_PER_STILL, seed=seed)
    t1 = time.perf_counter()
    events.take()
    cpu0 = time.process_time()
    res = scale_stills(sim["group_id"], sim["intensity"], sim["variance"], sim["d"], sim["experiment_index"],
                       n_exp, int(sim["n_groups"]))
    wall = time.perf_counter() - t1
    cpu = time.process_time() - cpu0
    jax_s = events.take()
    err = scale_errors(res, sim["k"], sim["B"], sim["i_true"], sim["d_group"])
    return {"wall_s": wall, "cpu_s": cpu, "simulate_s": t1 - t0, **err, "timings": res.timings, "jax_s": jax_s,
            "steps": {k: {"calls": v[0], "wall_s": round(v[1], 3), "cpu_s": round(v[2], 3)} for k, v in steps.items()},
            "n_groups": int(sim["n_groups"]),
            "rounds": [{k: r[k] for k in ("name", "iterations", "reason")} for r in res.rounds],
            "outliers": int(np.count_nonzero(res.outlier)), "error_model": list(res.error_model)}


SERIAL_STEPS = ("_initial_scales", "group_order", "still_layout", "make_observations", "determine_outliers",
                "kb_inverse_scale", "lbfgs_round", "refine_error_model", "minimise_structured", "variance_diagonal")


def _time_serial_steps() -> dict[str, list]:
    """Wrap the functions scale_stills calls (names in jaxscale.serial's namespace) with wall and
    CPU timers: {name: [calls, wall s, CPU s (all threads)]}, filled as the job runs."""
    import jaxscale.serial as serial_mod

    steps: dict[str, list] = {}

    def wrap(name: str, original):
        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                entry = steps.setdefault(name, [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - w0
                entry[2] += time.process_time() - c0
        return timed

    for name in SERIAL_STEPS:
        if hasattr(serial_mod, name):
            setattr(serial_mod, name, wrap(name, getattr(serial_mod, name)))
    return steps


GNU_TIME = "/usr/bin/time"


def _run_measured(cmd: list[str], cwd: str, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run one process (its own session, output to files); wall, CPU (user + sys) and peak RSS of
    that process. On timeout the whole session is killed.

    The peak comes from GNU time (%M) where it is installed: a child's ru_maxrss from wait4
    includes the parent's resident set at the (v)fork before exec, so a large parent (this
    script after an in-process job, or pytest) would be reported as the child's peak."""
    stamp = f"{os.getpid()}_{time.monotonic_ns()}"
    out_path = os.path.join(cwd, f".bench_{stamp}.out")
    rss_path = os.path.join(cwd, f".bench_{stamp}.rss")
    use_time = os.access(GNU_TIME, os.X_OK)
    full_cmd = [GNU_TIME, "-q", "-f", "%M %U %S", "-o", rss_path, *cmd] if use_time else cmd
    with open(out_path, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full_cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)  # the session this call started, nothing else
                _, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    with open(out_path) as fh:
        text = fh.read()
    os.remove(out_path)
    cpu, peak = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0
    if use_time:
        try:
            with open(rss_path) as fh:
                fields = fh.read().split()[-3:]
            peak, cpu = float(fields[0]) / 1024.0, float(fields[1]) + float(fields[2])
        except (OSError, ValueError, IndexError):
            pass  # killed before GNU time wrote its line: wait4's numbers (the peak may be high)
        if os.path.exists(rss_path):
            os.remove(rss_path)
    return {"wall_s": wall, "cpu_s": cpu, "peak_mb": peak,
            "rc": proc.returncode, "timed_out": timed_out, "tail": text[-3000:],
            "json_lines": [ln for ln in text.splitlines() if ln.startswith("{")]}


def _child(args: list[str], timeout: float | None = None, env: dict | None = None
           ) -> tuple[dict | None, float, float, str]:
    """Run this script as a child; returns (last JSON line, wall s, peak RSS MB, output tail)."""
    run = _run_measured([sys.executable, os.path.abspath(__file__), *args], cwd=tempfile.gettempdir(), env=env,
                        timeout=timeout)
    lines = run["json_lines"]
    data = None
    if lines and run["rc"] == 0:
        try:
            data = json.loads(lines[-1])
        except json.JSONDecodeError:
            data = None
    return data, run["wall_s"], run["peak_mb"], "timeout" if run["timed_out"] else run["tail"][-2000:]


def _jaxscale_exe() -> str:
    return shutil.which("jaxscale") or os.path.join(os.path.dirname(sys.executable), "jaxscale")


def _cli_args(paths: dict, serial: bool = False) -> list[str]:
    return ["scale", str(paths["refl"]), str(paths["expt"]), *(["compute.serial=true"] if serial else []),
            "output.html=None", "output.json=None"]


def dials_compare(n_obs: int, timeout: float, seed: int, warm_repeats: int, dials_repeats: int = 1,
                  prime: bool = True) -> dict:
    """dials.scale and `jaxscale scale` (whole processes) on the same simulated stills."""
    import jaxscale  # noqa: F401
    from jaxscale.sim import simulate_stills, write_simulation

    n_stills = max(n_obs // OBS_PER_STILL, 1)
    work = tempfile.mkdtemp(prefix="jaxscale_bench_")
    table, expts, truth = simulate_stills(n_stills=n_stills, obs_per_still=OBS_PER_STILL, seed=seed)
    paths = write_simulation(work, table, expts, truth)
    out = {"dials_n_stills": n_stills, "dials_input_rows": len(table), "page_cache_primed": prime}
    out.update(_cli_times(work, paths, warm_repeats, prime=prime))
    serial = _cli_times(work, paths, warm_repeats, serial=True, phases=False, prime=prime)
    out.update({"cli_serial_cold_s": serial.get("cli_cold_s"), "cli_serial_warm_s": serial.get("cli_warm_s")})
    dials_runs = [_dials_run(work, paths, timeout, prime) for _ in range(max(dials_repeats, 1))]
    dials = dials_runs[0] if any("dials_s" not in d for d in dials_runs) else {
        **sorted(dials_runs, key=lambda d: d["dials_s"])[(len(dials_runs) - 1) // 2],
        "dials_s": float(statistics.median(d["dials_s"] for d in dials_runs)),
        "dials_runs_s": [d["dials_s"] for d in dials_runs]}
    out.update(dials)
    dials_s = dials.get("dials_s")
    ratio = lambda t: (dials_s / t) if dials_s and t else None  # noqa: E731
    out.update({"dials_ratio": ratio(out.get("cli_cold_s")), "dials_ratio_cli_cold": ratio(out.get("cli_cold_s")),
                "dials_ratio_cli_warm": ratio(out.get("cli_warm_s")),
                "dials_ratio_in_process": ratio(out.get("in_process_s")),
                "dials_ratio_serial": ratio(out.get("cli_serial_cold_s"))})
    shutil.rmtree(work, ignore_errors=True)
    return out


def _prime_page_cache(cmd: list[str]) -> None:
    """Run `cmd` (importing a program's modules) untimed, so that the timed run after it finds
    its shared libraries in the OS page cache: on this VM idle file pages are reclaimed within
    seconds (`import jaxscale` 0.43 s just after another, 1.0 s after 30 s idle), so without it
    a run's time depends on what ran before it. Both programs get the same treatment."""
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _shebang_interpreter(script: str) -> str:
    with open(script, "rb") as fh:
        first = fh.readline().decode(errors="replace").strip()
    return first[2:].split()[0] if first.startswith("#!") else sys.executable


PRIME_JAXSCALE = [sys.executable, "-c", "import jaxscale.scale, jaxscale.cli.main"]


def _dials_run(work: str, paths: dict, timeout: float, prime: bool = True) -> dict:
    exe = shutil.which("dials.scale")
    if exe is None:
        return {"dials_note": "dials.scale not installed"}
    out_dir = os.path.join(work, "dials_out")
    os.makedirs(out_dir, exist_ok=True)
    if prime:
        _prime_page_cache([_shebang_interpreter(exe), "-c", "import dials.command_line.scale"])
    run = _run_measured([exe, str(paths["refl"]), str(paths["expt"]), "model=KB", "output.html=None",
                         "output.json=None"], cwd=out_dir, timeout=timeout)
    if run["timed_out"]:
        return {"dials_note": f"dials.scale did not finish in {timeout:.0f} s", "dials_cpu_s": run["cpu_s"],
                "dials_peak_mb": run["peak_mb"]}
    if run["rc"] != 0:
        return {"dials_note": f"dials.scale failed: {run['tail'].strip()[-300:]}"}
    return {"dials_s": run["wall_s"], "dials_cpu_s": run["cpu_s"], "dials_peak_mb": run["peak_mb"],
            "dials_note": "finished"}


def _process_summary(prefix: str, runs: list[dict]) -> dict:
    """Median wall (and the CPU and peak memory of that run), fastest wall and all walls."""
    if not runs:
        return {}
    order = sorted(runs, key=lambda r: r["wall_s"])
    mid = order[(len(order) - 1) // 2]  # the lower median: an actual run
    return {f"{prefix}_s": float(statistics.median(r["wall_s"] for r in runs)), f"{prefix}_cpu_s": mid["cpu_s"],
            f"{prefix}_peak_mb": mid["peak_mb"], f"{prefix}_min_s": order[0]["wall_s"],
            f"{prefix}_runs_s": [r["wall_s"] for r in runs]}


def _cli_times(work: str, paths: dict, warm_repeats: int, serial: bool = False, phases: bool = True,
               prime: bool = True) -> dict:
    """`jaxscale scale` (default options, or serial: compute.serial=true; all outputs but HTML/JSON)
    on DIALS' input, whole processes: warm_repeats cold runs (each with an empty compilation
    cache) and warm_repeats warm ones (the cache the first cold run left), medians and minima;
    then (phases) the in-process phases child with the warm cache."""
    out_dir = os.path.join(work, "jaxscale_out")
    os.makedirs(out_dir, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="jaxscale_cache_")
    env = dict(os.environ, JAXSCALE_CACHE_DIR=cache)
    out: dict = {}
    repeats = max(warm_repeats, 1)
    cold, warm = [], []
    for i in range(repeats):  # cold runs, each with an empty cache (the first one's kept for the warm runs)
        run_env = env if i == 0 else dict(os.environ, JAXSCALE_CACHE_DIR=tempfile.mkdtemp(prefix="jaxscale_cache_"))
        if prime:
            _prime_page_cache(PRIME_JAXSCALE)
        run = _run_measured([_jaxscale_exe(), *_cli_args(paths, serial)], cwd=out_dir, env=run_env)
        if run_env is not env:
            shutil.rmtree(run_env["JAXSCALE_CACHE_DIR"], ignore_errors=True)
        if run["rc"] != 0:
            out["cli_error"] = run["tail"][-500:]
            return out
        cold.append(run)
    for _ in range(repeats):
        if prime:
            _prime_page_cache(PRIME_JAXSCALE)
        run = _run_measured([_jaxscale_exe(), *_cli_args(paths, serial)], cwd=out_dir, env=env)
        if run["rc"] == 0:
            warm.append(run)
    out.update(_process_summary("cli_cold", cold))
    out.update(_process_summary("cli_warm", warm))
    if warm and phases:
        spec = json.dumps({"cwd": out_dir, "args": _cli_args(paths, serial)})
        timings, _, _, err = _child(["--cli-phases", spec], env=env)
        if timings:
            out.update({"in_process_s": timings["second"]["total"], "cli_phases": timings})
        else:
            out["cli_phases_error"] = err[-500:]
    shutil.rmtree(cache, ignore_errors=True)
    return out


def run_cli_phases(spec: str) -> dict:
    """Child: `jaxscale scale` in this process twice; per call the seconds of each phase (the
    pipeline functions wrapped with timers) and of JAX tracing / lowering / compiling."""
    import contextlib
    import io

    t_import0 = time.perf_counter()
    import jax  # noqa: F401

    import jaxscale.cli.main as cli
    import jaxscale.data.prepare as prepare_mod
    import jaxscale.scale as scale_mod
    import jaxscale.serial as serial_mod

    import_s = time.perf_counter() - _T_START
    import_jax_s = time.perf_counter() - t_import0
    job = json.loads(spec)
    os.chdir(job["cwd"])
    phases: dict = {}
    sub: dict = {}

    def timed(module, name: str, phase: str):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                result = original(*args, **kwargs)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t0
            if phase == "scaling" and hasattr(result, "timings"):  # the serial path's sub-phases
                sub.update(result.timings)
            return result

        setattr(module, name, wrapper)

    timed(scale_mod, "_read_sources", "read")
    timed(prepare_mod, "prepare_dataset", "prepare")
    timed(serial_mod, "scale_stills", "scaling")  # the serial path
    timed(scale_mod, "_scaling_algorithm", "scaling")  # the general engine
    timed(scale_mod, "_merging_stats", "statistics")
    timed(scale_mod, "_write_outputs", "write")
    events = _JaxEvents()
    calls = []
    for _ in range(2):
        phases.clear()
        sub.clear()
        events.take()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(job["args"])
        total = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"jaxscale scale returned {rc}")
        call = {k: round(v, 4) for k, v in phases.items()}
        call["other"] = round(total - sum(phases.values()), 4)
        call["total"] = total
        call["scaling_detail"] = {k: round(v, 4) for k, v in sub.items()}
        call["jax_s"] = events.take()
        calls.append(call)
    return {"import_s": import_s, "import_jax_and_jaxscale_s": import_jax_s, "first": calls[0], "second": calls[1]}


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _job_row(n_obs: int, seed: int, repeats: int) -> dict:
    """The full job in `repeats` fresh child processes; the fastest one's numbers, all walls."""
    best, walls, err = None, [], ""
    for _ in range(max(repeats, 1)):
        job, wall, peak, err = _child(["--job", str(n_obs), "--seed", str(seed)])
        if not job:
            continue
        job.update({"process_s": wall, "peak_mb": peak})
        walls.append(job["wall_s"])
        if best is None or job["wall_s"] < best["wall_s"]:
            best = job
    if best is None:
        return {"wall_s": None, "process_s": None, "peak_mb": float("nan"), "job_error": err}
    row = {k: best[k] for k in ("wall_s", "cpu_s", "process_s", "peak_mb", "simulate_s", "cc_ih", "k_rms_rel",
                                "B_rms", "k_rms_bound", "B_rms_bound", "timings", "steps", "jax_s", "rounds",
                                "outliers", "error_model", "n_groups") if k in best}
    row["wall_s_runs"] = walls
    return row


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def use_host_devices(n: int) -> None:
    """Ask XLA for n CPU devices (read when JAX starts its backend, so call this before any
    JAX computation; children inherit it). An XLA_FLAGS that already sets a count wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and HOST_DEVICE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICE_FLAG}={n}".strip()


def prepare_native_kernel() -> dict:
    """Build the native CPU kernel of the evaluation if this machine has none yet (once per
    machine, ~4 s; a run never waits for it and uses the XLA path until a background build has
    finished), so that evaluations and jobs measure what every later run gets."""
    import jax.numpy as jnp

    import jaxscale  # noqa: F401
    from jaxscale.target import native_kb

    t0 = time.perf_counter()
    ok = native_kb.available(jnp.float64, build=True)
    return {"native_kernel": ok, "native_setup_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    use_host_devices(args.host_devices)
    if args.job is not None:
        out = run_job(args.job, args.seed)
        out["peak_mb"] = _peak_mb()
        print(json.dumps(out))
        return 0
    if args.eval is not None:
        print(json.dumps(measure_evaluation(args.eval, args.repeats, args.seed)))
        return 0
    if args.cli_phases is not None:
        print(json.dumps(run_cli_phases(args.cli_phases)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    native = prepare_native_kernel()
    rows = []
    for n_obs in sizes:
        row = {"n_obs": n_obs, "n_experiments": max(n_obs // OBS_PER_STILL, 1), "load_before": _load(), **native}
        if not args.no_eval:
            row.update(measure_evaluation(n_obs, args.repeats, args.seed))
        else:
            row.update({"eval_s": None, "bandwidth_ratio": None})
        if args.float32_eval:
            f32, _, _, err = _child(["--eval", str(n_obs), "--repeats", str(args.repeats), "--seed", str(args.seed)],
                                    env=dict(os.environ, JAXSCALE_X64="0"))
            row.update({f"{k}_float32": f32[k] for k in ("eval_s", "eval_cpu_s", "bandwidth_ratio", "bandwidth_ratio_min",
                                                         "eval_min_s", "baseline_min_s", "baseline_s", "dtype")}
                       if f32 else {"float32_error": err})
        if not args.no_job:
            row.update(_job_row(n_obs, args.seed, args.job_repeats))
        else:
            row.update({"wall_s": None, "process_s": None, "peak_mb": float("nan")})
        row["dials_ratio"] = None
        if args.dials and n_obs <= args.dials_max_obs:
            row.update(dials_compare(n_obs, args.dials_timeout, args.seed, args.process_repeats, args.dials_repeats,
                                     not args.no_prime))
        elif args.dials:
            row["dials_note"] = f"not run (n_obs > --dials-max-obs {args.dials_max_obs})"
        row["load_after"] = _load()
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            _print_row(row)
    if len(rows) > 1 and not args.json:
        for a, b in zip(rows, rows[1:]):
            if a["wall_s"] and b["wall_s"]:
                phases = " ".join(f"{k} x{b['timings'][k] / a['timings'][k]:.1f}" for k in a.get("timings", {})
                                  if k in b.get("timings", {}) and a["timings"][k] > 0)
                ev = f", x{b['eval_s'] / a['eval_s']:.1f} evaluation time" if a["eval_s"] and b["eval_s"] else ""
                cpu = f" (CPU x{b['cpu_s'] / a['cpu_s']:.1f})" if a.get("cpu_s") and b.get("cpu_s") else ""
                steps = " ".join(f"{k} x{b['steps'][k]['cpu_s'] / v['cpu_s']:.1f}" for k, v in a.get("steps", {}).items()
                                 if k in b.get("steps", {}) and v["cpu_s"] > 0)
                print(f"scaling {a['n_obs']} -> {b['n_obs']}: x{b['n_obs'] / a['n_obs']:.0f} data, "
                      f"x{b['wall_s'] / a['wall_s']:.1f} job time{cpu}{ev}; phases (wall): {phases}; steps (CPU): {steps}")
    return 0


def _print_row(row: dict) -> None:
    ev = (f"eval {row['eval_s'] * 1e3:9.2f} ms  bandwidth x{row['bandwidth_ratio']:.1f}  "
          if row.get("eval_s") else "")
    print(f"n_obs {row['n_obs']:>10d}  stills {row['n_experiments']:>7d}  {ev}"
          f"job {_fmt(row['wall_s'])} s  peak {row['peak_mb']:.0f} MB  CC {row.get('cc_ih', float('nan')):.5f}  "
          f"k RMS {100 * row.get('k_rms_rel', float('nan')):.2f} %  load {row['load_before']}", flush=True)
    if row.get("timings"):
        print("    job phases (s): " + "  ".join(f"{k} {v:.2f}" for k, v in row["timings"].items())
              + f"   jax: {row.get('jax_s')}")
        print("    job steps (wall/CPU s): " + "  ".join(f"{k} {v['wall_s']:.2f}/{v['cpu_s']:.2f}"
                                                      for k, v in row.get("steps", {}).items()))
    if "dials_n_stills" in row:
        print(f"    {row['dials_n_stills']} stills: dials.scale {_fmt(row.get('dials_s'))} s "
              f"(peak {_fmt(row.get('dials_peak_mb'), '.0f')} MB; {row.get('dials_note')}); jaxscale scale process "
              f"cold {_fmt(row.get('cli_cold_s'), '.2f')} s (peak {_fmt(row.get('cli_cold_peak_mb'), '.0f')} MB), "
              f"warm {_fmt(row.get('cli_warm_s'), '.2f')} s, in-process {_fmt(row.get('in_process_s'), '.2f')} s; "
              f"ratios cold x{_fmt(row.get('dials_ratio'))} warm x{_fmt(row.get('dials_ratio_cli_warm'))} "
              f"in-process x{_fmt(row.get('dials_ratio_in_process'))}; compute.serial=true cold "
              f"{_fmt(row.get('cli_serial_cold_s'), '.2f')} s (x{_fmt(row.get('dials_ratio_serial'))})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
