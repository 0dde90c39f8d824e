"""Reference numbers for tests/io/test_mtz.py, from DIALS 3.12 (not from jaxscale).

Runs `dials.export` on the lcys 4-sweep scaled files and on the single-sweep integrated
lcys_20 files, reads both MTZs with iotbx.mtz, and stores row counts, column labels and
types, per-column sums, sampled rows (every 97th), original indices of the sampled rows
and sampled batch headers (every 50th) in mtz_dials_export.json. Also stores iotbx's
original indices of small_fixtures/insulin_unmerged_cutted_from_ccp4.mtz.

Usage: /usr/bin/python3 tests/io/reference/make_mtz_reference.py [shared_data_dir]
"""
import json
import os
import subprocess
import sys
import tempfile

import iotbx.mtz

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "..", "..", "shared", "data")
CASES = {
    "lcys_scaled": ("lcys_4sweep_dials/reference_dials3.12_scale/scaled.refl",
                    "lcys_4sweep_dials/reference_dials3.12_scale/scaled.expt"),
    "lcys20_integrated": ("lcys_4sweep_dials/integrated/lcys_20_integrated.refl",
                          "lcys_4sweep_dials/integrated/lcys_20_integrated.expt"),
}
ROW_STEP, BATCH_STEP = 97, 50
BATCH_FIELDS = ["cell", "umat", "phistt", "phiend", "phirange", "so", "e1", "scanax", "source",
                "alambd", "dx", "detlm", "lbcell", "ncryst", "ldtype", "jsaxs", "ngonax", "ndet", "nbsetid"]


def f32(x):
    """A float32 value in 9 significant digits (exact for float32)."""
    return float("%.9g" % x)


def as_list(v):
    return [f32(x) for x in v] if hasattr(v, "__len__") else f32(v)


def summarise(mtz_path):
    m = iotbx.mtz.object(mtz_path)
    cols = {c.label(): c for c in m.columns()}
    out = {"nrows": m.n_reflections(), "labels": list(cols), "types": [c.type() for c in cols.values()],
           "space_group_symops": [o.as_xyz() for o in m.space_group().all_ops()],
           "crystals": [[c.name(), c.project_name(), list(c.unit_cell().parameters()),
                         [[d.name(), d.wavelength()] for d in c.datasets()]] for c in m.crystals()],
           "sums": {}, "rows": {}, "row_index": list(range(0, m.n_reflections(), ROW_STEP))}
    for label, c in cols.items():
        v = [f32(x) for x in c.extract_values()]
        out["sums"][label] = sum(v)
        out["rows"][label] = [v[i] for i in out["row_index"]]
    orig = list(m.extract_original_index_miller_indices())
    out["original_index"] = [list(orig[i]) for i in out["row_index"]]
    batches = m.batches()
    out["batch_numbers"] = [b.num() for b in batches]
    out["batch_index"] = list(range(0, len(batches), BATCH_STEP))
    out["batches"] = [{k: as_list(getattr(batches[i], k)()) for k in BATCH_FIELDS} for i in out["batch_index"]]
    return out


def main():
    ref = {"dials_version": subprocess.run(["dials.version"], capture_output=True, text=True).stdout.split("\n")[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (refl, expt) in CASES.items():
            hklout = os.path.join(tmp, name + ".mtz")
            subprocess.run(["dials.export", os.path.join(DATA, refl), os.path.join(DATA, expt), "format=mtz",
                            f"mtz.hklout={hklout}"], check=True, cwd=tmp, capture_output=True)
            ref[name] = summarise(hklout)
    m = iotbx.mtz.object(os.path.join(DATA, "small_fixtures/insulin_unmerged_cutted_from_ccp4.mtz"))
    ref["insulin_cutted_original_index"] = [list(h) for h in m.extract_original_index_miller_indices()]
    with open(os.path.join(HERE, "mtz_dials_export.json"), "w") as fh:
        json.dump(ref, fh, separators=(",", ":"))


if __name__ == "__main__":
    main()
