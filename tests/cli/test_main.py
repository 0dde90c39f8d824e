"""The jaxscale command: dials.scale-style arguments, error handling, subcommands."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxscale.cli.main import main
from jaxscale.params import AUTO, markdown_docs

REPO = Path(__file__).resolve().parents[2]


def _files_in(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def run_main(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("arg,path,expected", [
    ("d_min=1.4", "cut_data.d_min", 1.4),
    ("physical.absorption_correction=False", "physical.absorption_correction", False),
    ("physical.scale_interval=10", "physical.scale_interval", 10.0),
    ("exclude_images=0:101:200", "exclude_images", ["0:101:200"]),
    ("exclude_datasets=0 2", "dataset_selection.exclude_datasets", [0, 2]),
    ("model=KB", "model", "KB"),
    ("intensity_choice=profile", "reflection_selection.intensity_choice", "profile"),
    ("anomalous=True", "anomalous", True),
    ("full_matrix=False", "scaling_options.full_matrix", False),
    ("error_model=None", "weighting.error_model.error_model", None),
    ("likelihood=student_t", "weighting.likelihood", "student_t"),
    ("precision=float32", "compute.precision", "float32"),
])
def test_dials_argument_forms_reach_engine(arg, path, expected, fake_engine, dials_files, capsys):
    code, out, err = run_main(["scale", *dials_files[:2], arg, "-q"], capsys)
    assert code == 0, err
    params = fake_engine.calls[0]["params"]
    value = params
    for part in path.split("."):
        value = getattr(value, part)
    assert value == expected
    assert out == ""  # --quiet


def test_inputs_paired_by_order_in_any_order(fake_engine, dials_files, capsys):
    r1, e1, r2, e2 = dials_files
    code, _, err = run_main(["scale", e1, r1, "-v", e2, "d_min=2", r2], capsys)
    assert code == 0, err
    call = fake_engine.calls[0]
    assert call["inputs"] == [str(r1), str(e1), str(r2), str(e2)]
    assert call["params"].input.reflections == [str(r1), str(r2)]
    assert call["params"].input.experiments == [str(e1), str(e2)]
    assert call["params"].cut_data.d_min == 2.0


def test_progress_protocol_and_header(fake_engine, dials_files, capsys):
    code, out, _ = run_main(["scale", *dials_files[:2], "d_min=1.5"], capsys)
    assert code == 0
    progress = fake_engine.calls[0]["progress"]
    for method in ("on_phase_start", "on_advance", "on_phase_end", "log"):
        assert callable(getattr(progress, method))
    assert "d_min = 1.5" in out and str(dials_files[0]) in out
    assert "scaling ... (3 steps)" in out and "scaling: done in" in out and "fake engine done" in out


def test_phil_file_then_command_line_override(fake_engine, dials_files, tmp_path, capsys):
    phil = tmp_path / "params.phil"
    phil.write_text("# my settings\ncut_data {\n  d_min = 3.0\n  d_max = 20\n}\nphysical.lmax = 6\n"
                    "reflection_selection { method = use_all }\n")
    code, _, err = run_main(["scale", *dials_files[:2], "--phil", phil, "d_min=1.4"], capsys)
    assert code == 0, err
    p = fake_engine.calls[0]["params"]
    assert (p.cut_data.d_min, p.cut_data.d_max, p.physical.lmax) == (1.4, 20.0, 6)
    assert p.reflection_selection.method == "use_all"
    # a positional .phil file works as in dials.scale
    code, _, err = run_main(["scale", *dials_files[:2], phil], capsys)
    assert code == 0 and fake_engine.calls[1]["params"].cut_data.d_min == 3.0


def test_yaml_config_then_command_line_override(fake_engine, dials_files, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inputs: [{dials_files[0].name}, {dials_files[1].name}]\ncut_data:\n  d_min: 2.5\n"
                   "physical:\n  scale_interval: 7\n")
    code, _, err = run_main(["run", cfg, "physical.decay_interval=12", "-q"], capsys)
    assert code == 0, err
    p = fake_engine.calls[0]["params"]
    assert p.cut_data.d_min == 2.5 and p.physical.scale_interval == 7.0 and p.physical.decay_interval == 12.0
    assert p.physical.absorption_correction == AUTO
    assert fake_engine.calls[0]["inputs"] == [str(dials_files[0]), str(dials_files[1])]
    code, _, _ = run_main(["scale", "--config", cfg, "d_min=1", "-q"], capsys)
    assert code == 0 and fake_engine.calls[1]["params"].cut_data.d_min == 1.0


@pytest.mark.parametrize("args,message", [
    (["dmin=1.4"], "unknown parameter 'dmin'; did you mean cut_data.d_min"),
    (["scale_interval=10"], "ambiguous parameter 'scale_interval': could be dose_decay.scale_interval, "
                            "physical.scale_interval"),
    (["reflection_selection.method=all"], "expected one of quasi_random, intensity_ranges, use_all, random"),
    (["d_min=3", "d_max=2"], "cut_data.d_min=3 must be smaller than cut_data.d_max=2"),
    (["use_datasets=0", "exclude_datasets=1"], "are both set"),
])
def test_parameter_errors_exit_2_one_line_nothing_run(args, message, fake_engine, dials_files, tmp_path,
                                                      capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _files_in(tmp_path)
    code, out, err = run_main(["scale", *dials_files[:2], *args], capsys)
    assert code == 2
    assert err.startswith("jaxscale: error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err and out == ""
    assert not fake_engine.calls and _files_in(tmp_path) == before


@pytest.mark.parametrize("make,message", [
    (lambda d: [d[0], d[1], d[2]], "2 reflection file(s) but 1 experiment file(s)"),
    (lambda d: [d[0], d[1], d[0].parent / "missing.refl"], "missing.refl: no such file"),
    (lambda d: [], "no input files"),
])
def test_input_errors(make, message, fake_engine, dials_files, capsys):
    code, _, err = run_main(["scale", *make(dials_files)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not fake_engine.calls


def test_unrecognised_file_content(tmp_path, fake_engine, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    wrong = tmp_path / "x.refl"
    wrong.write_text('{"__id__": "ExperimentList"}')
    code, _, err = run_main(["scale", bad], capsys)
    assert code == 2 and "not a DIALS .refl/.expt, unmerged MTZ or XDS .HKL file" in err
    code, _, err = run_main(["scale", wrong], capsys)
    assert code == 2 and "file name says reflections but the content is experiments" in err


def test_subprocess_typo_exit_status_and_stderr(tmp_path):
    env = dict(os.environ, JAXSCALE_X64="1")
    done = subprocess.run([sys.executable, "-m", "jaxscale.cli.main", "scale", "absorption_corection=False"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("jaxscale: error: unknown parameter 'absorption_corection'; did you mean ")
    assert "physical.absorption_correction" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_engine_is_a_clean_error(dials_files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jaxscale.scale", None)  # import fails as if absent
    code, _, err = run_main(["scale", *dials_files[:2], "-q"], capsys)
    assert code == 2 and "scaling engine is not available" in err


def test_show_config_forms(capsys):
    code, out, _ = run_main(["show-config"], capsys)
    assert code == 0 and "model = KB array dose_decay physical" in out and "d_min" not in out  # level 1
    code, out, _ = run_main(["show-config", "-e", "1", "-a", "2"], capsys)
    assert "d_min = None" in out and ".type = float(allow_none=True)" in out and "min_Ih" not in out
    code, out, _ = run_main(["show-config", "--diff", "d_min=2", "exclude_images=0:1:5"], capsys)
    assert out == "cut_data {\n  d_min = 2\n}\nexclude_images = 0:1:5\n"
    code, out, _ = run_main(["show-config", "--markdown"], capsys)
    assert out == markdown_docs()
    code, out, err = run_main(["show-config", "d_mn=2"], capsys)
    assert code == 2 and "did you mean cut_data.d_min" in err


def test_help_for_every_subcommand(capsys):
    for command in ("scale", "run", "show", "show-config", "export", "version"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert f"usage: jaxscale {command}" in capsys.readouterr().out


def test_version(capsys):
    code, out, _ = run_main(["version"], capsys)
    assert code == 0 and out.startswith("jaxscale 0.")


def test_export_calls_export_run(dials_files, monkeypatch, capsys):
    import types

    seen = {}
    export = types.ModuleType("jaxscale.export")
    export.run = lambda params, tables, experiments: seen.update(p=params, t=tables, e=experiments)
    monkeypatch.setitem(sys.modules, "jaxscale.export", export)
    import jaxscale.io.expt as expt_mod
    import jaxscale.io.refl as refl_mod
    monkeypatch.setattr(refl_mod, "read_refl", lambda path: f"table:{Path(path).name}")
    monkeypatch.setattr(expt_mod, "read_expt", lambda path: f"expts:{Path(path).name}")
    code, _, err = run_main(["export", dials_files[1], dials_files[0], "--merged-mtz", "m.mtz",
                             "--crystal-name", "LYSO", "project_name=P1"], capsys)
    assert code == 0, err
    assert seen["p"].output.merged_mtz == "m.mtz" and seen["p"].output.unmerged_mtz is None
    assert seen["p"].output.crystal_name == "LYSO" and seen["p"].output.project_name == "P1"
    assert seen["t"] == ["table:s1.refl"] and seen["e"] == ["expts:s1.expt"]
    code, _, _ = run_main(["export", dials_files[0], dials_files[1]], capsys)
    assert code == 0 and seen["p"].output.unmerged_mtz == "scaled.mtz"


def test_show_real_files(shared_data, capsys):
    quartz = shared_data / "quartz_3ded_dials"
    code, out, err = run_main(["show", quartz / "integrated.refl", quartz / "scaled.expt"], capsys)
    assert code == 0, err
    assert "rows: 1653" in out and "space group P 31 2 1" in out
    assert "images 1-100" in out and "rotation -50.0-50.0°" in out and "resolution: 0.56 - 5.40 Å" in out


def test_show_stills(shared_data, capsys):
    code, out, err = run_main(["show", shared_data / "cunir_ssx_stills_dials" / "integrated.expt"], capsys)
    assert code == 0 and "experiments: 5" in out and out.count(", still,") == 5 and "P 21 3" in out


def test_show_mtz_through_lazy_reader(tmp_path, monkeypatch, capsys):
    """MTZ files go to jaxscale.io.mtz.read_unmerged_mtz; resolution from indices and cell."""
    import types

    import gemmi
    import numpy as np

    from jaxscale.data.table import ReflectionTable

    mtz = tmp_path / "data.mtz"
    mtz.write_bytes(b"MTZ \x00\x00\x00\x00")
    table = ReflectionTable(columns={"miller_index": np.array([[1, 0, 0], [2, 2, 1]], dtype=np.int32),
                                     "id": np.array([0, 1], dtype=np.int32)})
    expt = types.SimpleNamespace(space_group=gemmi.SpaceGroup("P 2 3"), unit_cell=gemmi.UnitCell(10, 10, 10, 90, 90, 90),
                                 is_still=False, image_range=(1, 45), osc_range=(0.0, 45.0), wavelength=1.0,
                                 scaling_model=None)
    module = types.ModuleType("jaxscale.io.mtz")
    module.read_unmerged_mtz = lambda path: (table, [expt])
    monkeypatch.setitem(sys.modules, "jaxscale.io.mtz", module)
    code, out, err = run_main(["show", mtz], capsys)
    assert code == 0, err
    assert "(mtz)" in out and "rows: 2" in out and "datasets (id: rows): 0: 1, 1: 1" in out
    assert "resolution: 3.33 - 10.00 Å" in out and "images 1-45" in out and "P 2 3" in out


def test_subprocess_run_ends_with_every_output_written(tmp_path, shared_data):
    """The command ends the process without the interpreter's teardown (cli.main._exit):
    stdout must still be complete and every output file whole."""
    from jaxscale.io.expt import read_expt
    from jaxscale.io.refl import read_refl

    data = shared_data / "lcys_4sweep_dials" / "integrated" / "lcys_20_integrated"
    env = dict(os.environ, JAXSCALE_CACHE_DIR="")
    done = subprocess.run([sys.executable, "-m", "jaxscale.cli.main", "scale", f"{data}.refl", f"{data}.expt",
                           "output.html=None"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.rstrip().splitlines()
    assert lines[-2] == "writing outputs ... (3 steps)" and lines[-1].startswith("writing outputs: done in ")
    assert _files_in(tmp_path) == {"scaled.refl", "scaled.expt", "jaxscale.log"}
    table = read_refl(tmp_path / "scaled.refl")
    assert len(table) == 4417 - 4 and "inverse_scale_factor" in table  # input rows less 4 partials combined
    assert read_expt(tmp_path / "scaled.expt")[0].scaling_model is not None
    assert (tmp_path / "jaxscale.log").read_text().rstrip().splitlines()[-1].startswith("Total time taken:")
