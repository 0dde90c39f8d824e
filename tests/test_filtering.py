"""ΔCC½ scale-and-filter cycles (`filtering.method=deltacchalf`) with planted truth: one
simulated crystal measured in several sweeps, one sweep (or one end of a sweep) with its
intensities scrambled; the filter must remove exactly that and nothing else."""
from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from jaxscale.data import flags as F

INTENSITY_COLUMNS = ("intensity.sum.value", "intensity.sum.variance", "intensity.prf.value",
                     "intensity.prf.variance")


def _sweep(j: int, n_images: int, n_obs: int = 1500):
    """Sweep j of one simulated crystal (same orientation and intensities: same seed),
    starting at 30 j degrees, with its own identifier."""
    from jaxscale.sim.rotation import simulate_rotation_sweep

    table, experiments, _ = simulate_rotation_sweep(
        n_obs, cell=(20, 25, 30, 90, 90, 90), osc_start=30.0 * j, n_images=n_images, osc_width=0.5, seed=0,
        d_min=1.5, outlier_fraction=0.0)
    ident = str(uuid.UUID(int=j + 1))
    table.identifiers = {0: ident}
    return table, dataclasses.replace(experiments[0], identifier=ident)


def _scramble(table, rows: np.ndarray, seed: int = 5) -> None:
    """Permute the intensities (and their variances) among `rows`: no signal left there."""
    perm = np.random.default_rng(seed).permutation(rows)
    for col in INTENSITY_COLUMNS:
        values = np.asarray(table[col]).copy()
        values[rows] = values[perm]
        table[col] = values


def _write(tmp_path: Path, sweeps) -> list[str]:
    from jaxscale.io.expt import ExperimentList, write_expt
    from jaxscale.io.refl import write_refl

    paths = []
    for j, (table, expt) in enumerate(sweeps):
        write_refl(table, tmp_path / f"s{j}.refl")
        write_expt(ExperimentList([expt]), tmp_path / f"s{j}.expt")
        paths += [str(tmp_path / f"s{j}.refl"), str(tmp_path / f"s{j}.expt")]
    return paths


def _params(out: Path, *overrides):
    from jaxscale.params import ScaleParams, apply_overrides

    return apply_overrides(ScaleParams(), [
        ("output.reflections", str(out / "scaled.refl")), ("output.experiments", str(out / "scaled.expt")),
        ("output.html", "None"), ("output.log", str(out / "scale.log")), ("model", "KB"),
        ("scaling_options.full_matrix", "False"), ("filtering.method", "deltacchalf"),
        ("filtering.output.scale_and_filter_results", str(out / "sf.json")), *overrides])


def test_dataset_mode_removes_the_scrambled_sweep(tmp_path):
    from jaxscale.io.refl import read_refl
    from jaxscale.scale import run

    sweeps = [_sweep(j, 60) for j in range(6)]
    bad = sweeps[2][1].identifier
    _scramble(sweeps[2][0], np.arange(len(sweeps[2][0])))
    out = tmp_path / "out"
    res = run(_params(out, ("filtering.deltacchalf.stdcutoff", "2.0"),
                      ("filtering.deltacchalf.max_percent_removed", "30"), ("output.html", str(out / "sf.html"))),
              _write(tmp_path, sweeps))
    kept = [e.identifier for e in res.experiments]
    assert kept == [e.identifier for _, e in sweeps if e.identifier != bad]
    doc = json.loads((out / "sf.json").read_text())
    assert doc == res.filtering
    assert doc["termination_reason"] == "no_more_removed"
    cycles = doc["cycle_results"]
    assert cycles["1"]["removed_ids"] == [2] and cycles["1"]["removed_datasets"] == [bad]
    assert cycles["1"]["n_removed"] > 0 and cycles["2"]["n_removed"] == 0 and cycles["2"]["removed_ids"] == []
    assert cycles["1"]["delta_cc_half_values"][0] < -0.3  # the scrambled sweep, far below the others
    assert abs(cycles["1"]["cumul_percent_removed"] - 100.0 * cycles["1"]["n_removed"] / doc["initial_n_reflections"]) < 1e-9
    assert cycles["2"]["mean_cc_half"] > cycles["1"]["mean_cc_half"] + 0.3
    assert [e[0] for e in doc["expids_and_image_ranges"]] == kept
    table = read_refl(out / "scaled.refl")
    assert sorted(table.identifiers.values()) == sorted(kept)
    assert "Removing data set 2" in (out / "scale.log").read_text()
    # the HTML report's ΔCC½ section: one table row per cycle, CC½ per cycle, ΔCC½ per group
    page = (out / "sf.html").read_text()
    section = page[page.index("<h2>ΔCC½ filtering</h2>"):]
    table = section[:section.index("</table>")]
    assert (f"<tr><td>1</td><td>{cycles['1']['mean_cc_half']:.5f}</td><td>{cycles['1']['n_removed']}</td>"
            f"<td>{cycles['1']['cumul_percent_removed']:.3f}</td><td>data set 2</td></tr>") in table
    assert table.count("<tr><td>") == len(cycles) and "Termination reason: no_more_removed" in section
    for title in ("CC½ per cycle", "ΔCC½ per group (cycle 1)", "ΔCC½ per group (cycle 2)"):
        assert json.dumps(title)[1:-1] in section  # plot titles are \u-escaped in plotly's JSON
    assert '"x":["data set 0","data set 1","data set 2","data set 3","data set 4","data set 5"]' in section
    assert '"x":["data set 0","data set 1","data set 2","data set 3","data set 4"]' in section  # cycle 2: 5 left
    from jaxscale.filtering import report_section

    assert report_section(doc, [])["cc_half"] == [c["mean_cc_half"] for c in cycles.values()]


def test_image_group_mode_removes_the_scrambled_end(tmp_path):
    """Images 102-120 of a 120-image sweep scrambled. The analysed rows (full, scaled) start
    at image 2, so the groups are 2-11, ..., 92-101 and 102-119 (short tail merged): the
    last group goes, the untested image 120 with it; the valid range becomes 1-101, the rows
    beyond are user-excluded."""
    from jaxscale.io.refl import read_refl
    from jaxscale.scale import run

    table, expt = _sweep(0, 120, n_obs=3000)
    image = np.floor(np.asarray(table["xyzobs.px.value"])[:, 2]).astype(int) + 1
    _scramble(table, np.flatnonzero(image >= 102))
    out = tmp_path / "out"
    res = run(_params(out, ("filtering.deltacchalf.mode", "image_group"), ("filtering.deltacchalf.group_size", "10"),
                      ("filtering.deltacchalf.stdcutoff", "2.5"), ("filtering.deltacchalf.max_percent_removed", "40")),
              _write(tmp_path, [(table, expt)]))
    doc = res.filtering
    assert doc["termination_reason"] == "no_more_removed"
    removed = [r for c in doc["cycle_results"].values() for r in c.get("image_ranges_removed", [])]
    assert removed == [[[102, 119], 0]]
    assert doc["expids_and_image_ranges"] == [[expt.identifier, [[1, 101]]]]
    assert doc["initial_expids_and_image_ranges"] == [[expt.identifier, [1, 120]]]
    scaled = read_refl(out / "scaled.refl")
    flags = np.asarray(scaled["flags"])
    beyond = np.asarray(scaled["xyzobs.px.value"])[:, 2] > 101.0
    assert beyond.any() and np.all(F.has_any(flags[beyond], F.USER_EXCLUDED_IN_SCALING))
    assert not np.any(F.has_any(flags[beyond], F.SCALED))
    assert np.all(F.has_any(flags[~beyond], F.SCALED) | F.has_any(flags[~beyond], F.BAD_FOR_SCALING))
    model = json.loads((out / "scaled.expt").read_text())["scaling_model"][0]
    # DIALS' KB limit_image_range does nothing: the KB model keeps the scan's range
    assert model["configuration_parameters"]["valid_image_range"] == [1, 120]


def test_dataset_mode_needs_several_datasets(tmp_path):
    from jaxscale.exceptions import ParameterError
    from jaxscale.scale import run

    with pytest.raises(ParameterError, match="image_group"):
        run(_params(tmp_path), _write(tmp_path, [_sweep(0, 60)]))
