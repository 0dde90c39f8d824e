"""Reference numbers for the data stage, produced with DIALS 3.12 / cctbx (run with /usr/bin/python3).

    /usr/bin/python3 tests/data/reference/make_dials_reference.py [SHARED_DATA_DIR]

Writes beside this script:
* `asu_cctbx.npz`: cctbx `map_to_asu` (non-anomalous and anomalous), centric flags,
  epsilons (without centring) and systematic absences of 64 Miller indices in every
  space-group setting cctbx knows (keyed by Hall symbol).
* `prepare_<name>.npz` + `prepare_reference.json`: DIALS' own input preparation of each
  dataset, as dials.scale runs it with default options (prepare_input, the
  integration-quality filter, partial summation, initial intensity choice): which input
  rows survive, their user_excluded / excluded flags, `intensity`, `variance`, the
  prescaling correction and the log counts.
* `combine_<name>.npz`: the intensity-combination test as dials.scale ran it (captured by
  wrapping DIALS' SingleDatasetIntensityCombiner): inverse scales of every row at that
  moment, the rows used, the Imid candidates and their Rmeas.
Nothing here is computed with jaxscale.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from cctbx import crystal, miller, sgtbx
from cctbx.array_family import flex as cflex
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory

HERE = Path(__file__).resolve().parent
SHARED = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[3] / "shared" / "data"

DATASETS = {
    "quartz": ("quartz_3ded_dials/integrated.refl", "quartz_3ded_dials/integrated.expt", []),
    "lcys_20": (
        "lcys_4sweep_dials/integrated/lcys_20_integrated.refl",
        "lcys_4sweep_dials/integrated/lcys_20_integrated.expt",
        [],
    ),
}


def asu_reference() -> None:
    rng = np.random.default_rng(1)
    h = rng.integers(-9, 10, size=(80, 3)).astype(np.int32)
    h = h[np.any(h != 0, axis=1)][:64]
    idx = cflex.miller_index([tuple(int(v) for v in row) for row in h])
    keys = ("asu", "asu_anom", "centric", "epsilon", "absent")
    out: dict[str, list] = {k: [] for k in keys}
    halls = []
    for symbol in sgtbx.space_group_symbol_iterator():
        info = sgtbx.space_group_info(symbol=symbol.universal_hermann_mauguin())
        sym = crystal.symmetry(space_group_info=info)
        plain = miller.set(sym, idx, anomalous_flag=False)
        anom = miller.set(sym, idx, anomalous_flag=True)
        halls.append(info.type().hall_symbol())
        out["asu"].append(np.array(plain.map_to_asu().indices(), dtype=np.int8))
        out["asu_anom"].append(np.array(anom.map_to_asu().indices(), dtype=np.int8))
        out["centric"].append(np.array(plain.centric_flags().data(), dtype=bool))
        out["epsilon"].append(np.array(plain.epsilons().data(), dtype=np.int8))
        out["absent"].append(np.array(info.group().is_sys_absent(idx), dtype=bool))
    np.savez_compressed(
        HERE / "asu_cctbx.npz", hkl=h, hall=np.array(halls), **{k: np.stack(v) for k, v in out.items()}
    )


def dials_params(extra: list[str]):
    from dials.command_line.scale import phil_scope

    return phil_scope.fetch(
        sources=[phil_scope.parse(e) for e in extra]
    ).extract() if extra else phil_scope.extract()


def prepare_reference(name: str, refl: str, expt: str, extra: list[str]) -> dict:
    from dials.algorithms.scaling.algorithm import prepare_input
    from dials.algorithms.scaling.scaler_factory import ScalerFactory
    from dials.algorithms.scaling.scaling_library import choose_initial_scaling_intensities
    from dials.util.filter_reflections import sum_partial_reflections

    params = dials_params(extra)
    table = flex.reflection_table.from_file(str(SHARED / refl))
    experiments = ExperimentListFactory.from_json_file(str(SHARED / expt), check_format=False)
    params.exclude_images = [e for e in params.exclude_images if e]
    n_input = table.size()
    table["row_index"] = flex.int(range(n_input))
    params, experiments, tables = prepare_input(params, experiments, [table])
    table = tables[0]
    n_user_prepare = table.get_flags(table.flags.user_excluded_in_scaling).count(True)
    table = ScalerFactory.filter_bad_reflections(
        table,
        partiality_cutoff=params.cut_data.partiality_cutoff,
        min_isigi=params.cut_data.min_isigi,
        intensity_choice=params.reflection_selection.intensity_choice,
    )
    table = sum_partial_reflections(table)
    table["inverse_scale_factor"] = flex.double(table.size(), 1.0)
    table = choose_initial_scaling_intensities(table, params.reflection_selection.intensity_choice)
    user = table.get_flags(table.flags.user_excluded_in_scaling)
    excl = table.get_flags(table.flags.excluded_for_scaling)
    np.savez_compressed(
        HERE / f"prepare_{name}.npz",
        row_index=np.array(table["row_index"], dtype=np.int32),
        user_excluded=np.array(user, dtype=bool),
        excluded=np.array(excl, dtype=bool),
        intensity=np.array(table["intensity"]),
        variance=np.array(table["variance"]),
        prescaling_correction=np.array(table["prescaling_correction"]),
        partiality=np.array(table["partiality"]),
        intensity_sum=np.array(table["intensity.sum.value"]),
        variance_sum=np.array(table["intensity.sum.variance"]),
        intensity_prf=np.array(table["intensity.prf.value"]),
        variance_prf=np.array(table["intensity.prf.variance"]),
    )
    return {
        "n_input": n_input,
        "n_after_partials": table.size(),
        "n_user_excluded_prepare_input": n_user_prepare,
        "n_user_excluded": user.count(True),
        "n_excluded": excl.count(True),
        "n_user_excluded_or_excluded": (user | excl).count(True),
        "n_suitable": (~(user | excl)).count(True),
    }


def combine_reference(name: str, refl: str, expt: str, extra: list[str]) -> None:
    """Run dials.scale and capture the Imid test of the (first) intensity combination."""
    import dials.algorithms.scaling.combine_intensities as ci
    import dials.algorithms.scaling.scaler as scaler_module
    from dials.command_line import scale

    captured: dict = {}
    original = ci.SingleDatasetIntensityCombiner._test_Imid_combinations

    def capture(self):
        rows, results = original(self)
        if not captured:
            sc = self.scaler
            tab = sc.reflection_table
            suitable = np.array(sc.suitable_refl_for_scaling_sel, dtype=bool)
            outlier = np.zeros(tab.size(), dtype=bool)
            outlier[np.flatnonzero(suitable)[np.array(sc.outliers, dtype=bool)]] = True
            captured.update(
                inverse_scale_factor=np.array(tab["inverse_scale_factor"]),
                outlier=outlier,
                suitable=suitable,
                imids=np.array(list(results.keys()), dtype=np.float64),
                rmeas=np.array(list(results.values()), dtype=np.float64),
                n_test_rows=np.int64(self.dataset.size()),
            )
        return rows, results

    ci.SingleDatasetIntensityCombiner._test_Imid_combinations = capture
    scaler_module.SingleDatasetIntensityCombiner = ci.SingleDatasetIntensityCombiner
    cwd = os.getcwd()
    work = Path("/tmp") / f"jaxscale_combine_ref_{name}"
    work.mkdir(exist_ok=True)
    os.chdir(work)
    try:
        scale.run([str(SHARED / refl), str(SHARED / expt), "full_matrix=False", *extra])
    finally:
        os.chdir(cwd)
        ci.SingleDatasetIntensityCombiner._test_Imid_combinations = original
    np.savez_compressed(HERE / f"combine_{name}.npz", **captured)


def main() -> None:
    asu_reference()
    counts = {}
    for name, (refl, expt, extra) in DATASETS.items():
        counts[name] = prepare_reference(name, refl, expt, extra)
    (HERE / "prepare_reference.json").write_text(json.dumps(counts, indent=1) + "\n")
    for name, (refl, expt, extra) in DATASETS.items():
        combine_reference(name, refl, expt, extra)


if __name__ == "__main__":
    main()
