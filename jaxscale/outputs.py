"""Everything a scaling run writes, assembled after the run succeeded and written together.

`report_data(...)` fills the HTML report's data dict (jaxscale.report.html module docstring)
from the scaled table, the fitted model and the error model; `write_outputs(...)` writes
every requested file under a temporary name first and renames them onto their targets only
when all of them were written, so a failed run leaves earlier outputs untouched.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.symmetry import d_star_sq as _d_star_sq
from jaxscale.data.symmetry import is_centric
from jaxscale.data.table import ReflectionTable
from jaxscale.errors.error_model import ErrorModelResult
from jaxscale.merge.merging import ScaledObservations
from jaxscale.models.build import DatasetInput, ScalingModel, build_model
from jaxscale.models.linear import host_apply

N_GRID = 200  # points of the scale / B curves per data set
MAX_PLOT_POINTS = 5000  # normal-plot points kept in the HTML


# ------------------------------------------------------------------------- report data
def image_number(table: ReflectionTable, rows: np.ndarray | None = None) -> np.ndarray:
    """Image number (n,) of rows: floor(z_px) + 1 (DIALS' batch without offset)."""
    z = np.asarray(table["xyzobs.px.value"])[:, 2]
    z = z if rows is None else z[rows]
    return np.floor(z).astype(np.int64) + 1


def batch_numbers(table: ReflectionTable, experiments: Sequence[Any], obs: ScaledObservations) -> np.ndarray:
    """MTZ batch number (n,) of each scaled observation: image + batch offset per sweep;
    stills: one batch per experiment (index + 1)."""
    from jaxscale.io.mtz import batch_offsets_for

    offsets = np.asarray(batch_offsets_for(list(experiments)), dtype=np.int64)
    still = np.array([e.is_still or not e.scan for e in experiments], dtype=bool)
    image = image_number(table, obs.rows)
    return np.where(still[obs.dataset], obs.dataset + 1, image + offsets[obs.dataset])


def _grid_input(expt: Any, k: int) -> tuple[DatasetInput, np.ndarray]:
    """DatasetInput of N_GRID points along the sweep at d = 1/sqrt(2) (so a B factor
    exp(B / 2d^2) evaluates to exp(B)), and their rotation angles (deg)."""
    if expt.scan and not expt.is_still:
        first, last = expt.image_range
        z = np.linspace(0.0, float(last - first + 1), N_GRID)
        start, width = expt.oscillation
        rotation = start + z * width
    else:
        z = np.zeros(2)
        rotation = np.zeros(2)
    n = z.size
    s0 = -np.asarray(expt.s0_direction, dtype=np.float64) / float(expt.wavelength)
    s1 = np.tile(s0, (n, 1))
    xyz = np.column_stack([np.zeros(n), np.zeros(n), z])
    return DatasetInput(experiment=expt, z_px=z, d=np.full(n, 2.0 ** -0.5), s1=s1, xyz_px=xyz,
                        dataset_index=k, config_xyz_px=xyz, config_d=np.full(n, 2.0 ** -0.5)), rotation


def absorption_surface(coefficients: np.ndarray, lmax: int, n_theta: int = 37, n_phi: int = 73) -> dict:
    """1 + sum_lm C_lm Yr_lm(theta, phi) on a polar/azimuth grid (degrees), as DIALS plots it."""
    from jaxscale.basis.harmonics import real_harmonics

    theta = np.linspace(0.0, np.pi, n_theta)
    phi = np.linspace(0.0, 2.0 * np.pi, n_phi)
    tt, pp = np.meshgrid(theta, phi, indexing="ij")
    y = real_harmonics(lmax, tt.ravel(), pp.ravel())  # (t p, n_coef)
    surface = 1.0 + y @ np.asarray(coefficients, dtype=np.float64)
    return {"theta_deg": np.degrees(theta), "phi_deg": np.degrees(phi),
            "correction": surface.reshape(n_theta, n_phi)}


def model_curves(model: ScalingModel, params: Mapping[str, Any], experiments: Sequence[Any],
                 options: Any, datasets: Sequence[int] | None = None) -> dict:
    """Per data set: scale and relative B vs rotation evaluated from the fitted parameters
    on a grid through the models API, and the absorption surface (physical model).
    datasets: the model's data-set index of each experiment (default: all, in order)."""
    states = model.updated_states(params)
    indices = list(datasets) if datasets else (list(model.dataset_indices) or sorted(states))
    grids = [_grid_input(experiments[pos], k) for pos, k in enumerate(indices)]
    grid_model = build_model([g for g, _ in grids], options, states=[states[k] for k in indices],
                             exact_harmonics=True)
    # numpy twins of the link functions where there are (nothing compiled), else one jitted
    # program for all components (eager jnp calls would compile one program per operation)
    host = {key: host_apply(comp.apply) for key, comp in grid_model.components.items()}
    if all(f is not None for f in host.values()):
        factors = {key: f(np.asarray(grid_model.params[key]),
                          {k: np.asarray(v) for k, v in grid_model.bases[key].items()})
                   for key, f in host.items()}
    else:
        factors = jax.device_get(jax.jit(lambda p, b: {key: comp.apply(p[key], b[key])
                                                       for key, comp in grid_model.components.items()})(
            grid_model.params, grid_model.bases))
    out = []
    for pos, (k, (_, rotation)) in enumerate(zip(indices, grids)):  # loop over data sets
        state = states[k]
        rows = grid_model.obs_slices[k]
        entry: dict[str, Any] = {"name": f"{pos}: {experiments[pos].identifier[:8]} ({state.model_id})"}
        for key, f in factors.items():
            model_id, name = key.split(".", 1)
            if model_id != state.model_id:
                continue
            if name == "scale":
                entry["scale"] = {"rotation_deg": rotation, "value": f[rows]}
            elif name == "decay" and model_id in ("physical", "KB"):
                entry["decay"] = {"rotation_deg": rotation, "b": np.log(f[rows])}
        if "absorption" in state.params and state.model_id == "physical":
            entry["absorption"] = absorption_surface(state.params["absorption"], int(state.config["lmax"]))
        out.append(entry)
    return {"datasets": out}


def error_model_plots(result: ErrorModelResult | None) -> dict | None:
    """Normal probability plot of the final normalised deviations and binned variances."""
    if result is None or result.delta is None:
        return None
    from statistics import NormalDist

    delta = np.sort(np.asarray(result.delta))
    n = delta.size
    keep = np.unique(np.linspace(0, n - 1, min(n, MAX_PLOT_POINTS)).astype(np.int64))
    quantile = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in keep])  # <= 5000 points
    out: dict[str, Any] = {"a": result.a, "b": result.b,
                           "normal_plot": {"expected": quantile, "observed": delta[keep]}}
    if result.bin_boundaries is not None and result.bin_variances_corrected is not None:
        edges = np.asarray(result.bin_boundaries, dtype=np.float64)
        out["bins"] = {"i_mean": 0.5 * (edges[:-1] + edges[1:]),
                       "variance_before": result.bin_variances_uncorrected,
                       "variance_after": result.bin_variances_corrected,
                       "n": result.bin_counts}
    return out


def outlier_positions(table: ReflectionTable) -> dict:
    """Detector position and image of the rows flagged outlier_in_scaling."""
    rows = np.flatnonzero(F.has_any(np.asarray(table["flags"]), F.OUTLIER_IN_SCALING))
    xyz = np.asarray(table["xyzobs.px.value"])[rows]
    return {"x_px": xyz[:, 0], "y_px": xyz[:, 1], "image": image_number(table, rows),
            "dataset": np.asarray(table["id"])[rows]}


def merged_intensities(obs: ScaledObservations, use_internal_variance: bool = False) -> tuple[dict, dict | None]:
    """Merged IMEAN per unique reflection (Wilson plot) and dI/sigma(dI) of acentric Bijvoet
    pairs (None for centrosymmetric groups)."""
    from jaxscale.export import merged_columns

    miller, cols = merged_columns(obs, use_internal_variance, amplitudes=False)
    merged = {"intensity": cols["IMEAN"][1], "sigma": cols["SIGIMEAN"][1],
              "d_star_sq": _d_star_sq(miller, obs.unit_cell), "centric": is_centric(miller, obs.space_group)}
    if obs.space_group.is_centrosymmetric():
        return merged, None
    ip, sp, im, sm = (cols[c][1] for c in ("I(+)", "SIGI(+)", "I(-)", "SIGI(-)"))
    pair = np.isfinite(ip) & np.isfinite(im) & ~merged["centric"]
    delta = (ip[pair] - im[pair]) / np.sqrt(sp[pair] ** 2 + sm[pair] ** 2)
    return merged, {"delta_i_over_sigma": delta}


def report_data(stats: Any, table: ReflectionTable, experiments: Sequence[Any], model: ScalingModel,
                params_tree: Mapping[str, Any], error_model: ErrorModelResult | None, options: Any,
                title: str = "jaxscale scaling report", datasets: Sequence[int] | None = None,
                filtering: dict | None = None, cross_validation: dict | None = None) -> dict:
    """The HTML report's data dict (jaxscale.report.html) from a finished run; datasets: the
    model's data-set index of each experiment (when only some were written); filtering /
    cross_validation: those report sections (jaxscale.filtering / cross_validation
    .report_section) when they ran."""
    from jaxscale.merge.merging import scaled_observations
    from jaxscale.merge.statistics import batch_statistics

    obs = scaled_observations(table, experiments, anomalous=False)
    g = np.asarray(table["inverse_scale_factor"], dtype=np.float64)[obs.rows]
    merged, anomalous = merged_intensities(obs, options.output.use_internal_variance)
    data = {
        "title": title,
        "statistics": stats,
        "batches": batch_statistics(obs, batch_numbers(table, experiments, obs), g),
        "model": model_curves(model, params_tree, experiments, options, datasets),
        "outliers": outlier_positions(table),
        "merged": merged,
    }
    em = error_model_plots(error_model)
    if em is not None:
        data["error_model"] = em
    if anomalous is not None and (options.anomalous or stats.anomalous_bins is not None):
        data["anomalous"] = anomalous
    if filtering:
        data["filtering"] = filtering
    if cross_validation:
        data["cross_validation"] = cross_validation
    return data


# ------------------------------------------------------------------------- serial (many stills)
MAX_SERIES_POINTS = 1000  # per-still / per-batch series of the serial report: at most this many points


def binned_series(values: Mapping[str, np.ndarray], max_points: int = MAX_SERIES_POINTS) -> dict:
    """Series over consecutive items (stills, batches), aggregated to at most max_points points:
    items split into max_points runs of (nearly) equal length; per run the mean index ("index",
    0-based), the mean and standard deviation of each series over its finite values (name,
    name + "_sd") and the run length ("n"). With n <= max_points every item is one point (sd 0).
    O(n) (bincount)."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    n = len(next(iter(arrays.values()))) if arrays else 0
    run = np.arange(n, dtype=np.int64) * max(min(max_points, n), 1) // max(n, 1)
    n_runs = int(run[-1]) + 1 if n else 0
    count = np.bincount(run, minlength=n_runs)
    out: dict[str, Any] = {"index": np.bincount(run, np.arange(n, dtype=np.float64), minlength=n_runs)
                           / np.maximum(count, 1), "n": count}
    for name, v in arrays.items():  # a few series
        finite = np.isfinite(v)
        vf = np.where(finite, v, 0.0)
        m = np.bincount(run, finite, minlength=n_runs)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.bincount(run, vf, minlength=n_runs) / m
            var = np.bincount(run, vf * vf, minlength=n_runs) / m - mean * mean
        out[name] = mean
        out[name + "_sd"] = np.sqrt(np.maximum(var, 0.0))
    return out


def _histogram(v: np.ndarray, n_bins: int = 60) -> dict:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"centre": np.zeros(0), "count": np.zeros(0, dtype=np.int64)}
    count, edges = np.histogram(v, bins=n_bins)
    return {"centre": 0.5 * (edges[:-1] + edges[1:]), "count": count}


def _every_kth(n: int, max_points: int) -> np.ndarray:
    """At most max_points indices spread evenly over 0..n-1."""
    return np.unique(np.linspace(0, n - 1, min(n, max_points)).astype(np.int64)) if n else np.zeros(0, np.int64)


def serial_report_data(stats: Any, table: ReflectionTable, experiments: Sequence[Any], x: np.ndarray,
                       x_sigma: np.ndarray | None, error_model: ErrorModelResult | None, options: Any,
                       combination: Any = None, title: str = "jaxscale scaling report (serial stills)",
                       max_points: int = MAX_SERIES_POINTS, observations: Any = None) -> dict:
    """The HTML/JSON report data of the serial path (many stills, one KB model each): merging
    statistics, per-still k and B vs still index and their histograms, statistics per still
    (batch), error model, outliers, intensity distribution, Imid choice. Every per-still or
    per-outlier series is aggregated or thinned to at most max_points points (the per-still
    values themselves are in scaled.expt), so the report stays light for 10^5-10^6 stills.
    x f[n_stills, 2] (k, B); x_sigma their esds (or None); observations: scaled_observations(table,
    experiments, anomalous=False) when the caller has them (10^7 rows: seconds to rebuild)."""
    from jaxscale.merge.merging import scaled_observations
    from jaxscale.merge.statistics import batch_statistics

    obs = scaled_observations(table, experiments, anomalous=False) if observations is None else observations
    g = np.asarray(table["inverse_scale_factor"], dtype=np.float64)[obs.rows]
    merged, anomalous = merged_intensities(obs, options.output.use_internal_variance)
    bt = batch_statistics(obs, obs.dataset + 1, g)  # one batch per still (MTZ batch = still index + 1)
    batches = binned_series({"batch": bt.batch, "r_merge": bt.r_merge, "i_over_sigma": bt.i_over_sigma,
                             "scale": bt.scale, "n_obs": bt.n_obs}, max_points)
    series = {"k": x[:, 0], "b": x[:, 1]}
    if x_sigma is not None:
        series.update(k_esd=x_sigma[:, 0], b_esd=x_sigma[:, 1])
    stills = {"n_stills": int(len(x)), **binned_series(series, max_points),
              "k_histogram": _histogram(x[:, 0]), "b_histogram": _histogram(x[:, 1])}
    ids = np.asarray(table["id"])
    rows = np.flatnonzero(F.has_any(np.asarray(table["flags"]), F.OUTLIER_IN_SCALING))
    n_outliers = rows.size
    rows = rows[_every_kth(rows.size, MAX_PLOT_POINTS)]
    xyz = np.asarray(table["xyzobs.px.value"])[rows]
    outliers = {"x_px": xyz[:, 0], "y_px": xyz[:, 1], "image": ids[rows] + 1, "n_total": n_outliers,
                "image_label": "still"}
    data = {"title": title, "statistics": stats, "batches": batches, "stills": stills, "outliers": outliers,
            "merged": merged}
    em = error_model_plots(error_model)
    if em is not None:
        data["error_model"] = em
    if anomalous is not None and (options.anomalous or stats.anomalous_bins is not None):
        delta = np.sort(np.asarray(anomalous["delta_i_over_sigma"]))
        data["anomalous"] = {"delta_i_over_sigma": delta[_every_kth(delta.size, MAX_PLOT_POINTS)]}
    if combination is not None:
        data["combination"] = {"imid": [combination.label(c) for c in combination.imids],
                               "rmeas": combination.rmeas, "cc_half": combination.cc_half,
                               "chosen": combination.label(combination.imid), "n_test": combination.n_test}
    return data


def json_sections(data: dict, run_info: dict) -> dict:
    """The JSON report's extra sections: everything of the HTML data but the statistics
    (written as merging_statistics) and the per-reflection merged intensities."""
    out = {"run": run_info}
    for key in ("batches", "model", "stills", "combination", "error_model", "outliers", "anomalous"):
        if data.get(key) is not None:
            out[key] = data[key]
    return out


# ------------------------------------------------------------------------- writing
def _staging_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.staged{target.suffix}"


def write_all(jobs: Sequence[tuple[str, str | os.PathLike, Callable[[Path], None]]],
              on_written: Callable[[str], None] | None = None) -> dict[str, str]:
    """Run every writer on a staging file beside its target; once all succeeded, rename each
    onto its target (atomic per file). On any failure the staging files are removed and no
    target is touched. jobs: (name, target path, writer(path)). Returns {name: target}."""
    staged: list[tuple[Path, Path]] = []
    try:
        for name, target, writer in jobs:  # a handful of output files
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _staging_path(target)
            staged.append((tmp, target))
            writer(tmp)
            if on_written is not None:  # progress only; the rename comes after all succeeded
                on_written(name)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    for tmp, target in staged:
        os.replace(tmp, target)
    return {name: str(target) for name, target, _ in jobs}


def output_jobs(params: Any, table: ReflectionTable, experiments: list, stats: Any, report: dict | None,
                run_info: dict) -> list[tuple[str, str, Callable[[Path], None]]]:
    """(name, path, writer) of every output named in params.output except the log."""
    from jaxscale.io.expt import write_expt
    from jaxscale.io.refl import write_refl

    out = params.output
    jobs: list[tuple[str, str, Callable[[Path], None]]] = []
    if out.reflections:
        jobs.append(("reflections", out.reflections, lambda p: write_refl(table, p)))
    if out.experiments:
        jobs.append(("experiments", out.experiments, lambda p: write_expt(experiments, p)))
    if out.unmerged_mtz or out.merged_mtz:  # jaxscale.export (French-Wilson, numpy.polynomial): ~10 ms to import
        from jaxscale.export import mtz_jobs

        jobs += mtz_jobs(params, table, experiments)
    if out.html and report is not None:
        from jaxscale.report.html import write_report

        jobs.append(("html", out.html, lambda p: write_report(p, report)))
    if out.json and stats is not None:
        from jaxscale.report.json_report import write_json_report

        extra = json_sections(report or {}, run_info)
        jobs.append(("json", out.json, lambda p: write_json_report(p, stats, extra)))
    return jobs


__all__ = ["batch_numbers", "model_curves", "absorption_surface", "error_model_plots", "outlier_positions",
           "merged_intensities", "report_data", "serial_report_data", "binned_series", "json_sections", "write_all",
           "output_jobs"]
