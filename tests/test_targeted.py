"""Targeted scaling with planted truth: data scaled against a fixed I_h, from a merged MTZ
made from the simulation's true intensities, from a model's |F_calc|^2, or from already
scaled data sets (target_cycle / only_target). With I_h fixed the overall scale is
determined, so the fitted inverse scales equal the planted ones (no degeneracy removal)."""
from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import gemmi
import numpy as np

from jaxscale.data import flags as F


def _sweep(j: int, scale: float, B: float, n_obs: int = 1500):
    """Sweep j of one simulated crystal with a constant planted KB scale and B (no absorption)."""
    from jaxscale.sim.rotation import simulate_rotation_sweep

    table, experiments, truth = simulate_rotation_sweep(
        n_obs, cell=(20, 25, 30, 90, 90, 90), osc_start=30.0 * j, n_images=60, osc_width=0.5, seed=0,
        d_min=1.5, outlier_fraction=0.0, absorption_strength=0.0, mean_intensity=1e5,
        scale_profile=lambda t: np.full_like(t, scale), B_profile=lambda t: np.full_like(t, B))
    ident = str(uuid.UUID(int=j + 1))
    table.identifiers = {0: ident}
    return table, dataclasses.replace(experiments[0], identifier=ident), truth


def _write(where: Path, name: str, table, expt) -> list[str]:
    from jaxscale.io.expt import ExperimentList, write_expt
    from jaxscale.io.refl import write_refl

    where.mkdir(parents=True, exist_ok=True)
    write_refl(table, where / f"{name}.refl")
    write_expt(ExperimentList([expt]), where / f"{name}.expt")
    return [str(where / f"{name}.refl"), str(where / f"{name}.expt")]


def _params(out: Path, *overrides):
    from jaxscale.params import ScaleParams, apply_overrides

    return apply_overrides(ScaleParams(), [
        ("output.reflections", str(out / "scaled.refl")), ("output.experiments", str(out / "scaled.expt")),
        ("output.html", "None"), ("output.log", "None"), ("model", "KB"), *overrides])


def _fitted_vs_planted(out: Path, truth_by_identifier: dict) -> np.ndarray:
    """fitted g / planted g of every scaled row of the output, matched by miller index + z."""
    from jaxscale.io.refl import read_refl

    table = read_refl(out / "scaled.refl")
    ratios = []
    for k, ident in table.identifiers.items():  # loop over data sets
        planted_table, truth = truth_by_identifier[ident]
        rows = np.flatnonzero((np.asarray(table["id"]) == k)
                              & F.has_any(np.asarray(table["flags"]), F.SCALED))
        key = lambda t: np.round(np.asarray(t["xyzobs.px.value"])[:, 2], 6) + 1e3 * np.asarray(  # noqa: E731
            t["miller_index"]) @ np.array([1e6, 1e3, 1.0])
        planted_key = key(planted_table)
        order = np.argsort(planted_key)
        pos = order[np.searchsorted(planted_key[order], key(table)[rows])]
        assert np.all(planted_key[pos] == key(table)[rows])
        ratios.append(np.asarray(table["inverse_scale_factor"])[rows] / truth["inverse_scale"][pos])
    return np.concatenate(ratios)


def test_reference_mtz_recovers_planted_scales(tmp_path):
    from jaxscale.io.mtz import write_merged_mtz
    from jaxscale.scale import run

    table, expt, truth = _sweep(0, scale=0.6, B=-3.0)
    ref = tmp_path / "reference.mtz"
    i_mean = truth["i_mean"]
    write_merged_mtz(ref, cell=expt.unit_cell, space_group=expt.space_group, wavelength=expt.wavelength,
                     miller=truth["asu_hkl"], columns={"IMEAN": ("J", i_mean), "SIGIMEAN": ("Q", 0.01 * i_mean + 1)})
    out = tmp_path / "out"
    res = run(_params(out, ("scaling_options.reference", str(ref))), _write(tmp_path, "s0", table, expt))
    assert any("Targeted round" in line for line in res.log)
    assert not any("Round 1" in line for line in res.log)  # the targeted algorithm only
    ratio = _fitted_vs_planted(out, {expt.identifier: (table, truth)})
    assert ratio.size > 1000
    np.testing.assert_allclose(ratio, 1.0, atol=0.01)
    model = json.loads((out / "scaled.expt").read_text())["scaling_model"][0]
    assert abs(model["scale"]["parameters"][0] - 0.6) < 0.006 and abs(model["decay"]["parameters"][0] + 3.0) < 0.1
    assert "est_standard_devs" in model["scale"]  # full-matrix round with covariance


def test_target_mtz_alias_and_target_model(tmp_path):
    """target_model: |F_calc|^2 of a small structure; the data are made from the same
    model, so scaling against it recovers the planted scales; the calculated intensities
    agree with gemmi's direct structure-factor sum."""
    from jaxscale.scale import run
    from jaxscale.targeted import reference_from_model

    table, expt, truth = _sweep(0, scale=1.7, B=0.0)
    st = gemmi.Structure()
    st.cell = expt.unit_cell
    st.spacegroup_hm = expt.space_group.hm
    model, chain, res = gemmi.Model("1"), gemmi.Chain("A"), gemmi.Residue()
    res.name, res.seqid = "LIG", gemmi.SeqId(1, " ")
    rng = np.random.default_rng(3)
    for i, el in enumerate(["S", "O", "N", "C", "C", "C", "O", "N"]):
        atom = gemmi.Atom()
        atom.name, atom.element, atom.occ, atom.b_iso = f"{el}{i}", gemmi.Element(el), 1.0, 8.0
        atom.pos = gemmi.Position(*(rng.uniform(0.1, 0.9, 3) * np.array(expt.unit_cell.parameters[:3])))
        res.add_atom(atom)
    chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    path = tmp_path / "model.pdb"
    st.write_pdb(str(path))

    ref = reference_from_model(str(path), np.zeros((0, 3)), 1.5)
    st = gemmi.read_structure(str(path))  # symmetry images set up as for the reader
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    direct = np.array([abs(calc.calculate_sf_from_model(st[0], [int(h) for h in hkl])) ** 2 for hkl in ref.miller[:50]])
    np.testing.assert_allclose(ref.intensity[:50], direct, rtol=2e-3, atol=1e-3 * direct.mean())

    # data from the model: I_true -> |F_calc|^2 at each observation's ASU index
    from jaxscale.data.symmetry import map_to_asu
    from jaxscale.targeted import reference_per_group

    asu, _ = map_to_asu(np.asarray(table["miller_index"]), expt.space_group)
    ih, _ = reference_per_group(ref, asu, expt.space_group, anomalous=False)
    factor = ih / truth["i_true"]
    keep = np.isfinite(factor) & (ih > 0.05 * np.nanmedian(ih))
    table = table.select(np.flatnonzero(keep))
    factor = factor[keep]
    truth = {k: (v[keep] if np.shape(v)[:1] == (keep.size,) else v) for k, v in truth.items()}
    for col in ("intensity.sum.value", "intensity.prf.value"):
        table[col] = np.asarray(table[col]) * factor
    for col in ("intensity.sum.variance", "intensity.prf.variance"):
        table[col] = np.asarray(table[col]) * factor ** 2
    out = tmp_path / "out"
    run(_params(out, ("scaling_options.target_model", str(path)), ("cut_data.d_min", "1.5")),
        _write(tmp_path, "s0", table, expt))
    ratio = _fitted_vs_planted(out, {expt.identifier: (table, truth)})
    np.testing.assert_allclose(np.median(ratio), 1.0, atol=0.01)
    assert np.percentile(np.abs(ratio - 1.0), 90) < 0.01


def test_target_cycle_only_target(tmp_path):
    """Sweep 0 scaled alone (KB, anchored: g = 1, so its I_h = planted g0 I_true); sweep 1
    (planted g1) scaled against it with only_target: fitted g1 = g1 / g0 planted; only the
    new sweep is written; without only_target the joint round follows."""
    from jaxscale.io.refl import read_refl
    from jaxscale.scale import run

    t0, e0, truth0 = _sweep(0, scale=1.0, B=0.0)
    t1, e1, truth1 = _sweep(1, scale=0.5, B=-2.0)
    first = tmp_path / "first"
    run(_params(first), _write(tmp_path, "s0", t0, e0))
    inputs = [str(first / "scaled.refl"), str(first / "scaled.expt"), *_write(tmp_path, "s1", t1, e1)]
    out = tmp_path / "only"
    res = run(_params(out, ("scaling_options.only_target", "True")), inputs)
    assert [e.identifier for e in res.experiments] == [e1.identifier]
    assert any("Targeted scaling of data sets [1]" in line for line in res.log)
    assert not any(line.startswith("\nRound 1") for line in res.log)
    ratio = _fitted_vs_planted(out, {e1.identifier: (t1, truth1)})
    np.testing.assert_allclose(ratio, 1.0, atol=0.01)

    joint = tmp_path / "joint"
    res = run(_params(joint, ("scaling_options.full_matrix", "False")), inputs)
    assert [e.identifier for e in res.experiments] == [e0.identifier, e1.identifier]
    text = "\n".join(res.log)
    assert text.index("Targeted round") < text.index("Round 1")
    assert len(read_refl(joint / "scaled.refl").identifiers) == 2


def test_target_cycle_lcys_against_dials(shared_data, tmp_path):
    """Scaled sweeps 20+25 (DIALS output, Imid = summation stored) + unscaled sweep 30:
    targeted round, then the joint algorithm, as DIALS 3.12 (tests/reference/scale_options.json)."""
    from jaxscale.params import ScaleParams, apply_overrides
    from jaxscale.scale import run

    ref = json.loads((Path(__file__).parent / "reference" / "scale_options.json").read_text())[
        "target_cycle_20_25_plus_30"]
    d = shared_data / "lcys_4sweep_dials"
    params = apply_overrides(ScaleParams(), [
        ("output.reflections", str(tmp_path / "scaled.refl")), ("output.experiments", str(tmp_path / "scaled.expt")),
        ("output.html", "None"), ("output.log", "None"), ("scaling_options.full_matrix", "False")])
    res = run(params, [str(d / "scaled_dials_data" / "scaled_20_25.refl"), str(d / "scaled_dials_data" / "scaled_20_25.expt"),
                       str(d / "integrated" / "lcys_30_integrated.refl"), str(d / "integrated" / "lcys_30_integrated.expt")])
    text = "\n".join(res.log)
    assert text.index("Targeted scaling of data sets [2]") < text.index("Round 1")
    assert text.count("previously determined intensity choice (Imid = 1)") == 2
    assert f"Combined intensities chosen: Imid = {ref['imid']:.2f}" in text
    import re

    assert abs(int(re.search(r"(\d+) outliers found \(after round 2\)", text).group(1)) - ref["outliers_after_round_2"]) <= 5
    # the joint error model starts from the unscaled data set's (1, 0.02) as DIALS' multi-scaler
    # after a target cycle: the two-parameter fit fails after round 2 and a is fixed at 1
    a2, b2 = map(float, re.search(r"Error model \(after round 2\): a = ([\d.]+), b = ([\d.]+)", text).groups())
    assert a2 == ref["error_model_round_2"][0] and abs(b2 / ref["error_model_round_2"][1] - 1) < 0.05
    a, b = res.error_model
    assert abs(a / ref["error_model_final"][0] - 1) < 0.03 and abs(b / ref["error_model_final"][1] - 1) < 0.05
    assert abs(int(re.search(r"(\d+) outliers found \(final\)", text).group(1)) - ref["outliers_final"]) <= 5
    st = res.statistics.overall
    assert abs(int(st.n_obs[0]) - ref["n_obs_overall"]) / ref["n_obs_overall"] < 0.01
    assert st.cc_half[0] > 0.999 and abs(st.i_over_sigma_mean[0] - ref["i_over_sigma_overall"]) < 3.0
