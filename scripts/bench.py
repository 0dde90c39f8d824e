#!/usr/bin/env python
"""Serial-scale throughput benchmark of `jaxscale.serial.scale_stills` on planted-truth stills.

    python scripts/bench.py --sizes 100000,1000000[,10000000] [--json] [--dials] [--dials-timeout 600]

Per size (n_obs; 100 observations per still): seconds per target+gradient evaluation (median
after compile), observations per second, the ratio of that time to a numpy streaming pass over
the same bytes the evaluation reads (I, w, 1/(2d^2) float64 or float32 + group ids int32 in the
chunked still layout, padding included, + the still of each chunk),
wall time and peak RSS of a full scaling job (all rounds, run in a child process, data
generation included), CC of merged I with truth and RMS error of the per-still scales (gauge
removed). With --dials, for the smallest size only: dials.scale on the same stills written as
.refl/.expt (simulated by jaxscale.sim.simulate_stills, which has Miller indices), with a time
limit; the ratio is dials wall / jaxscale wall on that input (null where DIALS was not run or
gave up): dials_ratio for scale_stills alone (read + prepare + scale, in-process wall),
dials_ratio_cli_cold / _warm for the whole `jaxscale scale` process (outputs and merging
statistics included) with an empty / a warm compilation cache. Set JAXSCALE_X64=0 for float32
throughout; --float32-eval adds a float32 timing of the evaluation (child process) to each
float64 row.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

OBS_PER_STILL = 100


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated numbers of observations")
    p.add_argument("--json", action="store_true", help="one JSON object per size")
    p.add_argument("--dials", action="store_true", help="compare with dials.scale (smallest size only)")
    p.add_argument("--dials-timeout", type=float, default=600.0, help="seconds per dials.scale run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float32-eval", action="store_true", help="also time the evaluation in float32 (child process)")
    p.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)  # child: one full job
    p.add_argument("--eval", type=int, default=None, help=argparse.SUPPRESS)  # child: evaluation timing only
    p.add_argument("--job-dir", default=None, help=argparse.SUPPRESS)  # child: job on a written .refl
    return p.parse_args(argv)


def _median_time(fn, repeats: int) -> float:
    import numpy as np

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


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
    eval_s = _median_time(lambda: jax.block_until_ready(target.value_and_grad(x, obs, free, x)), repeats)
    # bandwidth baseline: one numpy streaming pass over the same arrays, same dtypes
    host = [np.asarray(a) for a in (obs.intensity, obs.weight, obs.inv_two_d_sq, obs.group_id, obs.chunk_experiment)]
    base_s = _median_time(lambda: [a.sum() for a in host], repeats)
    n_bytes = sum(a.nbytes for a in host)
    return {"eval_s": eval_s, "obs_per_s": n_obs / eval_s, "baseline_s": base_s, "bandwidth_ratio": eval_s / base_s,
            "baseline_GBps": n_bytes / base_s / 1e9, "dtype": jnp.dtype(dtype).name,
            "devices": len(jax.devices()), "platform": jax.devices()[0].platform}


def run_job(n_obs: int, seed: int) -> dict:
    """Child process: generate data, run scale_stills with all rounds, accuracy vs truth."""
    import numpy as np

    import jaxscale  # noqa: F401
    from jaxscale.serial import scale_errors, scale_stills, simulate_flat_stills

    t0 = time.perf_counter()
    n_exp = max(n_obs // OBS_PER_STILL, 1)
    sim = simulate_flat_stills(n_exp, OBS_PER_STILL, seed=seed)
    t1 = time.perf_counter()
    res = scale_stills(sim["group_id"], sim["intensity"], sim["variance"], sim["d"], sim["experiment_index"],
                       n_exp, int(sim["n_groups"]))
    wall = time.perf_counter() - t1
    err = scale_errors(res, sim["k"], sim["B"], sim["i_true"], sim["d_group"])
    return {"wall_s": wall, "simulate_s": t1 - t0, **err, "timings": res.timings,
            "rounds": [{k: r[k] for k in ("name", "iterations", "reason")} for r in res.rounds],
            "outliers": int(np.count_nonzero(res.outlier)), "error_model": list(res.error_model)}


def _child(args: list[str], timeout: float | None = None, env: dict | None = None
           ) -> tuple[dict | None, float, float, str]:
    """Run this script as a child; returns (last JSON line, wall s, peak RSS MB, stderr tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, time.perf_counter() - t0, float("nan"), "timeout"
    wall = time.perf_counter() - t0
    # peak RSS of this child alone: ru_maxrss of RUSAGE_CHILDREN is the max over children so far,
    # so the job runs before any larger child and we read /proc-free numbers from the child itself
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    data = json.loads(lines[-1]) if lines and proc.returncode == 0 else None
    peak = data.pop("peak_mb", float("nan")) if data else float("nan")
    return data, wall, peak, err[-2000:]


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def dials_compare(n_obs: int, timeout: float, seed: int) -> dict:
    """dials.scale vs scale_stills on the same simulated stills written as .refl/.expt."""
    if shutil.which("dials.scale") is None:
        return {"dials_ratio": None, "dials_note": "dials.scale not installed"}
    work = tempfile.mkdtemp(prefix="jaxscale_bench_")
    import jaxscale  # noqa: F401
    from jaxscale.sim import simulate_stills, write_simulation

    n_stills = max(n_obs // OBS_PER_STILL, 1)
    table, expts, truth = simulate_stills(n_stills=n_stills, obs_per_still=OBS_PER_STILL, seed=seed)
    paths = write_simulation(work, table, expts, truth)
    ours, ours_wall, _, err = _child(["--job-dir", work])
    cli = _cli_times(work, paths)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(["dials.scale", str(paths["refl"]), str(paths["expt"]), "model=KB",
                               "output.html=None", "output.json=None"],
                              cwd=work, capture_output=True, text=True, timeout=timeout)
        dials_s = time.perf_counter() - t0
        ok = proc.returncode == 0
        note = "finished" if ok else f"dials.scale failed: {proc.stderr.strip()[-300:] or proc.stdout.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        dials_s, ok = time.perf_counter() - t0, False
        note = f"dials.scale did not finish {n_stills} stills in {timeout:.0f} s"
    ours_s = ours["wall_s"] if ours else None
    ratio = lambda t: (dials_s / t) if ok and t else None  # noqa: E731
    return {"dials_ratio": ratio(ours_s), "dials_s": dials_s if ok else None,
            "dials_note": note, "dials_n_stills": n_stills, "jaxscale_on_dials_input_s": ours_s,
            "jaxscale_on_dials_input": ours or err, **cli,
            "dials_ratio_cli_cold": ratio(cli.get("cli_cold_s")), "dials_ratio_cli_warm": ratio(cli.get("cli_warm_s"))}


def _cli_times(work: str, paths: dict) -> dict:
    """`jaxscale scale` (the serial path, all outputs but HTML/JSON) on DIALS' input, wall
    seconds of the whole process: cold (empty compilation cache) and warm (second run)."""
    exe = shutil.which("jaxscale") or os.path.join(os.path.dirname(sys.executable), "jaxscale")
    out_dir = os.path.join(work, "jaxscale_out")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, JAXSCALE_CACHE_DIR=tempfile.mkdtemp(prefix="jaxscale_cache_"))
    out = {}
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        proc = subprocess.run([exe, "scale", str(paths["refl"]), str(paths["expt"]), "compute.serial=true",
                               "output.html=None", "output.json=None"], cwd=out_dir, env=env, capture_output=True,
                              text=True)
        out[f"cli_{label}_s"] = time.perf_counter() - t0 if proc.returncode == 0 else None
        if proc.returncode != 0:
            out["cli_error"] = (proc.stderr or proc.stdout)[-500:]
            break
    return out


def run_job_dir(work: str) -> dict:
    """Child: scale_stills on integrated.refl/.expt written by jaxscale.sim (DIALS' input)."""
    import gemmi
    import numpy as np

    import jaxscale  # noqa: F401
    from jaxscale.data.symmetry import group_ids, map_to_asu
    from jaxscale.io.expt import read_expt
    from jaxscale.io.refl import read_refl
    from jaxscale.serial import scale_stills

    t0 = time.perf_counter()
    table = read_refl(os.path.join(work, "integrated.refl"))
    expts = read_expt(os.path.join(work, "integrated.expt"))
    sg = expts[0].space_group if hasattr(expts[0].space_group, "operations") else gemmi.SpaceGroup(expts[0].space_group)
    asu, _ = map_to_asu(np.asarray(table["miller_index"]), sg)
    gid, uniq = group_ids(asu)
    p = np.asarray(table["partiality"])
    corr = np.asarray(table["lp"]) / np.asarray(table["qe"]) / p
    i_obs = np.asarray(table["intensity.sum.value"]) * corr
    v_obs = np.asarray(table["intensity.sum.variance"]) * corr**2
    keep = (v_obs > 0) & (p > 0.4)
    res = scale_stills(gid[keep], i_obs[keep], v_obs[keep], np.asarray(table["d"])[keep],
                       np.asarray(table["id"])[keep], len(expts), len(uniq))
    return {"wall_s": time.perf_counter() - t0, "n_obs": int(keep.sum()), "log_tail": res.log[-3:]}


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.job is not None:
        out = run_job(args.job, args.seed)
        out["peak_mb"] = _peak_mb()
        print(json.dumps(out))
        return 0
    if args.eval is not None:
        print(json.dumps(measure_evaluation(args.eval, args.repeats, args.seed)))
        return 0
    if args.job_dir is not None:
        out = run_job_dir(args.job_dir)
        out["peak_mb"] = _peak_mb()
        print(json.dumps(out))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    for i, n_obs in enumerate(sizes):
        row = {"n_obs": n_obs, "n_experiments": max(n_obs // OBS_PER_STILL, 1)}
        row.update(measure_evaluation(n_obs, args.repeats, args.seed))
        if args.float32_eval:
            f32, _, _, err = _child(["--eval", str(n_obs), "--repeats", str(args.repeats), "--seed", str(args.seed)],
                                    env=dict(os.environ, JAXSCALE_X64="0"))
            row.update({f"{k}_float32": f32[k] for k in ("eval_s", "bandwidth_ratio", "baseline_s", "dtype")}
                       if f32 else {"float32_error": err})
        job, wall, peak, err = _child(["--job", str(n_obs), "--seed", str(args.seed)])
        row.update({"wall_s": job["wall_s"] if job else None, "process_s": wall, "peak_mb": peak})
        if job:
            row.update({k: job[k] for k in ("simulate_s", "cc_ih", "k_rms_rel", "B_rms", "k_rms_bound", "B_rms_bound",
                                            "timings", "rounds", "outliers", "error_model") if k in job})
        else:
            row["job_error"] = err
        row["dials_ratio"] = None
        if args.dials and i == 0:
            row.update(dials_compare(n_obs, args.dials_timeout, args.seed))
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"n_obs {n_obs:>10d}  stills {row['n_experiments']:>7d}  eval {row['eval_s']*1e3:9.2f} ms  "
                  f"{row['obs_per_s']:.3g} obs/s  bandwidth x{row['bandwidth_ratio']:.1f}  "
                  f"job {row['wall_s'] if row['wall_s'] is None else round(row['wall_s'], 1)} s  "
                  f"peak {row['peak_mb']:.0f} MB  CC {row.get('cc_ih', float('nan')):.5f}  "
                  f"k RMS {100 * row.get('k_rms_rel', float('nan')):.2f} %  DIALS x{row['dials_ratio']}", flush=True)
    if len(rows) > 1 and not args.json:
        for a, b in zip(rows, rows[1:]):
            if a["wall_s"] and b["wall_s"]:
                print(f"scaling {a['n_obs']} -> {b['n_obs']}: x{b['n_obs'] / a['n_obs']:.0f} data, "
                      f"x{b['wall_s'] / a['wall_s']:.1f} job time, x{b['eval_s'] / a['eval_s']:.1f} evaluation time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
