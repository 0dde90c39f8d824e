"""Fixtures for CLI tests: a fake engine that records what reaches it, tiny input files."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

REFL_HEAD = b"\x93\xbbdials::af::reflection_table\x01\x83"
EXPT_TEXT = json.dumps({"__id__": "ExperimentList", "experiment": []})


class Recorder:
    def __init__(self):
        self.calls: list[dict] = []


@pytest.fixture
def fake_engine(monkeypatch):
    """Install a stand-in ``jaxscale.scale`` whose run() records params, inputs and progress."""
    recorder = Recorder()
    module = types.ModuleType("jaxscale.scale")

    def run(params, inputs, progress=None):
        recorder.calls.append({"params": params, "inputs": list(inputs), "progress": progress})
        if progress is not None:
            progress.on_phase_start("scaling", 3)
            progress.on_advance()
            progress.on_advance(2)
            progress.on_phase_end()
            progress.log("fake engine done")
        return {"ok": True}

    module.run = run
    monkeypatch.setitem(sys.modules, "jaxscale.scale", module)
    return recorder


@pytest.fixture
def dials_files(tmp_path) -> list[Path]:
    """Two fake .refl/.expt pairs (right magic bytes, no content)."""
    paths = []
    for i in (1, 2):
        refl, expt = tmp_path / f"s{i}.refl", tmp_path / f"s{i}.expt"
        refl.write_bytes(REFL_HEAD)
        expt.write_text(EXPT_TEXT)
        paths += [refl, expt]
    return paths
