"""Reference ΔCC½ numbers from DIALS 3.12 itself, for tests/merge/test_delta_cchalf.py.

Runs DIALS' own `CCHalfFromDials` (the code behind `dials.compute_delta_cchalf` and the
`filtering.method=deltacchalf` cycles of dials.scale) on the lcys 4-sweep reference scale
run and writes every number at full precision to JSON:

* `dataset`: mode=dataset (the default);
* `image_group_100`: mode=image_group, group_size=100;
* `planted_image_group_100`: as above after a planted perturbation (`perturb` below: the
  scaled intensities of some image ranges reversed in order or scaled down, so they no
  longer agree with their symmetry mates), stdcutoff=3, so DIALS removes image groups — including its
  "only at the edge of a sweep" rule; `planted_image_group_100_std1` the same with
  stdcutoff=1 (more groups below the cutoff, some not at a sweep edge).

    /usr/bin/python3 delta_cchalf_reference.py scaled.refl scaled.expt delta_cchalf_lcys.json
"""
import json
import sys

from dials.algorithms.statistics.cc_half_algorithm import CCHalfFromDials
from dials.array_family import flex
from dials.command_line.compute_delta_cchalf import phil_scope
from dxtbx.model.experiment_list import ExperimentListFactory

# (table id, first image, last image, factor): intensities in the range multiplied by factor,
# or (factor None) reversed in order.
PLANTED = [(1, 1, 104, 5.0), (1, 105, 204, None), (1, 805, 904, None), (3, 1501, 1700, None),
           (0, 8, 107, 5.0)]


def perturb(table):
    """Reverse intensity.scale.value within each planted (id, image range) selection."""
    z = table["xyzobs.px.value"].parts()[2]
    image = flex.floor(z).iround() + 1
    values = table["intensity.scale.value"]
    for id_, first, last, factor in PLANTED:
        isel = ((table["id"] == id_) & (image >= first) & (image <= last)).iselection()
        if factor is None:
            values.set_selected(isel, values.select(isel).reversed())
        else:
            values.set_selected(isel, values.select(isel) * factor)
    table["intensity.scale.value"] = values
    return table


def run(refl, expt, mode, group_size=10, stdcutoff=4.0, planted=False):
    experiments = ExperimentListFactory.from_json_file(expt, check_format=False)
    table = flex.reflection_table.from_file(refl)
    if planted:
        table = perturb(table)
    params = phil_scope.extract()
    params.mode = mode
    params.group_size = group_size
    params.stdcutoff = stdcutoff
    script = CCHalfFromDials(params, experiments, table)
    script.run()
    alg = script.algorithm
    summary = script.results_summary
    removal = summary["dataset_removal"]
    out = {
        "mode": mode,
        "group_size": group_size,
        "stdcutoff": stdcutoff,
        "n_observations": int(script.algorithm.reflection_table.size()),
        "mean_cc_half": summary["mean_cc_half"],
        "delta_cc_half": {str(k): v for k, v in alg.delta_cchalf_i.items()},
        "cutoff_value": removal["cutoff_value"],
        "experiment_ids_fully_removed": [int(i) for i in removal.get("experiment_ids_fully_removed", [])],
        "n_reflections_removed": int(removal.get("n_reflections_removed", 0)),
    }
    if mode == "image_group":
        out["group_ranges"] = {
            str(k): [v[0], list(v[1])] for k, v in script.group_to_datasetid_and_range.items()
        }
        out["identifiers"] = {str(k): v for k, v in table.experiment_identifiers()}
        out["image_ranges_removed"] = [[list(r), int(i)] for r, i in removal["image_ranges_removed"]]
        out["valid_image_ranges_after"] = [
            [list(r) for r in e.scan.get_valid_image_ranges(e.identifier)] for e in script.experiments
        ]
    return out


def main(refl, expt, out):
    results = {
        "source": "DIALS 3.12 CCHalfFromDials on lcys_4sweep_dials/reference_dials3.12_scale",
        "planted": PLANTED,
        "dataset": run(refl, expt, "dataset"),
        "image_group_100": run(refl, expt, "image_group", group_size=100),
        "planted_image_group_100": run(refl, expt, "image_group", group_size=100, stdcutoff=3.0,
                                       planted=True),
        "planted_image_group_100_std1": run(refl, expt, "image_group", group_size=100,
                                            stdcutoff=1.0, planted=True),
    }
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
