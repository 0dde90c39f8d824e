"""Reference merging statistics from DIALS 3.12 itself, for tests/merge/test_statistics.py.

Runs dials.scale's own code path on a scaled.refl/.expt pair (split per experiment as
dials.scale holds them): scaled_data_as_miller_array -> merging_stats_from_scaled_array
(non-anomalous + anomalous iotbx dataset_statistics, 20 bins, use_internal_variance=False)
and writes every per-bin and overall number at full precision to JSON.

    /usr/bin/python3 make_reference_stats.py scaled.refl scaled.expt out.json
"""
import json
import sys

from dials.algorithms.scaling.scaling_library import (
    merging_stats_from_scaled_array,
    scaled_data_as_miller_array,
)
from dials.array_family import flex
from dials.util.resolution_analysis import resolution_cc_half
from dxtbx.model.experiment_list import ExperimentListFactory

FIELDS = ["d_max", "d_min", "n_obs", "n_uniq", "mean_redundancy", "completeness", "i_mean",
          "sigi_mean", "i_over_sigma_mean", "r_merge", "r_meas", "r_pim", "r_anom", "cc_one_half",
          "cc_one_half_n_refl", "cc_one_half_significance", "cc_one_half_critical_value",
          "cc_one_half_sigma_tau", "cc_star", "cc_anom", "cc_anom_significance",
          "cc_anom_critical_value", "anom_completeness", "anom_signal",
          "delta_i_mean_over_sig_delta_i_mean"]


def shell(s):
    out = {f: getattr(s, f, None) for f in FIELDS}
    p = s.anom_probability_plot_expected_delta
    out["anom_slope"] = None if p is None else p.slope
    out["anom_intercept"] = None if p is None else p.intercept
    out["anom_slope_n"] = None if p is None else p.n_pairs
    return {k: (bool(v) if isinstance(v, bool) else v) for k, v in out.items()}


def main(refl, expt, out):
    experiments = ExperimentListFactory.from_json_file(expt, check_format=False)
    table = flex.reflection_table.from_file(refl)
    tables = [table.select(table["id"] == i) for i in range(len(experiments))]
    arr = scaled_data_as_miller_array(tables, experiments, anomalous_flag=False)
    stats, anom = merging_stats_from_scaled_array(arr, 20, False)
    try:
        d_fit = resolution_cc_half(stats, limit=0.3).d_min
    except RuntimeError:
        d_fit = None
    doc = {
        "source": {"refl": refl, "expt": expt},
        "n_obs_array": arr.size(),
        "bins": [shell(b) for b in stats.bins],
        "overall": shell(stats.overall),
        "anomalous_bins": [shell(b) for b in anom.bins] if anom else None,
        "anomalous_overall": shell(anom.overall) if anom else None,
        "d_min_cc_half_fit": d_fit,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
