"""The .expt reader against dxtbx's view of the same files, and writer round trips."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError
from jaxscale.io.expt import assign_identifiers, read_expt, write_expt
from tests.conftest import requires_dials

REFERENCE = json.loads((Path(__file__).parent / "reference" / "dials_refl_reference.json").read_text())


@pytest.mark.parametrize("rel", sorted(REFERENCE["expt"]))
def test_reader_matches_dxtbx(shared_data, rel):
    ref = REFERENCE["expt"][rel]
    experiments = read_expt(shared_data / rel)
    assert len(experiments) == ref["n"]
    assert experiments.identifiers() == ref["identifiers"]
    for k, exp in enumerate(experiments):
        # cctbx writes e.g. "P 21 21 21"; gemmi's short form drops spaces differently
        assert exp.space_group.xhm().replace(" ", "") == ref["space_group"][k].replace(" ", "")
        np.testing.assert_allclose(exp.unit_cell.parameters, ref["unit_cell"][k], rtol=1e-9)
        assert exp.is_still == ref["is_still"][k]
        if ref["image_range"][k] is not None:
            assert list(exp.image_range) == ref["image_range"][k]
            np.testing.assert_allclose(exp.oscillation, ref["oscillation"][k])
        assert exp.wavelength == pytest.approx(ref["wavelength"][k], rel=1e-12)


def test_write_read_round_trip(tmp_path, shared_data):
    experiments = read_expt(shared_data / "lcys_4sweep_dials" / "reference_dials3.12_scale" / "scaled.expt")
    write_expt(experiments, tmp_path / "out.expt")
    back = read_expt(tmp_path / "out.expt")
    assert back.identifiers() == experiments.identifiers()
    for a, b in zip(experiments, back):
        assert a.crystal == b.crystal and a.scan == b.scan and a.scaling_model == b.scaling_model
        assert a.detector == b.detector and a.beam == b.beam and a.goniometer == b.goniometer


def test_bad_expt(tmp_path):
    bad = tmp_path / "bad.expt"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.expt"):
        read_expt(bad)
    bad.write_text(json.dumps({"__id__": "ExperimentList", "experiment": []}))
    with pytest.raises(InputError, match="empty"):
        read_expt(bad)


def test_mismatched_identifiers(shared_data):
    experiments = read_expt(shared_data / "cunir_ssx_stills_dials" / "integrated.expt")
    table = ReflectionTable({"id": np.array([0, 1], dtype=np.int32)}, identifiers={0: "x", 1: "y"})
    with pytest.raises(InputError, match="identifiers do not match"):
        assign_identifiers(table, experiments, "t.refl")


def test_assign_identifiers_when_absent(shared_data):
    experiments = read_expt(shared_data / "lcys_4sweep_dials" / "integrated" / "lcys_20_integrated.expt")
    table = ReflectionTable({"id": np.zeros(3, dtype=np.int32)})
    assign_identifiers(table, experiments)
    assert table.identifiers == {0: experiments[0].identifier} and len(experiments[0].identifier) == 36


@requires_dials
def test_dials_show_reads_our_expt(tmp_path, shared_data):
    experiments = read_expt(shared_data / "lcys_4sweep_dials" / "reference_dials3.12_scale" / "scaled.expt")
    write_expt(experiments, tmp_path / "ours.expt")
    out = subprocess.run(["dials.show", "ours.expt"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Experiment ") >= 4
    assert "physical" in out.stdout.lower() or "Scaling model" in out.stdout


def test_many_experiments_written_compact_with_the_same_document(tmp_path):
    """Above INDENT_MAX_EXPERIMENTS the file is unindented JSON: the same document (shared
    models pooled once), read back equal, and DIALS' own loader takes it."""
    from jaxscale.io import expt as X
    from jaxscale.sim.stills import simulate_stills

    _, experiments, _ = simulate_stills(X.INDENT_MAX_EXPERIMENTS + 5, 5, seed=3)
    write_expt(experiments, tmp_path / "many.expt")
    text = (tmp_path / "many.expt").read_text()
    assert "\n" not in text.strip()
    indented = json.dumps(X.encode_expt(experiments), indent=2)
    assert json.loads(text) == json.loads(indented)
    doc = json.loads(text)
    assert len(doc["beam"]) == 1 and len(doc["crystal"]) == len(experiments)
    back = read_expt(tmp_path / "many.expt")
    assert back.identifiers() == experiments.identifiers()
    assert all(a.crystal == b.crystal and a.beam == b.beam for a, b in zip(experiments, back))


@requires_dials
def test_dials_loads_compact_expt(tmp_path):
    from jaxscale.io import expt as X
    from jaxscale.sim.stills import simulate_stills

    _, experiments, _ = simulate_stills(X.INDENT_MAX_EXPERIMENTS + 5, 5, seed=3)
    write_expt(experiments, tmp_path / "many.expt")
    code = ("from dxtbx.model.experiment_list import ExperimentListFactory as F; "
            "e = F.from_json_file('many.expt', check_format=False); print(len(e))")
    out = subprocess.run(["/usr/bin/python3", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == len(experiments)
