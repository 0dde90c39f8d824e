#!/usr/bin/python3
"""Reference numbers for tests/test_models_vs_dials.py, made by DIALS 3.12 alone.

Run with the system python that has DIALS (not the jaxscale venv):

    /usr/bin/python3 tests/reference/make_models_vs_dials.py [--reuse NAME=DIALS_RUN_DIR ...]

For each case it runs `dials.scale <inputs> <options>` in a temporary directory (or reads an
existing run given by --reuse, e.g. one kept by scripts/compare_dials.py --keep) and stores,
in models_vs_dials.json next to this script:
  * rows: every k-th reflection that DIALS scaled (<= 300 per case), keyed as
    scripts/compare_dials.py keys them (id, h, k, l, round(100 * xyzobs.px)), with DIALS'
    inverse_scale_factor;
  * n_outliers / n_scaled: counts of outlier_in_scaling and scaled flags in scaled.refl;
  * error_model: (a, b) of the first experiment's scaling model;
  * summary: the overall column of the log's "Summary of merging statistics" (printed
    precision: CC1/2 and R-factors 3 decimals, I/sigma 1 decimal).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from dials.array_family import flex

DATA = Path("/work/shared/data")
LCYS = DATA / "lcys_4sweep_dials" / "integrated"
QUARTZ = [str(DATA / "quartz_3ded_dials" / f"integrated.{e}") for e in ("refl", "expt")]
LCYS20 = [str(LCYS / f"lcys_20_integrated.{e}") for e in ("refl", "expt")]
CUNIR = [str(DATA / "cunir_ssx_stills_dials" / f"integrated.{e}") for e in ("refl", "expt")]

# name -> (inputs relative to the shared data folder, dials.scale options)
CASES = {
    "kb_cunir": (CUNIR, ["model=KB"]),
    "consecutive_quartz": (QUARTZ, ["refinement_order=consecutive"]),
    "levmar_quartz": (QUARTZ, ["scaling_refinery.engine=LevMar"]),
    "gaussnewton_quartz": (QUARTZ, ["scaling_refinery.engine=GaussNewton"]),
    "no_full_matrix_lcys20": (LCYS20, ["full_matrix=False"]),
    "array_lcys20": (LCYS20, ["model=array"]),
    "dose_decay_quartz": (QUARTZ, ["model=dose_decay", "output.html=None"]),  # the html step fails in 3.12
}
MAX_ROWS = 300
SUMMARY_ROWS = {"I/sigma": "i_over_sigma", "Rmerge(I)": "r_merge", "Rpim(I)": "r_pim", "CC half": "cc_half",
                "Total observations": "n_obs", "Total unique": "n_unique"}


def summary(log: str) -> dict:
    """Overall column of the last "Summary of merging statistics" table."""
    block = log[log.rindex("Summary of merging statistics"):]
    lines = block.splitlines()
    header = next(line for line in lines if "Overall" in line)
    column = header.split().index("Overall")
    out = {}
    for line in lines:
        for label, key in SUMMARY_ROWS.items():
            if line.startswith(label + " ") and key not in out:
                values = line[len(label):].split()
                out[key] = float(values[column].rstrip("*"))
    return out


def reference(run_dir: Path, inputs: list[str], options: list[str]) -> dict:
    table = flex.reflection_table.from_file(str(run_dir / "scaled.refl"))
    flags = table.get_flags(table.flags.scaled)
    outlier = table.get_flags(table.flags.outlier_in_scaling)
    scaled = np.flatnonzero(np.asarray(flags))
    step = max(1, -(-scaled.size // MAX_ROWS))
    pick = scaled[::step]
    hkl = np.asarray(table["miller_index"].as_vec3_double()).astype(np.int64)[pick]
    xyz = np.round(np.asarray(table["xyzobs.px.value"]) * 100).astype(np.int64)[pick]
    ids = np.asarray(table["id"]).astype(np.int64)[pick]
    g = np.asarray(table["inverse_scale_factor"])[pick]
    expt = json.loads((run_dir / "scaled.expt").read_text())
    em = expt["scaling_model"][0].get("configuration_parameters", {}).get("error_model_parameters")
    log = (run_dir / "dials.scale.log").read_text()
    version = re.search(r"^DIALS (\S+)", log, re.M)
    return {
        "inputs": [str(Path(p).relative_to(DATA)) for p in inputs],
        "options": options,
        "dials_version": version.group(1) if version else None,
        "keys": np.column_stack([ids, hkl, xyz]).tolist(),
        "g": [float(v) for v in g],
        "n_scaled": int(np.count_nonzero(np.asarray(flags))),
        "n_outliers": int(np.count_nonzero(np.asarray(outlier))),
        "error_model": em,
        "summary": summary(log),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", action="append", default=[], help="NAME=DIR: an existing dials.scale run of a case")
    ap.add_argument("--only", nargs="*", help="cases to (re)make; the others keep their stored numbers")
    ns = ap.parse_args()
    reuse = dict(item.split("=", 1) for item in ns.reuse)
    out_path = Path(__file__).resolve().parent / "models_vs_dials.json"
    stored = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name, (inputs, options) in CASES.items():
        if ns.only and name not in ns.only:
            continue
        if name in reuse:
            run_dir = Path(reuse[name])
        else:
            run_dir = Path(tempfile.mkdtemp(prefix=f"dials_{name}_"))
            subprocess.run(["dials.scale", *inputs, *options], cwd=run_dir, check=True, capture_output=True)
        stored[name] = reference(run_dir, inputs, options)
        print(name, stored[name]["summary"], stored[name]["error_model"], file=sys.stderr)
    out_path.write_text(json.dumps(stored, indent=None, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
