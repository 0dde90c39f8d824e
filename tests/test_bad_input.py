"""Bad input end to end: one line `jaxscale: error: ...` naming the file (or option) and the
problem, exit status 2, no traceback, nothing written and an existing scaled.refl untouched.

Most cases call `jaxscale.cli.main.main` in-process; a few run the installed command.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gemmi
import numpy as np
import pytest

from jaxscale.cli.main import main
from jaxscale.io.refl import read_refl, write_refl
from tests.conftest import EXAMPLES, SHARED_DATA

LCYS_REFL = EXAMPLES / "lcys" / "lcys_20_integrated.refl"
LCYS_EXPT = EXAMPLES / "lcys" / "lcys_20_integrated.expt"
QUARTZ_EXPT = SHARED_DATA / "quartz_3ded_dials" / "integrated.expt"
SENTINEL = b"an earlier run's scaled.refl\x00\x01"


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of broken inputs made from the lcys_20 example."""
    d = tmp_path_factory.mktemp("bad_inputs")
    raw = LCYS_REFL.read_bytes()
    (d / "truncated.refl").write_bytes(raw[: len(raw) // 2])
    (d / "corrupt.expt").write_text(LCYS_EXPT.read_text()[:5000])
    table = read_refl(LCYS_REFL)
    t = table.copy()
    del t["miller_index"]
    write_refl(t, d / "no_miller.refl")
    t = table.copy()
    for col in ("intensity.sum.variance", "intensity.prf.variance"):
        t[col] = np.full(len(t), np.nan)
    write_refl(t, d / "nan_variance.refl")
    write_refl(table.select(np.zeros(len(table), dtype=bool)), d / "empty.refl")
    t = table.copy()
    t.identifiers = {0: "refl-identifier"}
    write_refl(t, d / "named.refl")
    doc = json.loads(LCYS_EXPT.read_text())
    doc["experiment"][0]["identifier"] = "expt-identifier"
    (d / "named.expt").write_text(json.dumps(doc))
    (d / "directory.refl").mkdir()
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup("P 1 21 1")
    mtz.set_cell_for_all(gemmi.UnitCell(10, 11, 12, 90, 100, 90))
    mtz.add_dataset("amplitudes")
    mtz.add_column("M/ISYM", "Y")
    mtz.add_column("BATCH", "B")
    mtz.add_column("FP", "F")
    mtz.set_data(np.array([[1, 2, 3, 1, 1, 5.0], [2, 0, 1, 1, 2, 7.0]], dtype=np.float32))
    mtz.write_to_file(str(d / "no_intensity.mtz"))
    return d


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An output folder holding a scaled.refl from an earlier run."""
    (tmp_path / "scaled.refl").write_bytes(SENTINEL)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check(rc: int, err: str, workdir: Path, expect: list[str]) -> None:
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("jaxscale: error: "), err
    assert "Traceback" not in err
    for word in expect:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert sorted(os.listdir(workdir)) == ["scaled.refl"]  # no outputs, logs or temporary files
    assert (workdir / "scaled.refl").read_bytes() == SENTINEL


def _args(bad: Path, names: list[str]) -> list[str]:
    """File names in `bad` (or the real example/shared files) and key=value options."""
    real = {"lcys.refl": LCYS_REFL, "lcys.expt": LCYS_EXPT, "quartz.expt": QUARTZ_EXPT}
    return [str(real.get(n, bad / n)) if "=" not in n else n for n in names]


def _case(case_id: str, names: list[str], expect: list[str], marks=()):
    """One bad input: id, inputs and options, words the one-line message must contain."""
    return pytest.param(names, expect, id=case_id, marks=marks)


CASES = [
    _case("truncated-refl", ["truncated.refl", "lcys.expt"], ["truncated.refl", "not a readable"]),
    _case("corrupt-expt", ["lcys.refl", "corrupt.expt"], ["corrupt.expt", "JSON"]),
    _case("directory", ["directory.refl", "lcys.expt"], ["directory.refl", "directory"]),
    _case("missing-expt", ["lcys.refl", "absent.expt"], ["absent.expt", "no such file"]),
    _case("identifiers", ["named.refl", "named.expt"], ["named.refl", "identifiers", "expt-identifier"]),
    _case("dmin-above-dmax", ["lcys.refl", "lcys.expt", "cut_data.d_min=5", "cut_data.d_max=1"],
          ["cut_data.d_min", "cut_data.d_max"]),
    _case("model", ["lcys.refl", "lcys.expt", "model=nonsense"], ["model", "nonsense"]),
    _case("outlier_zmax", ["lcys.refl", "lcys.expt", "outlier_zmax=-3"], ["outlier_zmax", "-3"]),
    _case("no-miller", ["no_miller.refl", "lcys.expt"], ["no_miller.refl", "miller_index"]),
    _case("nan-variance", ["nan_variance.refl", "lcys.expt"], ["nan_variance.refl", "variance", "NaN"]),
    _case("empty", ["empty.refl", "lcys.expt"], ["empty.refl", "empty"]),
    _case("other-expt", ["lcys.refl", "quartz.expt"], ["lcys_20_integrated.refl", "identifiers"]),
    _case("dmin-negative", ["lcys.refl", "lcys.expt", "d_min=-1"], ["cut_data.d_min=-1"]),
    _case("nbins", ["lcys.refl", "lcys.expt", "output.merging.nbins=0"], ["output.merging.nbins=0"]),
    _case("exclude_images", ["lcys.refl", "lcys.expt", "exclude_images=0:5000:6000"],
          ["exclude_images=0:5000:6000", "outside"]),
    # options that leave nothing to scale fail after reading and preparing: still nothing written
    _case("dmin-cuts-everything", ["lcys.refl", "lcys.expt", "d_min=100"], ["unsuitable"]),
    _case("partiality-cuts-everything", ["lcys.refl", "lcys.expt", "partiality_cutoff=2"], ["partiality"]),
    _case("mtz-no-intensity", ["no_intensity.mtz"], ["no_intensity.mtz", "intensity"]),
]


@pytest.mark.parametrize("names, expect", CASES)
def test_bad_input_in_process(bad, workdir, capsys, names, expect):
    if "quartz.expt" in names and not QUARTZ_EXPT.exists():
        pytest.skip("shared data not available")
    rc = main(["scale", *_args(bad, names)])
    _check(rc, capsys.readouterr().err, workdir, expect)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(bad, workdir, capsys, tmp_path_factory):
    locked = tmp_path_factory.mktemp("locked") / "locked.refl"
    locked.write_bytes(LCYS_REFL.read_bytes())
    locked.chmod(0)
    rc = main(["scale", str(locked), str(LCYS_EXPT)])
    _check(rc, capsys.readouterr().err, workdir, ["locked.refl", "ermission"])


def _command() -> list[str]:
    script = Path(sys.executable).parent / "jaxscale"
    return [str(script)] if script.exists() else [sys.executable, "-m", "jaxscale.cli.main"]


@pytest.mark.parametrize("names, expect", [
    _case("truncated", ["truncated.refl", "lcys.expt"], ["truncated.refl"]),
    _case("nan-variance", ["nan_variance.refl", "lcys.expt"], ["nan_variance.refl", "NaN"]),
    _case("dmin-negative", ["lcys.refl", "lcys.expt", "d_min=-1"], ["cut_data.d_min=-1"]),
])
def test_bad_input_command(bad, workdir, names, expect):
    """The installed command: the same one line on stderr, exit 2, from a fresh process."""
    run = subprocess.run([*_command(), "scale", *_args(bad, names)], cwd=workdir, capture_output=True,
                         text=True, timeout=150)
    _check(run.returncode, run.stderr, workdir, expect)
