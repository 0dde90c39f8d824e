"""Reference numbers for tests/errors from DIALS 3.12 itself (run with /usr/bin/python3).

Generates seeded synthetic grouped data (P1, anomalous grouping, one Miller index per
group), runs DIALS' BasicErrorModel refinement (individual and regression) and its
standard/simple outlier rejection, and stores inputs and DIALS outputs in
dials_reference.npz beside this script. `individual_ab_converged` is DIALS' individual
refinement with the 1e-4 RMSD stop of its a- and b-step L-BFGS runs disabled (each runs to
scitbx's gradient test): the exact minimum of DIALS' own a/b objectives.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from cctbx import sgtbx
from dials.algorithms.scaling.error_model.engine import run_error_model_refinement
from dials.algorithms.scaling.error_model.error_model import BasicErrorModel, phil_scope
from dials.algorithms.scaling.Ih_table import IhTable
from dials.algorithms.scaling.outlier_rejection import determine_outlier_index_arrays
from dials.array_family import flex


def synthetic(seed: int, n_groups: int, a: float, b: float, n_outliers: int, g_per_group: bool = False):
    rng = np.random.default_rng(seed)
    mult = rng.integers(2, 8, n_groups)
    gid = np.repeat(np.arange(n_groups), mult)
    n = gid.size
    ih = rng.lognormal(5.0, 1.5, n_groups)
    g = rng.uniform(0.5, 1.5, n_groups)[gid] if g_per_group else rng.uniform(0.5, 1.5, n)
    mean = g * ih[gid]
    variance = mean + 20.0
    true_var = a * a * (variance + (b * mean) ** 2)
    intensity = mean + rng.normal(size=n) * np.sqrt(true_var)
    pick = rng.choice(n, n_outliers, replace=False)
    intensity[pick] += rng.choice([-1, 1], n_outliers) * 20.0 * np.sqrt(true_var[pick])
    return intensity, variance, g, gid


def table(intensity, variance, g, gid):
    t = flex.reflection_table()
    hkl = np.stack([gid % 37 + 1, (gid // 37) % 37 + 1, gid // (37 * 37) + 1], axis=1).astype(np.int32)
    t["miller_index"] = flex.miller_index([tuple(int(v) for v in r) for r in hkl])
    t["intensity"] = flex.double(intensity)
    t["variance"] = flex.double(variance)
    t["inverse_scale_factor"] = flex.double(g)
    return t


def main() -> None:
    sg = sgtbx.space_group_info("P1").group()
    out = {}
    intensity, variance, g, gid = synthetic(seed=11, n_groups=1500, a=1.3, b=0.03, n_outliers=30)
    out.update(intensity=intensity, variance=variance, g=g, group_id=gid)
    reg = synthetic(seed=12, n_groups=1500, a=1.3, b=0.05, n_outliers=0, g_per_group=True)
    out.update(reg_intensity=reg[0], reg_variance=reg[1], reg_g=reg[2], reg_group_id=reg[3])
    for method in ("individual", "regression"):
        params = phil_scope.extract().basic
        params.minimisation = method
        model = BasicErrorModel(basic_params=params)
        data = (intensity, variance, g, gid) if method == "individual" else reg
        ih_table = IhTable([table(*data)], sg, nblocks=1, anomalous=True)
        model = run_error_model_refinement(model, ih_table)
        out[f"{method}_ab"] = np.array(model.parameters)
        out[f"{method}_n_refl"] = np.array(model.n_refl)
        if method == "individual":
            info = model.binner.binning_info
            out["bin_boundaries"] = np.array(info["bin_boundaries"])
            out["bin_counts"] = np.array(info["refl_per_bin"])
            out["bin_var_initial"] = np.array(info["initial_variances"])
            out["bin_var_final"] = np.array(info["bin_variances"])
    # DIALS' a/b sub-minimisations stop on a 1e-4 relative RMSD change; run them to convergence
    from dials.algorithms.scaling.error_model import engine

    engine.ErrorModelRegressionRefiner.test_rmsd_convergence = lambda self: False
    model = BasicErrorModel(basic_params=phil_scope.extract().basic)
    ih_table = IhTable([table(intensity, variance, g, gid)], sg, nblocks=1, anomalous=True)
    out["individual_ab_converged"] = np.array(run_error_model_refinement(model, ih_table).parameters)
    for method in ("standard", "simple"):
        ih_table = IhTable([table(intensity, variance, g, gid)], sg, nblocks=1, anomalous=True)
        idx = determine_outlier_index_arrays(ih_table, method=method, zmax=6.0)[0]
        out[f"{method}_outliers"] = np.sort(np.asarray(idx, dtype=np.int64))
    np.savez_compressed(Path(__file__).with_name("dials_reference.npz"), **out)
    print({k: v for k, v in out.items() if v.size < 20})


if __name__ == "__main__":
    main()
