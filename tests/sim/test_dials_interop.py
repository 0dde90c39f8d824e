"""DIALS reads the simulated files, agrees with their geometry, and dials.scale accepts a sweep."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from jaxscale.sim import simulate_rotation_sweep, simulate_stills, write_simulation
from tests.conftest import DIALS_PYTHON, requires_dials

HERE = Path(__file__).resolve().parent
pytestmark = requires_dials


def dials_view(expt: Path, refl: Path) -> dict:
    out = subprocess.run([DIALS_PYTHON, str(HERE / "dials_geometry_check.py"), str(expt), str(refl)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rotation_files(tmp_path_factory):
    """~8k observations, 90 degrees: small enough for dials.scale in well under a minute."""
    out = tmp_path_factory.mktemp("rotation")
    table, experiments, truth = simulate_rotation_sweep(8000, n_images=900, osc_width=0.1, seed=11)
    return write_simulation(out, table, experiments, truth), table


@pytest.fixture(scope="module")
def stills_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("stills")
    table, experiments, truth = simulate_stills(40, 50, seed=12, space_group="P 4", ambiguity_fraction=0.5)
    return write_simulation(out, table, experiments, truth), table


def test_dials_sees_the_rotation_geometry(rotation_files):
    written, table = rotation_files
    view = dials_view(written["expt"], written["refl"])
    assert view["n_experiments"] == 1 and view["n_reflections"] == len(table)
    assert view["identifiers"] == [table.identifiers[0]]
    assert view["max_d_diff"] < 1e-9
    assert view["max_s1_diff"] < 1e-9
    assert view["max_px_diff"] < 1e-6
    assert view["max_z_diff"] < 1e-6


def test_dials_sees_the_stills_geometry(stills_files):
    written, table = stills_files
    view = dials_view(written["expt"], written["refl"])
    assert view["n_experiments"] == 40 and view["n_reflections"] == len(table)
    assert view["identifiers"] == [table.identifiers[k] for k in range(40)]
    assert view["max_d_diff"] < 1e-9 and view["max_px_diff"] < 1e-6
    assert 0 < view["max_excitation"] < 3e-3  # on the Ewald sphere within the rocking width


@pytest.mark.parametrize("kind", ["rotation", "stills"])
def test_dials_show_reads_them(kind, rotation_files, stills_files):
    written = (rotation_files if kind == "rotation" else stills_files)[0]
    run = subprocess.run(["dials.show", str(written["expt"]), str(written["refl"])], capture_output=True, text=True,
                         timeout=120, cwd=written["expt"].parent)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Reflection list contains" in run.stdout


def test_dials_scale_accepts_the_sweep(rotation_files):
    written, table = rotation_files
    work = written["expt"].parent
    run = subprocess.run(["dials.scale", "integrated.expt", "integrated.refl"], capture_output=True, text=True,
                         timeout=300, cwd=work)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert (work / "scaled.refl").exists()
    log = (work / "dials.scale.log").read_text()
    assert "The scaling model type being applied is physical" in log
    # DIALS' refined scales follow the planted ones up to the degenerate overall scale and
    # global B (models.md §4.4): within a resolution shell they agree to a few per cent.
    subprocess.run([DIALS_PYTHON, "-c", (
        "import numpy as np; from dials.array_family import flex; "
        "t = flex.reflection_table.from_file('scaled.refl'); "
        "np.savez('dials_g.npz', g=np.array(t['inverse_scale_factor']), hkl=np.array(t['miller_index']), "
        "bad=np.array(t.get_flags(t.flags.bad_for_scaling, all=False)))")],
        capture_output=True, text=True, cwd=work, timeout=120, check=True)
    dials = np.load(work / "dials_g.npz")
    np.testing.assert_array_equal(dials["hkl"], table["miller_index"])  # same rows, same order
    truth = np.load(written["truth"])
    use = ~dials["bad"] & (dials["g"] > 0)
    log_ratio = np.log(dials["g"][use] / truth["inverse_scale"][use])
    d = table["d"][use]
    for lo, hi in ((1.6, 2.0), (2.0, 3.0), (3.0, 100.0)):
        shell = (d >= lo) & (d < hi)
        assert np.std(log_ratio[shell]) < 0.08, (lo, hi, np.std(log_ratio[shell]))
