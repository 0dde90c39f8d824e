"""Dump the columns of a DIALS scaled.refl/.expt that the merge tests need to an .npz.

Run with DIALS' python (flex only used for loading), so the merge tests can run before or
without jaxscale.io.refl:  /usr/bin/python3 dump_scaled_npz.py scaled.refl scaled.expt out.npz
"""
import json
import sys

import numpy as np


def main(refl, expt, out):
    from dials.array_family import flex  # noqa: F401  (loading only)

    t = flex.reflection_table.from_file(refl)
    cols = {}
    for name in ("miller_index", "id", "flags", "inverse_scale_factor", "intensity.scale.value",
                 "intensity.scale.variance", "d", "partiality", "xyzobs.px.value", "panel"):
        if name not in t:
            continue
        c = t[name]
        if name == "miller_index":
            a = np.array(c.as_vec3_double()).astype(np.int32)
        elif name == "xyzobs.px.value":
            a = np.array(c.as_double()).reshape(-1, 3)
        else:
            a = c.as_numpy_array()
        cols[name] = a
    e = json.load(open(expt))
    cells = []
    for c in e["crystal"]:
        A = np.array([c["real_space_a"], c["real_space_b"], c["real_space_c"]])
        G = A @ A.T
        a, b, cc = np.sqrt(np.diag(G))
        ang = np.degrees(np.arccos([G[1, 2] / (b * cc), G[0, 2] / (a * cc), G[0, 1] / (a * b)]))
        cells.append([a, b, cc, *ang])
    np.savez(out, cells=np.array(cells), hall=e["crystal"][0]["space_group_hall_symbol"],
             wavelength=e["beam"][0]["wavelength"],
             **{k.replace(".", "__"): v for k, v in cols.items()})


if __name__ == "__main__":
    main(*sys.argv[1:4])
