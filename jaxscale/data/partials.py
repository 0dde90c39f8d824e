"""Summation of partial reflections split by the integration program (spec overview.md §3.2).

DIALS' `sum_partial_reflections`: among rows with partiality < 0.99 and positive variances
for every intensity type present, rows sharing a `partial_id` (two or more) are merged
into the first of them (lowest row index): summation intensities and variances add;
profile values and variances become means weighted by I_prf^2/V_prf (DIALS' choice);
`intensity.scale` values are inverse-variance weighted; partialities add. The other rows
are deleted. Flags and all other columns of the merged row are those of its first row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxscale.data.table import ReflectionTable

FULL_PARTIALITY = 0.99


@dataclass
class PartialSummation:
    table: ReflectionTable  # the shrunken table
    kept_rows: np.ndarray  # (n_out,) index of each output row in the input table
    n_combined: int  # number of rows deleted (merged into another row)


def sum_partials(table: ReflectionTable) -> PartialSummation:
    """Merge matching partial rows; returns the new table and which input rows it keeps."""
    n = len(table)
    if "partiality" not in table or "partial_id" not in table:
        return PartialSummation(table, np.arange(n), 0)
    kinds = [k for k in ("prf", "scale", "sum") if f"intensity.{k}.value" in table]
    partiality = np.asarray(table["partiality"], dtype=np.float64)
    candidate = partiality < FULL_PARTIALITY
    for k in kinds:
        candidate &= table[f"intensity.{k}.variance"] > 0
    rows = np.flatnonzero(candidate)  # ascending, so the first row of a group comes first
    if rows.size == 0:
        return PartialSummation(table, np.arange(n), 0)
    _, group, counts = np.unique(np.asarray(table["partial_id"])[rows], return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    multi = counts[group] > 1  # rows (of `rows`) in groups of >= 2 parts
    if not multi.any():
        return PartialSummation(table, np.arange(n), 0)
    rows, group = rows[multi], group[multi]
    # first (lowest index) row of each group
    n_groups = counts.size
    first_row = np.full(n_groups, n, dtype=np.int64)
    np.minimum.at(first_row, group, rows)
    used = first_row < n
    target = first_row[used]  # (n_multi_groups,) rows that receive the merged values
    gsum = lambda values: np.bincount(group, weights=values, minlength=n_groups)[used]  # noqa: E731

    changed = [f"intensity.{k}.{f}" for k in kinds for f in ("value", "variance")] + ["partiality"]
    out = ReflectionTable(
        {k: (v.copy() if k in changed else v) for k, v in table.columns.items()},
        dict(table.identifiers),
        dict(table.dials_types),
    )
    if "prf" in kinds:
        i = np.asarray(table["intensity.prf.value"], dtype=np.float64)[rows]
        v = np.asarray(table["intensity.prf.variance"], dtype=np.float64)[rows]
        w = i * i / v
        total = gsum(w)
        nonzero = total != 0
        safe = np.where(nonzero, total, 1.0)
        out["intensity.prf.value"][target] = np.where(nonzero, gsum(w * i) / safe, 0.0)
        out["intensity.prf.variance"][target] = np.where(nonzero, gsum(w * v) / safe, gsum(v))
    if "sum" in kinds:
        out["intensity.sum.value"][target] = gsum(np.asarray(table["intensity.sum.value"], np.float64)[rows])
        out["intensity.sum.variance"][target] = gsum(np.asarray(table["intensity.sum.variance"], np.float64)[rows])
    if "scale" in kinds:
        i = np.asarray(table["intensity.scale.value"], dtype=np.float64)[rows]
        v = np.asarray(table["intensity.scale.variance"], dtype=np.float64)[rows]
        total = gsum(1.0 / v)
        out["intensity.scale.value"][target] = gsum(i / v) / total
        out["intensity.scale.variance"][target] = 1.0 / total
    out["partiality"][target] = gsum(partiality[rows])

    delete = np.zeros(n, dtype=bool)
    delete[rows] = True
    delete[target] = False
    kept = np.flatnonzero(~delete)
    return PartialSummation(out.select(kept), kept, int(delete.sum()))
