"""Subset of reflections for scale-factor minimisation (spec overview.md §4).

All functions work on arrays over the rows of the *global table*: the suitable rows of
every dataset, with `group_id` (symmetry group), `dataset_id` (0..n_datasets-1),
`intensity`, `variance` and `d_star_sq`. They return a boolean mask over those rows.
Random choices use a numpy Generator (deterministic for a seed); DIALS' cctbx
Mersenne-Twister subsets are not reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil, floor

import gemmi
import numpy as np

from jaxscale.data.symmetry import d_star_sq as _d_star_sq
from jaxscale.data.symmetry import epsilon


METHODS = ("auto", "quasi_random", "random", "use_all", "intensity_ranges")


@dataclass
class Selection:
    selected: np.ndarray  # (n,) bool over the global-table rows
    n_groups_selected: int
    n_groups_available: int
    details: dict = field(default_factory=dict)  # per-dataset counts for the log


def _isigma(intensity: np.ndarray, variance: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return intensity / np.sqrt(variance)


def preselection(
    intensity: np.ndarray,
    variance: np.ndarray,
    partiality: np.ndarray | None = None,
    d: np.ndarray | None = None,
    isigma_range: tuple[float, float] = (-5.0, 0.0),
    min_partiality: float = 0.95,
    d_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Rows (n,) with I/sigma > low (and < high unless high == 0), partiality > min, d in range."""
    isig = _isigma(intensity, variance)
    sel = isig > isigma_range[0]
    if isigma_range[1] != 0.0:
        sel &= isig < isigma_range[1]
    if partiality is not None:
        sel &= partiality > min_partiality
    if d_range:
        sel &= (d > d_range[0]) & (d < d_range[1])
    return sel


def _multiplicity(group_id: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per-row size (n,) of its group counted over `rows` only (0 outside)."""
    counts = np.bincount(group_id[rows], minlength=int(group_id.max(initial=-1)) + 1)
    return np.where(rows, counts[group_id], 0)


def _random_groups(group_id: np.ndarray, rows: np.ndarray, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of `n_groups` groups chosen uniformly without replacement among groups in `rows`."""
    groups = np.unique(group_id[rows])
    if n_groups >= groups.size:
        return rows.copy()
    chosen = np.zeros(int(group_id.max()) + 1, dtype=bool)
    chosen[rng.choice(groups, size=n_groups, replace=False)] = True
    return rows & chosen[group_id]


def _random_groups_per_dataset(group_id: np.ndarray, dataset_index: np.ndarray, n_datasets: int, rows: np.ndarray,
                               min_rows: float, rng: np.random.Generator) -> np.ndarray:
    """Rows (n,) of groups chosen at random within each data set, all data sets at once: for
    data set d (`dataset_index` 0..n_datasets-1), among the groups with >= 2 of its `rows`,
    ceil(min_rows / (its rows / its groups)) of them (all where fewer exist), each with its
    rows of d. Uniform without replacement: a random priority per (data set, group) pair,
    ranked within its data set."""
    out = np.zeros(group_id.size, dtype=bool)
    idx = np.flatnonzero(rows)
    n_groups = int(group_id.max(initial=-1)) + 1
    pairs, pair_of_row, rows_per_pair = np.unique(dataset_index[idx].astype(np.int64) * n_groups + group_id[idx],
                                                  return_inverse=True, return_counts=True)
    multi = rows_per_pair[pair_of_row] > 1
    idx, pair_of_row = idx[multi], pair_of_row[multi]
    if idx.size == 0:
        return out
    kept, pair_of_row = np.unique(pair_of_row, return_inverse=True)  # pairs with >= 2 rows, renumbered
    pair_dataset = pairs[kept] // n_groups
    rows_per_dataset = np.bincount(dataset_index[idx], minlength=n_datasets)
    groups_per_dataset = np.bincount(pair_dataset, minlength=n_datasets)
    with np.errstate(divide="ignore", invalid="ignore"):
        wanted = np.ceil(min_rows / (rows_per_dataset / groups_per_dataset))
    order = np.lexsort((rng.random(kept.size), pair_dataset))
    rank = np.empty(kept.size, dtype=np.int64)
    rank[order] = np.arange(kept.size) - np.searchsorted(pair_dataset[order], pair_dataset[order])
    chosen = rank < wanted[pair_dataset]
    out[idx[chosen[pair_of_row.reshape(-1)]]] = True
    return out


def select_single_dataset(
    group_id: np.ndarray,
    preselected: np.ndarray,
    rng: np.random.Generator,
    min_groups: int = 2000,
    min_reflections: int = 50000,
) -> Selection:
    """Single-dataset `quasi_random` / `random` (§4.1): random groups of >= 2 preselected rows.

    n_sel = max(ceil(min_reflections / mean multiplicity), min_groups) groups; all of them
    when fewer exist. Falls back to all rows (use_all) if no group has two members.
    """
    multi = preselected & (_multiplicity(group_id, preselected) > 1)
    if not multi.any():
        return Selection(np.ones(group_id.size, bool), 0, 0, {"fallback": "use_all"})
    n_avail = np.unique(group_id[multi]).size
    avg_m = multi.sum() / n_avail
    n_sel = max(int(ceil(min_reflections / avg_m)), min_groups)
    selected = _random_groups(group_id, multi, n_sel, rng)
    return Selection(selected, min(n_sel, n_avail), n_avail)


def _groups_above_isigma(group_id, intensity, variance, rows, cutoff):
    """Rows (n,) of groups (within `rows`) with >= 2 members and mean I/sigma > cutoff (DIALS
    retries with cutoff 0 when none pass)."""
    n_groups = int(group_id.max(initial=-1)) + 1
    isig = np.where(rows, _isigma(intensity, variance), 0.0)
    n = np.bincount(group_id[rows], minlength=n_groups)
    total = np.bincount(group_id[rows], weights=isig[rows], minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / n
    multi = n > 1
    if not multi.any():
        raise ValueError("no symmetry group with multiplicity > 1: scaling not possible")
    ok = multi & (mean > cutoff)
    if not ok.any():
        ok = multi & (mean > 0.0)
        if not ok.any():
            raise ValueError("no symmetry group with mean I/sigma > 0: scaling not possible")
    return rows & ok[group_id]


@dataclass(frozen=True)
class ClassMatrix:
    """A sparse (n_classes, n_cols) count matrix as its nonzero entries, indexed both ways
    (numpy only: scipy.sparse costs ~0.1 s to import for this one use)."""

    n_classes: int
    n_cols: int
    order: np.ndarray  # i[n_cols]: the original column id of each column
    col_ptr: np.ndarray  # i[n_cols + 1]: entries of column j are col_class/col_count[ptr[j]:ptr[j+1]]
    col_class: np.ndarray
    col_count: np.ndarray
    row_ptr: np.ndarray  # i[n_classes + 1]: columns of row c are row_col[ptr[c]:ptr[c+1]], ascending
    row_col: np.ndarray

    @classmethod
    def from_pairs(cls, classes: np.ndarray, cols: np.ndarray, n_classes: int, n_cols: int,
                   by_coverage: bool = False) -> "ClassMatrix":
        """Counts of each (class, column) pair among the given pairs (one per reflection);
        by_coverage: columns renumbered by decreasing coverage (stable), `order` old ids of the new."""
        keys, counts = np.unique(np.asarray(classes, np.int64) * n_cols + np.asarray(cols, np.int64),
                                 return_counts=True)
        classes, cols = np.divmod(keys, n_cols)
        order = np.arange(n_cols)
        if by_coverage:
            order = np.argsort(-np.bincount(cols, minlength=n_cols), kind="stable")
            rank = np.empty(n_cols, np.int64)
            rank[order] = np.arange(n_cols)
            cols = rank[cols]
        by_row, by_col = np.lexsort((cols, classes)), np.lexsort((classes, cols))
        col_ptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=n_cols))])
        row_ptr = np.concatenate([[0], np.cumsum(np.bincount(classes, minlength=n_classes))])
        return cls(n_classes, n_cols, order, col_ptr, classes[by_col], counts[by_col].astype(np.float64),
                   row_ptr, cols[by_row])

    def column(self, j: int) -> np.ndarray:
        """f[n_classes]: column j, dense."""
        out = np.zeros(self.n_classes)
        lo, hi = self.col_ptr[j], self.col_ptr[j + 1]
        out[self.col_class[lo:hi]] = self.col_count[lo:hi]
        return out

    def row_columns(self, c: int) -> np.ndarray:
        """Columns with a nonzero count in row c, ascending."""
        return self.row_col[self.row_ptr[c]:self.row_ptr[c + 1]]


def _greedy_class_fill(matrix: ClassMatrix, min_per_class: float, min_total: float, max_total: float) -> np.ndarray:
    """DIALS' `_loop_over_class_matrix` on a (n_classes, n_groups) count matrix whose
    columns are already sorted by coverage; returns the chosen columns (bool).

    Sequential by nature: one step per chosen group (not per reflection).
    """
    n_classes, n_cols = matrix.n_classes, matrix.n_cols
    unused = np.ones(n_cols, dtype=bool)

    def add_for(row, totals):
        cols = matrix.row_columns(row)
        candidates = cols[unused[cols]]
        if candidates.size == 0:
            return False
        unused[candidates[0]] = False
        totals += matrix.column(candidates[0])
        return True

    totals = matrix.column(0)
    unused[0] = False
    deficit = np.zeros(n_classes)
    total_deficit = 0.0
    while totals.min() < min_per_class and totals.sum() - total_deficit < max_total:
        row = int(np.argmin(totals))
        if not add_for(row, totals):
            deficit[row] = min_per_class - totals[row]
            total_deficit += min_per_class - totals[row]
            totals[row] = min_per_class
        if totals.sum() > max_total:
            return ~unused
    totals -= deficit
    n = totals.sum()
    if n < min_total and unused.any():
        c = int(np.count_nonzero(deficit))
        multiplier = int(floor(min_total * (n_classes - c) / (n * n_classes)) + 1)
        new_limit = min_per_class * multiplier
        has_deficit = deficit != 0
        totals[has_deficit] = new_limit
        while unused.any() and totals.min() < new_limit:
            row = int(np.argmin(totals))
            if not add_for(row, totals):
                totals[row] = new_limit
    return ~unused


def select_connected_across_datasets(
    group_id: np.ndarray,
    dataset_id: np.ndarray,
    intensity: np.ndarray,
    variance: np.ndarray,
    d_star_sq: np.ndarray,
    rows: np.ndarray,
    min_total: float,
    isigma_cutoff: float = 1.0,
    n_resolution_bins: int = 20,
) -> np.ndarray:
    """Quasi-random connected selection (§4.2 step 2): rows (n,) of the chosen groups.

    Groups with >= 2 members and mean I/sigma > cutoff are split into resolution bins
    (equal d*^2 steps, span widened by 1e-6, step >= 0.004); in each bin, groups are
    sorted by the number of datasets they cover and added greedily to fill the
    least-populated dataset (`_greedy_class_fill`).
    """
    pool = _groups_above_isigma(group_id, intensity, variance, rows, isigma_cutoff)
    n_datasets = np.unique(dataset_id[pool]).size
    min_per_class = min_total / (n_datasets * 4.0)
    max_total = min_total * 1.2
    mpc, mint, maxt = int(min_per_class / n_resolution_bins), int(min_total / n_resolution_bins), int(max_total / n_resolution_bins)
    dss = d_star_sq[pool]
    lo, hi = dss.min(), dss.max()
    span = hi - lo
    lo, hi = lo - span * 1e-6, hi + span * 1e-6
    step = max((hi - lo) / n_resolution_bins, 0.004)
    n_bins = max(int(ceil((hi - lo) / step)), 1)
    res_bin = np.clip(((d_star_sq - lo) / step).astype(np.int64), 0, n_bins - 1)
    # dataset ids of the pool renumbered 0..n_datasets-1 (the matrix rows)
    _, classes = np.unique(np.where(pool, dataset_id, -1), return_inverse=True)
    classes = classes.reshape(-1) - (1 if (~pool).any() else 0)
    chosen_group = np.zeros(int(group_id.max()) + 1, dtype=bool)
    for b in range(n_bins):  # <= 20 resolution bins
        in_bin = pool & (res_bin == b)
        if not in_bin.any():
            continue
        groups, col = np.unique(group_id[in_bin], return_inverse=True)
        counts = ClassMatrix.from_pairs(classes[in_bin], col.reshape(-1), n_datasets, groups.size, by_coverage=True)
        used = _greedy_class_fill(counts, mpc, mint, maxt)
        chosen_group[groups[counts.order[used]]] = True
    return pool & chosen_group[group_id]


def select_multi_dataset_quasi_random(
    group_id: np.ndarray,
    dataset_id: np.ndarray,
    intensity: np.ndarray,
    variance: np.ndarray,
    d_star_sq: np.ndarray,
    preselected: np.ndarray,
    rng: np.random.Generator,
    min_groups: int = 2000,
    min_reflections: int = 50000,
    isigma_cutoff: float = 1.0,
) -> Selection:
    """Multi-dataset `quasi_random` (§4.2): connected groups, per-dataset random groups and
    a random top-up across datasets; `details` holds the per-dataset counts DIALS logs."""
    n = group_id.size
    all_rows = np.ones(n, dtype=bool)
    m = np.bincount(group_id)
    m_over1 = m[m > 1]
    total_available = m_over1.sum()
    avg_m = m_over1.mean()
    total_target = max(avg_m * min_groups, min_reflections)
    qr_target = min(1000, min_groups) * avg_m
    connected = select_connected_across_datasets(
        group_id, dataset_id, intensity, variance, d_star_sq, all_rows, qr_target, isigma_cutoff
    )
    selected = connected.copy()
    n_qr = int(connected.sum())
    datasets = np.unique(dataset_id)
    min_cross = (total_target - n_qr) / (2.0 * datasets.size)
    pool = _groups_above_isigma(group_id, intensity, variance, all_rows, isigma_cutoff)
    dataset_index = np.searchsorted(datasets, dataset_id)
    individual = np.zeros(n, dtype=bool)
    if min_cross > 0:
        individual = _random_groups_per_dataset(group_id, dataset_index, datasets.size, pool & preselected, min_cross,
                                                rng)
    selected |= individual
    n_used = int(selected.sum())
    target_left = total_target - n_used
    pc_used = n_used / total_available
    across = np.zeros(n, dtype=bool)
    if target_left > 0 and pc_used < 1:
        n_groups = int(target_left * 1.05 / (1.0 - pc_used) / avg_m)
        across = _random_groups(group_id, pool, n_groups, rng)
    selected |= across
    def per_dataset(rows: np.ndarray) -> list[int]:
        return np.bincount(dataset_index[rows], minlength=datasets.size).tolist()

    details = {"dataset": datasets.tolist(), "connected": per_dataset(connected),
               "within_dataset": per_dataset(individual), "across_datasets": per_dataset(across),
               "total": per_dataset(selected)}
    return Selection(selected, int(np.unique(group_id[selected]).size), int(m_over1.size), details)


def select_multi_dataset_random(
    group_id: np.ndarray,
    intensity: np.ndarray,
    variance: np.ndarray,
    rng: np.random.Generator,
    min_groups: int = 2000,
    min_reflections: int = 50000,
    isigma_cutoff: float = 1.0,
) -> Selection:
    """Multi-dataset `random` (§4.3): random groups among those with m >= 2 and mean I/sigma > cutoff."""
    pool = _groups_above_isigma(group_id, intensity, variance, np.ones(group_id.size, bool), isigma_cutoff)
    n_avail = np.unique(group_id[pool]).size
    avg_m = pool.sum() / n_avail
    n_sel = max(min_groups, int(ceil(min_reflections / avg_m)))
    return Selection(_random_groups(group_id, pool, n_sel, rng), min(n_sel, n_avail), n_avail)


def quasi_normalised_esq(
    intensity: np.ndarray, miller_index: np.ndarray, cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup
) -> np.ndarray:
    """E^2 (n,) = I / N(h) by quasi-normalisation (outliers.md §6, cctbx's binner.interpolate).

    Negative I count as 0 in the bin means of I/epsilon; 20/15/10 equal-d*^2 bins for
    N > 20000 / > 15000 / otherwise; N(h) linear in d* between neighbouring bin centres.
    """
    dss = _d_star_sq(miller_index, cell)
    work = np.maximum(intensity, 0.0) / epsilon(miller_index, space_group)
    n = intensity.size
    n_bins = 20 if n > 20000 else 15 if n > 15000 else 10
    lo, hi = dss.min(), dss.max()
    span = hi - lo
    lo, hi = lo - span * 1e-6, hi + span * 1e-6
    step = (hi - lo) / n_bins
    b = np.clip(((dss - lo) / step).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.bincount(b, weights=work, minlength=n_bins) / count, 0.0)
    limits = np.sqrt(lo + step * np.arange(n_bins + 1))
    centres = limits[:-1] + (limits[1:] - limits[:-1]) / 2
    if n_bins == 1:
        return intensity / mean[b]
    x = np.sqrt(dss)
    low = np.where(x < centres[b], np.maximum(b - 1, 0), b)
    high = np.minimum(low + 1, n_bins - 1)
    low = high - 1
    norm = mean[low] + (x - centres[low]) * (mean[high] - mean[low]) / (centres[high] - centres[low])
    return intensity / norm


def select_intensity_ranges(
    esq: np.ndarray,
    intensity: np.ndarray,
    variance: np.ndarray,
    partiality: np.ndarray | None = None,
    d: np.ndarray | None = None,
    e2_range: tuple[float, float] = (0.8, 5.0),
    isigma_range: tuple[float, float] = (-5.0, 0.0),
    min_partiality: float = 0.95,
    d_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """`intensity_ranges` (§4.5): E^2 in range (skipped when every E^2 is 1) plus the preselection."""
    sel = preselection(intensity, variance, partiality, d, isigma_range, min_partiality, d_range)
    if not np.all(esq == 1.0):
        sel &= (esq > e2_range[0]) & (esq < e2_range[1])
    return sel
