#!/bin/sh
# DIALS 3.12 reference for tests/test_scale_options.py (exclude_images over two lcys sweeps).
# Run from any scratch directory; the numbers go into scale_options.json by hand.
E=$(dirname "$0")/../../examples/lcys
dials.scale $E/lcys_20_integrated.refl $E/lcys_20_integrated.expt \
            $E/lcys_25_integrated.refl $E/lcys_25_integrated.expt \
            exclude_images=1:10:20 exclude_images=0:1700:1800 full_matrix=False
/usr/bin/python3 - <<'PY'
import json
from dials.array_family import flex
t = flex.reflection_table.from_file("scaled.refl")
d = json.load(open("scaled.expt"))
out = {"user_excluded": [int((t.get_flags(t.flags.user_excluded_in_scaling) & (t["id"] == k)).count(True)) for k in (0, 1)],
       "scaled": [int((t.get_flags(t.flags.scaled) & (t["id"] == k)).count(True)) for k in (0, 1)],
       "valid_image_ranges": [list(s["valid_image_ranges"].values())[0] for s in d["scan"]],
       "model_valid_image_range": [m["configuration_parameters"]["valid_image_range"] for m in d["scaling_model"]],
       "model_valid_osc_range": [m["configuration_parameters"]["valid_osc_range"] for m in d["scaling_model"]],
       "n_scale_parameters": [len(m["scale"]["parameters"]) for m in d["scaling_model"]],
       "error_model": d["scaling_model"][0]["configuration_parameters"]["error_model_parameters"]}
print(json.dumps(out))
PY
grep "outliers have been identified" dials.scale.log | head -2  # initial_outliers_per_dataset (one per sweep)

# target_cycle: scaled sweeps 20+25 (upstream dials.scale output) + unscaled sweep 30, full_matrix=False.
# Read off dials.scale.log: the chosen Imid, the outliers after round 2 and the summary's Total observations.
D=/work/shared/data/lcys_4sweep_dials
mkdir -p target_cycle && cd target_cycle && dials.scale $D/scaled_dials_data/scaled_20_25.refl \
  $D/scaled_dials_data/scaled_20_25.expt $D/integrated/lcys_30_integrated.refl $D/integrated/lcys_30_integrated.expt \
  full_matrix=False
grep -n "determined to be best\|outliers have been identified\|Total observations\|Parameters: a" dials.scale.log
# (only_target=True on the same input fails inside DIALS 3.12 with an IndexError in the absorption basis.)

# use_datasets + exclude_images: lcys 20 + 25 in one file (ids 0, 1, identifiers set), use_datasets=1
# exclude_images=1:100:200 -- the range names data set 1 by its id in the input, not its position after
# selection. (dials.combine_experiments of the old-format files sets no identifiers: set them by hand.)
cd .. && mkdir -p use_datasets && cd use_datasets
dials.combine_experiments $E/lcys_20_integrated.refl $E/lcys_20_integrated.expt \
                          $E/lcys_25_integrated.refl $E/lcys_25_integrated.expt
/usr/bin/python3 - <<'PY'
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory
exps = ExperimentListFactory.from_json_file("combined.expt", check_format=False)
t = flex.reflection_table.from_file("combined.refl")
for i in (0, 1):
    exps[i].identifier = "00000000-0000-0000-0000-00000000000%d" % (i + 1)
    t.experiment_identifiers()[i] = exps[i].identifier
exps.as_file("ids.expt"); t.as_file("ids.refl")
PY
dials.scale ids.refl ids.expt use_datasets=1 exclude_images=1:100:200 full_matrix=False
/usr/bin/python3 - <<'PY'
import json
from dials.array_family import flex
t = flex.reflection_table.from_file("scaled.refl")
d = json.load(open("scaled.expt"))
print(json.dumps({"ids": sorted(set(t["id"])), "user_excluded": int(t.get_flags(t.flags.user_excluded_in_scaling).count(True)),
                  "scaled": int(t.get_flags(t.flags.scaled).count(True)), "n_rows": len(t),
                  "valid_image_ranges": [list(s["valid_image_ranges"].values())[0] for s in d["scan"]],
                  "model_valid_image_range": [m["configuration_parameters"]["valid_image_range"] for m in d["scaling_model"]],
                  "n_scale_parameters": [len(m["scale"]["parameters"]) for m in d["scaling_model"]],
                  "error_model": d["scaling_model"][0]["configuration_parameters"]["error_model_parameters"]}))
PY
grep "Total observations" dials.scale.log
