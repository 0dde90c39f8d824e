"""Free set (`scaling_options.use_free_set`) and cross-validation (`cross_validation.*`) on
one l-cysteine sweep (full_matrix=False to keep it short)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import gemmi
import numpy as np

from jaxscale.data import flags as F

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lcys"
SWEEP = [str(EXAMPLE / "lcys_20_integrated.refl"), str(EXAMPLE / "lcys_20_integrated.expt")]


def _params(out: Path, *overrides):
    from jaxscale.params import ScaleParams, apply_overrides

    return apply_overrides(ScaleParams(), [
        ("output.reflections", str(out / "scaled.refl")), ("output.experiments", str(out / "scaled.expt")),
        ("output.html", "None"), ("output.log", str(out / "scale.log")),
        ("scaling_options.full_matrix", "False"), *overrides])


def _asu(miller: np.ndarray, sg: gemmi.SpaceGroup) -> np.ndarray:
    """Non-anomalous ASU index of each row, by gemmi one at a time (independent of ours)."""
    asu = gemmi.ReciprocalAsu(sg)
    ops = sg.operations()
    return np.array([asu.to_asu(tuple(int(x) for x in h), ops)[0] for h in miller])  # small table


def test_cross_validation_multi_bool(tmp_path):
    from jaxscale.scale import run

    out = tmp_path / "cv"
    res = run(_params(out, ("cross_validation.cross_validation_mode", "multi"),
                      ("cross_validation.parameter", "physical.absorption_correction"),
                      ("cross_validation.nfolds", "2"), ("output.html", str(out / "cv.html"))), SWEEP)
    cv = res.cross_validation
    assert cv.configurations == ["physical.absorption_correction=True", "physical.absorption_correction=False"]
    assert all(len(v["free_rmeas"]) == 2 for v in cv.values)
    for v in cv.values:  # the gaps are the differences of the folds' values
        np.testing.assert_allclose(v["rmeas_gap"], np.subtract(v["free_rmeas"], v["work_rmeas"]))
        np.testing.assert_allclose(v["cc_half_gap"], np.subtract(v["work_cc_half"], v["free_cc_half"]))
        assert all(0 < r < 0.2 for r in v["work_rmeas"] + v["free_rmeas"])
        assert all(0.9 < c <= 1 for c in v["work_cc_half"] + v["free_cc_half"])
    # the two folds leave different groups out
    assert cv.values[0]["free_rmeas"][0] != cv.values[0]["free_rmeas"][1]
    lines = cv.table.splitlines()
    assert lines[1].split("|")[3].strip() == "work Rmeas" and len(lines) == 3 + 4 + 1
    assert sum(line.count("*") for line in lines) == 4
    mean_rows = [line for line in lines if "| mean" in line]
    free_rmeas = [float(r.split("|")[4].strip().rstrip("*")) for r in mean_rows]
    best = int(np.argmin(free_rmeas))
    assert mean_rows[best].split("|")[4].strip().endswith("*")
    assert free_rmeas[0] == round(float(np.mean(cv.values[0]["free_rmeas"])), 5)
    # no scaled data written, only the log with the table and the HTML report with its section
    assert not (out / "scaled.refl").exists() and "Summary of the cross validation" in (out / "scale.log").read_text()
    page = (out / "cv.html").read_text()
    section = page[page.index("<h2>Cross-validation (work/free)</h2>"):]
    table = section[:section.index("</table>")]
    assert table.count("<td>mean</td>") == 2 and table.count("<td>std dev</td>") == 2 and table.count("*") == 4
    assert f"<td>{free_rmeas[best]:.5f}*</td>" in table and "physical.absorption_correction=False" in table
    for title in ("Work and free Rmeas per configuration", "Work and free CC½ per configuration"):
        assert json.dumps(title)[1:-1] in section  # plot titles are \u-escaped in plotly's JSON


def test_free_set_left_out_of_minimisation(tmp_path):
    """use_free_set with offset 3: every 10th group of the sorted ASU indices from the 4th
    (computed here with gemmi) is the free set; minimisation sees none of it; work/free
    statistics are reported."""
    from jaxscale.data.prepare import prepare_dataset
    from jaxscale.io.expt import read_expt
    from jaxscale.io.refl import read_refl
    from jaxscale.scale import run

    out = tmp_path / "free"
    res = run(_params(out, ("scaling_options.use_free_set", "True"), ("scaling_options.free_set_offset", "3"),
                      ("reflection_selection.method", "use_all"), ("output.html", str(out / "free.html"))), SWEEP)
    wf = res.work_free
    assert set(wf) == {"work_rmeas", "free_rmeas", "rmeas_gap", "work_cc_half", "free_cc_half", "cc_half_gap"}
    page = (out / "free.html").read_text()
    section = page[page.index("<h2>Cross-validation (work/free)</h2>"):]
    assert (f"<td>this run</td><td>mean</td><td>{wf['work_rmeas']:.5f}</td><td>{wf['free_rmeas']:.5f}</td>"
            in section)
    assert wf["free_rmeas"] > 0 and wf["work_cc_half"] > 0.99
    text = "\n".join(res.log)
    n_free_groups, n_groups, n_free_refl = map(int, re.search(
        r"Free set: (\d+) of (\d+) groups \((\d+) reflections\)", text).groups())
    expt = read_expt(SWEEP[1])[0]
    prep = prepare_dataset(read_refl(SWEEP[0]), best_cell=expt.unit_cell)
    flags = np.asarray(prep.table["flags"])
    suitable = prep.table.select(np.flatnonzero(~F.has_any(flags, F.USER_EXCLUDED_IN_SCALING | F.EXCLUDED_FOR_SCALING)))
    miller = np.asarray(suitable["miller_index"])
    asu = _asu(miller, expt.space_group)
    unique = np.unique(asu, axis=0)  # (h, k, l) lexicographic = cctbx packed order
    assert n_groups == len(unique)
    free = unique[3::10]
    assert n_free_groups == len(free)
    assert n_free_refl == int((asu[:, None, :] == free[None, :, :]).all(axis=2).any(axis=1).sum())
    # the minimisation rounds (use_all) saw all suitable non-free, non-outlier reflections only
    n_min = [int(m) for m in re.findall(r"Round \d: (\d+) reflections", text)]
    assert n_min and max(n_min) <= len(suitable) - n_free_refl
