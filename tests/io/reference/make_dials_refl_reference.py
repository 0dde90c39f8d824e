"""Record what DIALS itself reads from every DIALS file in ../shared/data.

Run with DIALS' python: /usr/bin/python3 tests/io/reference/make_dials_refl_reference.py
Writes dials_refl_reference.json beside this script: for each .refl, the row count,
identifiers, column names and, per column, the values of three sample rows and the sum
of each numeric column as DIALS (flex) reports them; for each .expt, the count,
identifiers, space group and unit cell as dxtbx reports them.
"""
import glob
import json
import os

from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "..", "..", "shared", "data"))


def to_py(v):
    if isinstance(v, (tuple, list)):
        return [to_py(x) for x in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float, str)):
        return v
    return str(v)


out = {"refl": {}, "expt": {}}
for path in sorted(glob.glob(os.path.join(SHARED, "**", "*.refl"), recursive=True)):
    rel = os.path.relpath(path, SHARED)
    t = flex.reflection_table.from_file(path)
    n = t.size()
    rows = sorted({0, n // 2, n - 1})
    cols = {}
    for name in sorted(t.keys()):
        col = t[name]
        type_name = type(col).__name__
        if name == "shoebox":
            cols[name] = {"type": type_name, "rows": {str(r): to_py(col[r].bbox) for r in rows}}
            continue
        entry = {"type": type_name, "rows": {str(r): to_py(col[r]) for r in rows}}
        if type_name in ("double", "int", "size_t", "bool"):
            entry["sum"] = float(flex.sum(col.as_double())) if type_name != "bool" else int(col.count(True))
        cols[name] = entry
    out["refl"][rel] = {"nrows": n, "identifiers": {str(k): v for k, v in t.experiment_identifiers()}, "columns": cols}

for path in sorted(glob.glob(os.path.join(SHARED, "**", "*.expt"), recursive=True)
                   + glob.glob(os.path.join(SHARED, "**", "experiments.json"), recursive=True)):
    rel = os.path.relpath(path, SHARED)
    el = ExperimentListFactory.from_json_file(path, check_format=False)
    out["expt"][rel] = {
        "n": len(el),
        "identifiers": list(el.identifiers()),
        "space_group": [e.crystal.get_space_group().type().lookup_symbol() for e in el],
        "unit_cell": [list(e.crystal.get_unit_cell().parameters()) for e in el],
        "is_still": [e.scan is None or e.goniometer is None for e in el],
        "image_range": [list(e.scan.get_image_range()) if e.scan else None for e in el],
        "oscillation": [list(e.scan.get_oscillation()) if e.scan else None for e in el],
        "wavelength": [e.beam.get_wavelength() for e in el],
    }

with open(os.path.join(HERE, "dials_refl_reference.json"), "w") as fh:
    json.dump(out, fh, indent=1)
print("wrote", len(out["refl"]), "tables and", len(out["expt"]), "experiment lists")
