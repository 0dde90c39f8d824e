"""Write a simulated data set beside its truth (the only file-touching part of sim)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxscale.data.table import ReflectionTable
from jaxscale.io.atomic import atomic_path
from jaxscale.io.expt import ExperimentList, write_expt
from jaxscale.io.refl import write_refl


def save_truth(truth: dict, path: str | os.PathLike) -> None:
    """truth dict of arrays -> .npz (uncompressed: fast for 10^7-row arrays), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in truth.items()})


def load_truth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_simulation(
    out_dir: str | os.PathLike, table: ReflectionTable, experiments: ExperimentList, truth: dict,
    *, hdf5: bool = False,
) -> dict[str, Path]:
    """Write integrated.refl, integrated.expt, truth.npz (and integrated.h5 if asked) into out_dir.

    Returns {kind: path} of what was written. HDF5 needs `jaxscale.io.hdf5.save_table`;
    where that module is absent a RuntimeError says so.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"refl": out / "integrated.refl", "expt": out / "integrated.expt", "truth": out / "truth.npz"}
    write_refl(table, written["refl"])
    write_expt(experiments, written["expt"])
    save_truth(truth, written["truth"])
    if hdf5:
        try:
            from jaxscale.io.hdf5 import save_table
        except ImportError as exc:
            raise RuntimeError(f"HDF5 output needs jaxscale.io.hdf5.save_table, which is not available ({exc})") from None
        written["hdf5"] = out / "integrated.h5"
        save_table(written["hdf5"], table, experiments)
    return written
