"""Make consistent_indexing_cosym.npz: simulated P 4 stills with a planted ambiguity, and the
reindexing ops dials.cosym (DIALS 3.12) chooses for them.

Run from the repository root: .venv/bin/python tests/data/reference/consistent_indexing_cosym.py
Needs DIALS (dials.cosym on PATH). Stores the inputs as well, so the test does not depend on
the simulator staying bit-identical.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from jaxscale.sim.io import write_simulation
from jaxscale.sim.stills import simulate_stills

HERE = Path(__file__).resolve().parent
N_STILLS, N_OBS, SEED = 40, 300, 12


def main() -> None:
    table, experiments, truth = simulate_stills(
        N_STILLS, N_OBS, space_group="P 4", ambiguity_fraction=0.5, d_min=2.5, seed=SEED
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_simulation(tmp, table, experiments, truth)
        run = subprocess.run(
            ["dials.cosym", "integrated.expt", "integrated.refl", "space_group=P4"],
            cwd=tmp, capture_output=True, text=True, check=True,
        )
    dials_ops = np.array(["x,y,z"] * N_STILLS, dtype="U16")
    for match in re.finditer(r"^(\S+): \[([\d, ]+)\]", run.stdout, re.M):  # "op: [dataset ids]"
        dials_ops[[int(i) for i in match.group(2).split(",")]] = match.group(1)
    cell = experiments[0].unit_cell
    np.savez_compressed(
        HERE / "consistent_indexing_cosym.npz",
        miller_index=table["miller_index"].astype(np.int16),
        intensity=table["intensity.sum.value"].astype(np.float32),
        variance=table["intensity.sum.variance"].astype(np.float32),
        dataset=table["id"].astype(np.int16),
        cell=np.array(cell.parameters),
        space_group=np.array(experiments[0].space_group.hm),
        planted_reindexed=np.asarray(truth["reindexed"], dtype=bool),
        dials_ops=dials_ops,
    )


if __name__ == "__main__":
    main()
