"""Generate DIALS 3.12 reference numbers for the basis/model tests.

Run with DIALS' python from the repository root:
    /usr/bin/python3 tests/models/reference/make_reference.py [shared_data_dir]
Writes tests/models/reference/dials_reference.json:
  * smoothers: values and dense derivative rows of DIALS' SmoothScaleComponent1D/2D/3D for
    planted raw coordinates (covers the min-shift, range and window rules);
  * harmonics: crystal-frame vectors (after the x->polar alignment), the exact harmonic
    table and the >100000-row lookup-table values, for 20 suitable rows of each of the
    four lcys sweeps of the DIALS 3.12 reference run, with their inputs (z_px, s1);
  * models: DIALS `from_data` scaling models (to_dict) for quartz and lcys_20 integrated
    data with several option sets;
  * scales: inverse scales of DIALS array / KB / dose_decay components with planted
    parameters on sweep 0 of the lcys run, and DIALS `limit_image_range` results.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from dials.algorithms.scaling.model.components.smooth_scale_components import (
    SmoothScaleComponent1D,
    SmoothScaleComponent2D,
    SmoothScaleComponent3D,
)
from dials.algorithms.scaling.model.model import (
    ArrayScalingModel,
    DoseDecay,
    KBScalingModel,
    PhysicalScalingModel,
)
from dials.algorithms.scaling.scaling_utilities import (
    align_axis_along_z,
    calc_crystal_frame_vectors,
    sph_harm_table,
)
from dials.algorithms.scaling.model.components.scale_components import SHScaleComponent
from dials_scaling_ext import (
    calc_lookup_index,
    calc_theta_phi,
    calculate_harmonic_tables_from_selections,
    create_sph_harm_lookup_table,
)
from dials.array_family import flex
from dials.command_line.scale import phil_scope
from dxtbx import flumpy
from dxtbx.model.experiment_list import ExperimentListFactory

HERE = Path(__file__).resolve().parent
SHARED = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[3] / "shared" / "data"


def dense(mat) -> list:
    return mat.as_dense_matrix().as_numpy_array().tolist()


def smoother_cases(rng) -> list[dict]:
    cases = []
    # 1D: parameter counts 2..14, raw coordinates with offset and half-integer edge cases
    for n_params, span in [(2, 0.9), (3, 1.7), (4, 1.99), (5, 3.0), (9, 6.96), (14, 11.99), (6, 2.5)]:
        x = np.concatenate([[0.0, span], rng.uniform(0, span, 30), np.arange(0, span, 0.5)])
        x = x + 3.25  # raw coordinates start away from zero: the component shifts by min
        params = rng.normal(1.0, 0.3, n_params)
        comp = SmoothScaleComponent1D(flex.double(params))
        comp.data = {"x": flex.double(x)}
        comp.update_reflection_data()
        value, deriv = comp.calculate_scales_and_derivatives()
        cases.append({"dim": 1, "shape": [n_params], "coords": [x.tolist()],
                      "params": params.tolist(), "value": list(value), "deriv": dense(deriv)})
    for shape, spans in [((12, 7), (10.0, 6.96)), ((3, 2), (1.7, 0.6)), ((5, 4), (3.0, 2.0))]:
        coords = [np.concatenate([[0.0, s], rng.uniform(0, s, 25)]) + 1.1 for s in spans]
        params = rng.normal(1.0, 0.3, int(np.prod(shape)))
        comp = SmoothScaleComponent2D(flex.double(params), shape=shape)
        comp.data = {"x": flex.double(coords[0]), "y": flex.double(coords[1])}
        comp.update_reflection_data()
        value, deriv = comp.calculate_scales_and_derivatives()
        cases.append({"dim": 2, "shape": list(shape), "coords": [c.tolist() for c in coords],
                      "params": params.tolist(), "value": list(value), "deriv": dense(deriv)})
    for shape, spans in [((5, 5, 7), (3.0, 3.0, 6.96)), ((2, 3, 4), (0.9, 1.5, 2.0))]:
        coords = [np.concatenate([[0.0, s], rng.uniform(0, s, 25)]) + 0.3 for s in spans]
        params = rng.normal(1.0, 0.3, int(np.prod(shape)))
        comp = SmoothScaleComponent3D(flex.double(params), shape=shape)
        comp.data = {"x": flex.double(coords[0]), "y": flex.double(coords[1]),
                     "z": flex.double(coords[2])}
        comp.update_reflection_data()
        value, deriv = comp.calculate_scales_and_derivatives()
        cases.append({"dim": 3, "shape": list(shape), "coords": [c.tolist() for c in coords],
                      "params": params.tolist(), "value": list(value), "deriv": dense(deriv)})
    return cases


def harmonic_cases(rng) -> list[dict]:
    ref = SHARED / "lcys_4sweep_dials" / "reference_dials3.12_scale"
    expts = ExperimentListFactory.from_json_file(str(ref / "scaled.expt"), check_format=False)
    table = flex.reflection_table.from_file(str(ref / "scaled.refl"))
    bad = table.get_flags(table.flags.user_excluded_in_scaling) | table.get_flags(
        table.flags.excluded_for_scaling)
    cases = []
    lookup4 = create_sph_harm_lookup_table(4, 2)
    for i, expt in enumerate(expts):
        t = table.select((table["id"] == i) & ~bad)
        z = flumpy.to_numpy(t["xyzobs.px.value"].parts()[2])
        pick = np.unique(np.concatenate([[np.argmin(z), np.argmax(z)],
                                         rng.choice(len(t), 18, replace=False)]))
        sel = flex.reflection_table()
        sub = t.select(flex.size_t(pick.tolist()))
        sel["s1"] = sub["s1"]
        sel["xyzobs.px.value"] = sub["xyzobs.px.value"]
        sel = calc_crystal_frame_vectors(sel, expt)
        sel["s0c"] = align_axis_along_z((1.0, 0.0, 0.0), sel["s0c"])
        sel["s1c"] = align_axis_along_z((1.0, 0.0, 0.0), sel["s1c"])
        exact = {lmax: dense(sph_harm_table(sel, lmax).transpose()) for lmax in (4, 6)}
        i0 = calc_lookup_index(calc_theta_phi(sel["s0c"]), points_per_degree=2)
        i1 = calc_lookup_index(calc_theta_phi(sel["s1c"]), points_per_degree=2)
        _, lookup = calculate_harmonic_tables_from_selections(i0, i1, lookup4)
        cases.append({
            "experiment": i, "identifier": expt.identifier,
            "z_px": z[pick].tolist(), "s1": flumpy.to_numpy(sub["s1"]).tolist(),
            "s0c": flumpy.to_numpy(sel["s0c"]).tolist(), "s1c": flumpy.to_numpy(sel["s1c"]).tolist(),
            "harmonics_lmax4": exact[4], "harmonics_lmax6": exact[6],
            "lookup_lmax4": dense(lookup),
        })
    return cases


def model_cases() -> list[dict]:
    data = [("quartz", SHARED / "quartz_3ded_dials" / "integrated"),
            ("lcys_20", SHARED / "lcys_4sweep_dials" / "integrated" / "lcys_20_integrated")]
    option_sets = {
        "physical": ["model=physical"],
        "physical_medium": ["model=physical", "physical.absorption_level=medium"],
        "physical_intervals": ["model=physical", "physical.scale_interval=5", "physical.decay_interval=7.5",
                               "physical.absorption_correction=False"],
        "array": ["model=array"],
        "array_modulation": ["model=array", "array.modulation_correction=True",
                             "array.decay_correction=False"],
        "KB": ["model=KB"],
        "dose_decay": ["model=dose_decay"],
        "dose_decay_abs": ["model=dose_decay", "dose_decay.absorption_correction=True",
                           "dose_decay.share.decay=False"],
    }
    classes = {"physical": PhysicalScalingModel, "array": ArrayScalingModel,
               "KB": KBScalingModel, "dose_decay": DoseDecay}
    from libtbx.phil import parse
    cases = []
    for name, stem in data:
        expts = ExperimentListFactory.from_json_file(str(stem) + ".expt", check_format=False)
        table = flex.reflection_table.from_file(str(stem) + ".refl")
        for label, opts in option_sets.items():
            params = phil_scope.fetch(parse("\n".join(opts))).extract()
            model = classes[params.model].from_data(params, expts[0], table)
            cases.append({"data": name, "options": opts, "model": json.loads(json.dumps(model.to_dict()))})
    return cases


def scale_cases(rng) -> list[dict]:
    """DIALS component scales with planted parameters over the suitable rows of sweep 0 of
    the lcys reference run (g kept for 60 rows), for the non-physical model types."""
    from libtbx.phil import parse
    ref = SHARED / "lcys_4sweep_dials" / "reference_dials3.12_scale"
    expts = ExperimentListFactory.from_json_file(str(ref / "scaled.expt"), check_format=False)
    table = flex.reflection_table.from_file(str(ref / "scaled.refl"))
    bad = table.get_flags(table.flags.user_excluded_in_scaling) | table.get_flags(
        table.flags.excluded_for_scaling)
    t = table.select((table["id"] == 0) & ~bad)
    t = calc_crystal_frame_vectors(t, expts[0])
    t["s0c"] = align_axis_along_z((1.0, 0.0, 0.0), t["s0c"])
    t["s1c"] = align_axis_along_z((1.0, 0.0, 0.0), t["s1c"])
    rows = np.sort(rng.choice(len(t), 60, replace=False))
    option_sets = [["model=array", "array.modulation_correction=True"],
                   ["model=KB"],
                   ["model=dose_decay", "dose_decay.absorption_correction=True"],
                   ["model=dose_decay", "dose_decay.resolution_dependence=linear"]]
    classes = {"array": ArrayScalingModel, "KB": KBScalingModel, "dose_decay": DoseDecay}
    cases = []
    for opts in option_sets:
        params = phil_scope.fetch(parse("\n".join(opts))).extract()
        model = classes[params.model].from_data(params, expts[0], t)
        g = np.ones(len(t))
        for name, comp in model.components.items():
            null = comp.null_parameter_value
            spread = {"relative_B": 2.0, "absorption": 0.01}.get(name, 0.2 if null == 1.0 else 1.0)
            if name == "decay" and params.model == "dose_decay":
                spread = 1e-5
            comp.parameters = flex.double(null + rng.normal(0.0, spread, comp.n_params))
        model.configure_components(t, expts[0], params)
        for comp in model.components.values():
            comp.update_reflection_data()
            g *= flumpy.to_numpy(comp.calculate_scales())
        cases.append({"options": opts, "model": json.loads(json.dumps(model.to_dict())),
                      "rows": rows.tolist(), "g": g[rows].tolist()})
    # limit_image_range of a physical and an array model (quartz, 100 images)
    stem = SHARED / "quartz_3ded_dials" / "integrated"
    qexp = ExperimentListFactory.from_json_file(str(stem) + ".expt", check_format=False)
    qtab = flex.reflection_table.from_file(str(stem) + ".refl")
    for opts, new_range in ((["model=physical"], (11, 90)), (["model=array"], (21, 100)),
                            (["model=dose_decay"], (5, 64))):
        params = phil_scope.fetch(parse("\n".join(opts))).extract()
        model = {"physical": PhysicalScalingModel, "array": ArrayScalingModel,
                 "dose_decay": DoseDecay}[params.model].from_data(params, qexp[0], qtab)
        model.set_valid_image_range(qexp[0].scan.get_image_range())
        for comp in model.components.values():
            comp.parameters = flex.double(rng.normal(1.0, 0.1, comp.n_params))
        before = json.loads(json.dumps(model.to_dict()))
        model.limit_image_range(new_range)
        cases.append({"options": opts, "limit_image_range": list(new_range), "before": before,
                      "after": json.loads(json.dumps(model.to_dict()))})
    return cases


def main() -> None:
    rng = np.random.default_rng(20240601)
    out = {"smoothers": smoother_cases(rng), "harmonics": harmonic_cases(rng), "models": model_cases(),
           "scales": scale_cases(rng)}
    (HERE / "dials_reference.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
