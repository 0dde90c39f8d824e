"""Merged MTZ from a scaled table, as `dials.merge` / `output.merged_mtz=` write it (formats.md §4).

IMEAN/SIGIMEAN: inverse-variance weighted merge with I+ and I− together; I(±), SIGI(±),
N(±): the same merge with Bijvoet mates apart; F(±), SIGF(±): French–Wilson amplitudes
of the anomalous merged intensities (jaxscale.merge.french_wilson); F, SIGF: the
1/σ²-weighted mean of F(+) and F(−) (as dials.merge forms them); DANO = F(+) − F(−),
SIGDANO = sqrt(σF(+)² + σF(−)²) for acentric pairs. One row per unique reflection
(ASU index), missing values NaN.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxscale.data.table import ReflectionTable
from jaxscale.merge.french_wilson import french_wilson
from jaxscale.merge.merging import (
    ScaledObservations,
    group_by_index,
    merge_scaled,
    scaled_observations,
    weighted_merge,
)


def merged_columns(obs: ScaledObservations, use_internal_variance: bool = False, amplitudes: bool = True
                   ) -> tuple[np.ndarray, dict[str, tuple[str, np.ndarray]]]:
    """(miller (m, 3) ASU indices, {label: (MTZ type, values (m,))}) for the merged MTZ;
    amplitudes=False: the intensity columns only (no French-Wilson)."""
    mean = merge_scaled(obs.with_anomalous(False), use_internal_variance)
    anom = merge_scaled(obs.with_anomalous(True), use_internal_variance)
    m = len(mean)
    minus_g = np.zeros(len(anom), dtype=bool)
    minus_g[anom.group_id] = obs.friedel_minus
    centric_g = np.zeros(len(anom), dtype=bool)
    centric_g[anom.group_id] = obs.centric
    base = np.where(minus_g[:, None], -anom.miller, anom.miller)
    # row of the non-anomalous table for each anomalous group (both tables sorted by hkl)
    row = _rows_of(mean.miller, base)
    ds2_g = np.zeros(len(anom))
    ds2_g[anom.group_id] = obs.d_star_sq

    def scatter(values, sel, fill=np.nan, dtype=float):
        out = np.full(m, fill, dtype=dtype)
        out[row[sel]] = values[sel]
        return out

    plus, minus = ~minus_g, minus_g
    cols: dict[str, tuple[str, np.ndarray]] = {
        "IMEAN": ("J", mean.intensity),
        "SIGIMEAN": ("Q", mean.sigma),
        "I(+)": ("K", scatter(anom.intensity, plus)),
        "SIGI(+)": ("M", scatter(anom.sigma, plus)),
        "I(-)": ("K", scatter(anom.intensity, minus)),
        "SIGI(-)": ("M", scatter(anom.sigma, minus)),
        "N(+)": ("I", scatter(anom.multiplicity.astype(float), plus)),
        "N(-)": ("I", scatter(anom.multiplicity.astype(float), minus)),
    }
    if not amplitudes:
        return mean.miller, cols
    fw = french_wilson(anom.intensity, anom.sigma, ds2_g, centric_g)
    fp, sfp = scatter(fw.F, plus & fw.valid), scatter(fw.sigF, plus & fw.valid)
    fm, sfm = scatter(fw.F, minus & fw.valid), scatter(fw.sigF, minus & fw.valid)
    # F, SIGF: weighted merge of the valid F(+), F(−) of each reflection
    have = fw.valid
    gid_f = row[have]
    f_mean, f_sig, f_n = weighted_merge(gid_f, m, fw.F[have], fw.sigF[have]) if have.any() else (
        np.full(m, np.nan), np.full(m, np.nan), np.zeros(m, int))
    with np.errstate(invalid="ignore"):
        f_mean = np.where(f_n > 0, f_mean, np.nan)
        f_sig = np.where(f_n > 0, f_sig, np.nan)
    centric_row = np.zeros(m, dtype=bool)
    centric_row[row] = centric_g
    pair = ~np.isnan(fp) & ~np.isnan(fm) & ~centric_row
    cols.update({
        "F": ("F", f_mean),
        "SIGF": ("Q", f_sig),
        "F(+)": ("G", fp),
        "SIGF(+)": ("L", sfp),
        "F(-)": ("G", fm),
        "SIGF(-)": ("L", sfm),
        "DANO": ("D", np.where(pair, fp - fm, np.nan)),
        "SIGDANO": ("Q", np.where(pair, np.sqrt(sfp**2 + sfm**2), np.nan)),
    })
    return mean.miller, cols


def _rows_of(unique_sorted: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each key (k, 3) in the lexicographically sorted unique array (m, 3)."""
    both, inverse = group_by_index(np.concatenate([unique_sorted, keys]))
    assert both.shape[0] == unique_sorted.shape[0], "anomalous groups not in the mean table"
    return inverse[unique_sorted.shape[0]:]


def write_merged_mtz_from_scaled(path: str | os.PathLike, table: ReflectionTable, experiments,
                                 anomalous: bool = True, crystal_name: str = "XTAL",
                                 project_name: str = "AUTOMATIC", dataset_name: str = "NATIVE",
                                 use_internal_variance: bool = False) -> None:
    """Merge the scaled table and write the merged MTZ (columns as in the module docstring).

    anomalous=False writes only IMEAN, SIGIMEAN, F, SIGF (French–Wilson of IMEAN).
    """
    from jaxscale.io.mtz import write_merged_mtz

    obs = scaled_observations(table, experiments, anomalous=False)
    if anomalous:
        miller, cols = merged_columns(obs, use_internal_variance)
    else:
        mean = merge_scaled(obs, use_internal_variance)
        centric = np.zeros(len(mean), dtype=bool)
        centric[mean.group_id] = obs.centric
        ds2 = np.zeros(len(mean))
        ds2[mean.group_id] = obs.d_star_sq
        fw = french_wilson(mean.intensity, mean.sigma, ds2, centric)
        miller = mean.miller
        cols = {"IMEAN": ("J", mean.intensity), "SIGIMEAN": ("Q", mean.sigma),
                "F": ("F", fw.F), "SIGF": ("Q", fw.sigF)}
    write_merged_mtz(path, cell=obs.unit_cell, space_group=obs.space_group,
                     wavelength=float(experiments[0].wavelength), miller=miller, columns=cols,
                     crystal_name=crystal_name, project_name=project_name, dataset_name=dataset_name)


def run(params, tables, experiments) -> dict[str, str]:
    """`jaxscale export`: the MTZ files named in params.output from scaled .refl/.expt pairs.

    tables[i] goes with experiments[i] (an experiment list); the pairs are joined into one
    table with dataset ids renumbered by position. Both files are written or neither.
    Returns {"unmerged_mtz"|"merged_mtz": path}.
    """
    from jaxscale.exceptions import InputError
    from jaxscale.outputs import write_all

    all_experiments: list = []
    parts = []
    for table, expts in zip(tables, experiments):  # loop over input pairs
        offset = len(all_experiments)
        ids = np.asarray(table["id"]) if "id" in table else np.zeros(len(table), dtype=np.int32)
        new_ids = np.full(ids.shape, -1, dtype=np.int32)
        if table.identifiers:
            position = {e.identifier: i for i, e in enumerate(expts)}
            new_of_id = {}
            for k, ident in table.identifiers.items():  # loop over experiments
                if ident not in position:
                    raise InputError(None, f"reflection identifier {ident!r} has no experiment", field="identifiers")
                new_of_id[k] = offset + position[ident]
            # one lookup over the rows (a mask per experiment: quadratic in stills)
            keys = np.fromiter(new_of_id, dtype=np.int64, count=len(new_of_id))
            values = np.fromiter(new_of_id.values(), dtype=np.int32, count=len(new_of_id))
            order = np.argsort(keys)
            at = np.clip(np.searchsorted(keys[order], ids), 0, keys.size - 1)
            found = keys[order][at] == ids
            new_ids[found] = values[order][at[found]]
        else:
            new_ids = np.where(ids >= 0, ids + offset, -1).astype(np.int32)
        t = table.copy()
        t["id"] = new_ids
        t.identifiers = {offset + i: e.identifier for i, e in enumerate(expts)}
        parts.append(t)
        all_experiments.extend(expts)
    if not parts:
        raise InputError(None, "nothing to export")
    table = parts[0] if len(parts) == 1 else ReflectionTable.concatenate(parts)
    return write_all(mtz_jobs(params, table, all_experiments))


def mtz_jobs(params: Any, table: ReflectionTable, experiments: list
             ) -> list[tuple[str, str, Callable[[Path], None]]]:
    """(name, path, writer) of the unmerged and merged MTZ files named in params.output (for outputs.write_all)."""
    out = params.output
    jobs: list[tuple[str, str, Callable[[Path], None]]] = []
    if out.unmerged_mtz:
        from jaxscale.io.mtz import write_unmerged_mtz

        jobs.append(("unmerged_mtz", out.unmerged_mtz, lambda p: write_unmerged_mtz(
            p, table, experiments, crystal_name=out.crystal_name, project_name=out.project_name,
            partiality_threshold=params.cut_data.partiality_cutoff)))
    if out.merged_mtz:
        jobs.append(("merged_mtz", out.merged_mtz, lambda p: write_merged_mtz_from_scaled(
            p, table, experiments, anomalous=True, crystal_name=out.crystal_name or "XTAL",
            project_name=out.project_name or "AUTOMATIC", use_internal_variance=out.use_internal_variance)))
    return jobs
