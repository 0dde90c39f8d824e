"""Run with DIALS' python: DIALS' own reading of a simulated .expt/.refl, as JSON on stdout.

For rotation data: d from DIALS' unit cell, s1 from DIALS' crystal/goniometer/beam at the
calculated angle, detector position from DIALS' panel, array index from DIALS' scan.
For stills: |s0 + A h| vs |s0| (excitation) with each still's own crystal model.
"""
import json
import sys

from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory
from scitbx import matrix

experiments = ExperimentListFactory.from_json_file(sys.argv[1], check_format=False)
table = flex.reflection_table.from_file(sys.argv[2])
out = {"n_experiments": len(experiments), "n_reflections": len(table), "identifiers": list(experiments.identifiers())}
ids = table["id"]
max_d = max_s1 = max_px = max_z = max_exc = 0.0
for i in range(0, len(table), max(1, len(table) // 400)):
    e = experiments[ids[i]]
    hkl = table["miller_index"][i]
    max_d = max(max_d, abs(e.crystal.get_unit_cell().d(hkl) - table["d"][i]))
    A = matrix.sqr(e.crystal.get_A())
    s0 = matrix.col(e.beam.get_s0())
    s1 = matrix.col(table["s1"][i])
    px = e.detector[0].get_ray_intersection_px(s1)
    cal = table["xyzcal.px"][i]
    max_px = max(max_px, abs(px[0] - cal[0]), abs(px[1] - cal[1]))
    if e.goniometer is not None and e.scan is not None:
        phi = table["xyzcal.mm"][i][2]
        r = (A * matrix.col(hkl)).rotate_around_origin(matrix.col(e.goniometer.get_rotation_axis()), phi)
        max_s1 = max(max_s1, (s0 + r - s1).length())
        max_z = max(max_z, abs(e.scan.get_array_index_from_angle(phi, deg=False) - cal[2]))
    else:
        max_exc = max(max_exc, abs((s0 + A * matrix.col(hkl)).length() - s0.length()))
out.update(max_d_diff=max_d, max_s1_diff=max_s1, max_px_diff=max_px, max_z_diff=max_z, max_excitation=max_exc)
print(json.dumps(out))
