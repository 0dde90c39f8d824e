"""Scaled observations and inverse-variance weighted merging (merging_stats.md §1-2).

Everything is vectorised over all unique reflections at once: observations are grouped by
their ASU index with `np.unique(..., return_inverse=True)` and the sums are segment sums
(`np.bincount`).
"""
from __future__ import annotations

from dataclasses import dataclass

import gemmi
import numpy as np

from jaxscale.data import flags as fl
from jaxscale.data import symmetry
from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError


def _map_to_asu(miller: np.ndarray, space_group: gemmi.SpaceGroup, anomalous: bool):
    """(key (n, 3) int64, friedel_minus (n,), centric (n,)); key = −h_asu for I(−) if anomalous."""
    asu, isym = symmetry.map_to_asu(miller, space_group, anomalous=False)
    centric = symmetry.is_centric(miller, space_group)
    minus = (isym % 2 == 0) & ~centric
    key = np.where((minus & anomalous)[:, None], -asu, asu).astype(np.int64)
    return key, minus, centric


def d_star_sq(miller: np.ndarray, cell: gemmi.UnitCell) -> np.ndarray:
    """1/d² (Å⁻²) of Miller indices (n, 3) in `cell`."""
    return symmetry.d_star_sq(miller, cell)


def median_cell(experiments) -> gemmi.UnitCell:
    """Per-parameter median of the experiments' cells (dials.scale's 'best' cell)."""
    return symmetry.best_unit_cell(experiments)


@dataclass(frozen=True)
class ScaledObservations:
    """Scaled, unmerged intensities I/g with σ/g, in DIALS order (experiment, then row)."""

    miller: np.ndarray          # (n, 3) int64, original indices
    miller_asu: np.ndarray      # (n, 3) int64, ASU key (−h_asu for I(−) when anomalous)
    friedel_minus: np.ndarray   # (n,) bool, observation of I(−) (False for centrics)
    centric: np.ndarray         # (n,) bool
    intensity: np.ndarray       # (n,) I / g
    sigma: np.ndarray           # (n,) sqrt(V) / g  (> 0)
    d_star_sq: np.ndarray       # (n,) 1/d² with `unit_cell`
    dataset: np.ndarray         # (n,) int, experiment index
    rows: np.ndarray            # (n,) int, row in the source table
    unit_cell: gemmi.UnitCell
    space_group: gemmi.SpaceGroup
    anomalous: bool

    def __len__(self) -> int:
        return int(self.intensity.shape[0])

    def select(self, keep: np.ndarray) -> "ScaledObservations":
        """Subset of rows (boolean mask or index array), order kept."""
        arrays = {k: getattr(self, k)[keep] for k in
                  ("miller", "miller_asu", "friedel_minus", "centric", "intensity", "sigma",
                   "d_star_sq", "dataset", "rows")}
        return ScaledObservations(**arrays, unit_cell=self.unit_cell,
                                  space_group=self.space_group, anomalous=self.anomalous)

    def with_anomalous(self, anomalous: bool) -> "ScaledObservations":
        """Same observations keyed with (or without) Bijvoet mates separated."""
        base = np.where(self.friedel_minus[:, None], -self.miller_asu, self.miller_asu) if self.anomalous else self.miller_asu
        key = np.where((self.friedel_minus & anomalous)[:, None], -base, base)
        return ScaledObservations(
            self.miller, key, self.friedel_minus, self.centric, self.intensity, self.sigma,
            self.d_star_sq, self.dataset, self.rows, self.unit_cell, self.space_group, anomalous)


def scaled_observations(table: ReflectionTable, experiments, anomalous: bool = False,
                        path: str | None = None, unit_cell: gemmi.UnitCell | None = None) -> ScaledObservations:
    """Rows used for merging: not bad_for_scaling, g > 0, σ > 0; I/g and sqrt(V)/g.

    Rows are ordered as DIALS concatenates per-experiment tables (stable by experiment
    index), which fixes the order that the random half-dataset split consumes.
    Cell: `unit_cell` when the caller already has the experiments' median cell (it costs a
    Python pass over 10^5 stills), else the median over experiments; space group: experiment 0's.
    """
    for col in ("miller_index", "flags", "inverse_scale_factor", "intensity.scale.value",
                "intensity.scale.variance"):
        if col not in table:
            raise InputError(path, f"reflection table has no column {col!r}; is it scaled?", field=col)
    ids = np.asarray(table["id"]) if "id" in table else np.zeros(len(table), dtype=np.int64)
    if table.identifiers:
        position = {e.identifier: i for i, e in enumerate(experiments)}
        lookup = {k: position.get(v, -1) for k, v in table.identifiers.items()}
        keys = np.array(sorted(lookup))
        vals = np.array([lookup[k] for k in keys])
        where = np.searchsorted(keys, ids).clip(0, max(len(keys) - 1, 0))
        dataset = np.where((len(keys) > 0) & (keys[where] == ids), vals[where], -1)
    else:
        dataset = ids.astype(np.int64)
    g = np.asarray(table["inverse_scale_factor"], dtype=float)
    var = np.asarray(table["intensity.scale.variance"], dtype=float)
    keep = (~fl.has_any(np.asarray(table["flags"]), fl.BAD_FOR_SCALING)) & (g > 0) & (var > 0) & (dataset >= 0)
    rows = np.flatnonzero(keep)
    if np.any(np.diff(dataset[rows]) < 0):  # already in experiment order (the usual case): no sort of 10^7 rows
        rows = rows[np.argsort(dataset[rows], kind="stable")]
    if rows.size == 0:
        raise InputError(path, "no scaled reflections to merge (all excluded or g <= 0)")
    g = g[rows]
    intensity = np.asarray(table["intensity.scale.value"], dtype=float)[rows] / g
    sigma = np.sqrt(var[rows]) / g
    miller = np.asarray(table["miller_index"], dtype=np.int64)[rows]
    cell = median_cell(experiments) if unit_cell is None else unit_cell
    sg = experiments[0].space_group
    key, minus, centric = _map_to_asu(miller, sg, anomalous)
    return ScaledObservations(miller, key, minus, centric, intensity, sigma, d_star_sq(miller, cell),
                              dataset[rows], rows, cell, sg, anomalous)


@dataclass(frozen=True)
class MergedIntensities:
    """One row per unique (ASU) reflection, sorted by (h, k, l)."""

    miller: np.ndarray          # (m, 3) int64, ASU key (−h for I(−) when anomalous)
    intensity: np.ndarray       # (m,) weighted mean Σ w I / Σ w, w = 1/σ²
    sigma: np.ndarray           # (m,) sqrt(1/Σw) (or the internal-variance estimate)
    multiplicity: np.ndarray    # (m,) int, number of observations
    group_id: np.ndarray        # (n,) int, observation -> row of this table

    def __len__(self) -> int:
        return int(self.intensity.shape[0])


DENSE_CODES_PER_ROW = 8  # dense lookup when the packed key range is at most this many codes per row (+ 2^20)


def _pack_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Integer rows (n, c) -> (code (n,) int64, lo (c,), span (c,)) with codes in the
    rows' lexicographic order (mixed radix over each column's range); None if the range
    does not fit in int64."""
    lo = keys.min(axis=0)
    span = keys.max(axis=0) - lo + 1
    if float(np.prod(span.astype(np.float64))) >= 2.0**62:
        return None
    code = keys[:, 0] - lo[0]
    for j in range(1, keys.shape[1]):  # loop over the (few) columns
        code = code * span[j] + (keys[:, j] - lo[j])
    return code, lo, span


def group_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique rows (m, c) in lexicographic order, group_id (n,)) of integer rows (n, c);
    the result of `np.unique(keys, axis=0, return_inverse=True)`, computed on packed int64
    codes (a dense lookup table when the code range is small, else a 1-D sort)."""
    keys = np.asarray(keys)
    if keys.shape[0] == 0:
        return np.zeros((0,) + keys.shape[1:], dtype=np.int64), np.zeros(0, dtype=np.int64)
    packed = _pack_rows(keys.astype(np.int64, copy=False)) if np.issubdtype(keys.dtype, np.integer) else None
    if packed is None:
        unique, group_id = np.unique(keys, axis=0, return_inverse=True)
        return unique, group_id.reshape(-1)
    code, lo, span = packed
    n_codes = int(np.prod(span))
    if n_codes <= DENSE_CODES_PER_ROW * code.size + (1 << 20):
        present = np.zeros(n_codes, dtype=bool)
        present[code] = True
        codes = np.flatnonzero(present)
        rank = np.empty(n_codes, dtype=np.int64)  # read only where present: untouched pages stay unmapped
        rank[codes] = np.arange(codes.size)
        group_id = rank[code]
    else:
        codes, group_id = np.unique(code, return_inverse=True)
    unique = np.empty((codes.size, keys.shape[1]), dtype=np.int64)
    rest = codes
    for j in range(keys.shape[1] - 1, 0, -1):  # loop over the (few) columns
        unique[:, j] = rest % span[j] + lo[j]
        rest = rest // span[j]
    unique[:, 0] = rest + lo[0]
    return unique, group_id.reshape(-1).astype(np.int64, copy=False)


def group_by_index(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys (m, 3) sorted lexicographically, group_id (n,)) for keys (n, 3)."""
    if len(keys) == 0:
        return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return group_rows(keys)


def weighted_merge(group_id: np.ndarray, n_groups: int, intensity: np.ndarray, sigma: np.ndarray,
                   use_internal_variance: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group (mean, σ, n) of inverse-variance weighted merging, vectorised.

    σ = sqrt(1/Σw); with use_internal_variance sqrt(max(s²_w/n, 1/Σw)) where
    s²_w = Σw/((Σw)² − Σw²) Σ w (I − ⟨I⟩)² (cctbx). A single observation keeps its own σ.
    """
    w = 1.0 / sigma**2                                                    # (n,)
    n = np.bincount(group_id, minlength=n_groups)                          # (m,)
    sum_w = np.bincount(group_id, w, minlength=n_groups)
    mean = np.bincount(group_id, w * intensity, minlength=n_groups) / sum_w
    merged_sigma = np.sqrt(1.0 / sum_w)
    if use_internal_variance:
        sum_w2 = np.bincount(group_id, w * w, minlength=n_groups)
        dev2 = np.bincount(group_id, w * (intensity - mean[group_id]) ** 2, minlength=n_groups)
        with np.errstate(divide="ignore", invalid="ignore"):
            s2w = sum_w / (sum_w**2 - sum_w2) * dev2
            internal = np.sqrt(np.maximum(s2w / n, 1.0 / sum_w))
        merged_sigma = np.where(n > 1, internal, merged_sigma)
    return mean, merged_sigma, n


def merge_intensities(miller_asu: np.ndarray, intensity: np.ndarray, sigma: np.ndarray,
                      use_internal_variance: bool = False) -> MergedIntensities:
    """Merge observations with equal ASU key (n, 3) into unique reflections."""
    unique, group_id = group_by_index(miller_asu)
    mean, merged_sigma, n = weighted_merge(group_id, len(unique), np.asarray(intensity, float),
                                           np.asarray(sigma, float), use_internal_variance)
    return MergedIntensities(unique, mean, merged_sigma, n, group_id)


def merge_scaled(obs: ScaledObservations, use_internal_variance: bool = False) -> MergedIntensities:
    """Merge scaled observations on their ASU key (anomalous as `obs.anomalous`)."""
    return merge_intensities(obs.miller_asu, obs.intensity, obs.sigma, use_internal_variance)
