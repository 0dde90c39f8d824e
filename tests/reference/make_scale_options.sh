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

# target_cycle: scaled sweeps 20+25 (upstream dials.scale output) + unscaled sweep 30, full_matrix=False.
# Read off dials.scale.log: the chosen Imid, the outliers after round 2 and the summary's Total observations.
D=/work/shared/data/lcys_4sweep_dials
mkdir -p target_cycle && cd target_cycle && dials.scale $D/scaled_dials_data/scaled_20_25.refl \
  $D/scaled_dials_data/scaled_20_25.expt $D/integrated/lcys_30_integrated.refl $D/integrated/lcys_30_integrated.expt \
  full_matrix=False
grep -n "determined to be best\|outliers have been identified\|Total observations\|Parameters: a" dials.scale.log
# (only_target=True on the same input fails inside DIALS 3.12 with an IndexError in the absorption basis.)
