"""Every example in configs/ loads and gives the engine the parameters its comments promise."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jaxscale.cli.config import load_config
from jaxscale.cli.main import main
from jaxscale.params import AUTO, ScaleParams, diff_from_defaults

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPECTED = {
    "single_sweep_no_absorption.yaml": {
        "model": "physical", "physical.absorption_correction": False,
        "output.log": "single_sweep.log", "output.html": "single_sweep.html"},
    "multi_dataset.yaml": {
        "cut_data.d_min": 0.9, "output.unmerged_mtz": "scaled_unmerged.mtz",
        "output.merged_mtz": "scaled_merged.mtz"},
    "incremental_step1.yaml": {
        "physical.scale_interval": 5.0, "physical.decay_interval": 5.0, "physical.absorption_correction": True,
        "output.reflections": "step1_scaled.refl", "output.experiments": "step1_scaled.expt"},
    "incremental_step2.yaml": {
        "physical.scale_interval": 10.0, "physical.decay_interval": 10.0,
        "output.reflections": "step2_scaled.refl", "output.experiments": "step2_scaled.expt"},
    "stills_kb.yaml": {
        "model": "KB", "reflection_selection.method": "use_all", "scaling_options.full_matrix": False},
    "benchmark_float32.yaml": {
        "compute.precision": "float32", "reflection_selection.method": "use_all",
        "scaling_refinery.max_iterations": 50, "output.html": "benchmark.html", "output.log": "benchmark.log"},
    "bench_serial.yaml": {
        "model": "KB", "compute.serial": "true", "output.html": None, "output.log": "bench_serial.log"},
}
N_INPUTS = {"single_sweep_no_absorption.yaml": 2, "multi_dataset.yaml": 8, "incremental_step1.yaml": 2,
            "incremental_step2.yaml": 4, "stills_kb.yaml": 2, "benchmark_float32.yaml": 8,
            "bench_serial.yaml": 2}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parameters(name):
    params, inputs = load_config(CONFIGS / name)
    assert diff_from_defaults(params) == EXPECTED[name]
    assert len(inputs) == N_INPUTS[name]
    assert all(Path(p).is_absolute() or Path(p).parent == CONFIGS for p in inputs)


def test_incremental_keeps_existing_models_and_auto_elsewhere():
    step2, inputs = load_config(CONFIGS / "incremental_step2.yaml")
    assert step2.overwrite_existing_models is False and step2.scaling_options.target_cycle is True
    assert step2.physical.absorption_correction == AUTO and step2.physical.lmax == AUTO
    assert Path(inputs[0]) == CONFIGS / "step1_scaled.refl"


def test_float32_config_and_defaults_are_float64():
    assert ScaleParams().compute.precision == "float64"
    params, _ = load_config(CONFIGS / "benchmark_float32.yaml")
    assert params.compute.precision == "float32" and params.compute.n_devices == 1


@pytest.mark.parametrize("name", ["single_sweep_no_absorption.yaml", "multi_dataset.yaml"])
def test_run_command_passes_config_to_engine(name, fake_engine, capsys):
    """The bundled example inputs exist, so `jaxscale run` gets as far as the engine."""
    if not (CONFIGS.parent / "examples" / "lcys").is_dir():
        pytest.skip("examples/lcys not present")
    assert main(["run", str(CONFIGS / name), "-q"]) == 0
    call = fake_engine.calls[0]
    assert diff_from_defaults(call["params"]) == {
        **EXPECTED[name], "input.reflections": call["params"].input.reflections,
        "input.experiments": call["params"].input.experiments}
    assert [Path(p).suffix for p in call["inputs"]] == [".refl", ".expt"] * (N_INPUTS[name] // 2)


def test_run_stills_config_with_local_inputs(tmp_path, fake_engine, dials_files):
    shutil.copy(CONFIGS / "stills_kb.yaml", tmp_path)
    shutil.copy(dials_files[0], tmp_path / "stills_integrated.refl")
    shutil.copy(dials_files[1], tmp_path / "stills_integrated.expt")
    assert main(["run", str(tmp_path / "stills_kb.yaml"), "KB.decay_correction=False", "-q"]) == 0
    params = fake_engine.calls[0]["params"]
    assert params.model == "KB" and params.KB.decay_correction is False


def test_run_rejects_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cut_data:\n  d_min: [1\n")
    assert main(["run", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("outputs:\n  log: x.log\n")
    assert main(["run", str(bad)]) == 2
    assert "unknown parameter 'outputs" in capsys.readouterr().err
