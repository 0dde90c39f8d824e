"""ΔCC½ analysis and the scale-and-filter decision (merging_stats.md §8, overview.md §5.3).

DIALS' ΔCC½ (`dials.compute_delta_cchalf`, `filtering.method=deltacchalf`) uses its own
σ-τ CC½, not the half-dataset one of the merging table: per unique reflection h with
n_h > 1 observations x the mean m_h = Σx/n and the (unweighted) variance of that mean
v_h = (Σx² − (Σx)²/n)/((n − 1) n); per resolution bin (10 bins equal in 1/d² between the
data's extremes) σ_y² = Σ(m − m̄)²/(N − 1), σ_e² = mean(v), CC½ = (σ_y² − σ_e²)/(σ_y² + σ_e²);
the overall value is the N-weighted mean over bins holding N > 1 reflections.

ΔCC½ of a data group (a data set, or an image group within one) is CC½(all) − CC½(all but
the group). All leave-one-group-out values come from one pass: the sufficient statistics
(n, Σx, Σx²) per (group, h) pair are segment sums; removing a group changes only the
reflections it observed, so its per-bin sums are the all-data sums plus the change of
those reflections' (m, v) contributions — no per-group recomputation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import gemmi
import numpy as np

from jaxscale.data import flags as fl
from jaxscale.data import symmetry
from jaxscale.data.exclude import ImageRange, remove_ranges
from jaxscale.data.partials import FULL_PARTIALITY, sum_partials
from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError
from jaxscale.merge.statistics import MergingStatistics

GroupMode = Literal["dataset", "image_group"]
TERMINATION_REASONS = ("no_more_removed", "max_cycles", "max_percent_removed", "below_completeness_limit")


# --------------------------------------------------------------------------------------
# the data the analysis sees

@dataclass(frozen=True)
class DeltaCCObservations:
    """Scaled observations as DIALS' ΔCC½ selects them (export filter on 'scale')."""

    asu_group: np.ndarray      # (n,) int, unique-reflection index (non-anomalous ASU)
    miller_asu: np.ndarray     # (m, 3) int, ASU index of each unique reflection
    intensity: np.ndarray      # (n,) I / g
    d_star_sq: np.ndarray      # (n,) 1/d² with the mean unit cell
    dataset_id: np.ndarray     # (n,) int, the table's `id` (DIALS' dataset number)
    image: np.ndarray          # (n,) int, floor(z_px) + 1
    unit_cell: gemmi.UnitCell  # arithmetic mean of the experiments' cells

    def __len__(self) -> int:
        return int(self.intensity.shape[0])


def mean_unit_cell(experiments: Sequence) -> gemmi.UnitCell:
    """Arithmetic mean of the experiments' cell parameters (ΔCC½'s cell, not the median)."""
    params = np.array([e.unit_cell.parameters for e in experiments], dtype=np.float64)
    return gemmi.UnitCell(*params.mean(axis=0))


def delta_cchalf_observations(table: ReflectionTable, experiments: Sequence,
                              path: str | None = None) -> DeltaCCObservations:
    """Select and prepare the rows DIALS' ΔCC½ uses from a scaled table.

    Rows with id ≥ 0, not bad_for_scaling, g > 0, V > 0; I/g (and V/g²); partiality > 0;
    partials summed within each data set; then partiality ≥ 0.99. Indices mapped to the
    non-anomalous ASU of experiment 0's space group; 1/d² with the mean cell.
    """
    for col in ("miller_index", "id", "flags", "inverse_scale_factor", "intensity.scale.value",
                "intensity.scale.variance", "xyzobs.px.value"):
        if col not in table:
            raise InputError(path, f"reflection table has no column {col!r}; is it scaled?", field=col)
    ids = np.asarray(table["id"])
    g = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
    keep = ((ids >= 0) & ~fl.has_any(np.asarray(table["flags"]), fl.BAD_FOR_SCALING) & (g > 0)
            & (np.asarray(table["intensity.scale.variance"]) > 0))
    if "partiality" in table:
        keep &= np.asarray(table["partiality"]) > 0
    sub = table.select(np.flatnonzero(keep))
    g = g[keep]
    sub["intensity.scale.value"] = np.asarray(sub["intensity.scale.value"], dtype=np.float64) / g
    sub["intensity.scale.variance"] = np.asarray(sub["intensity.scale.variance"], dtype=np.float64) / g**2
    if "partiality" in sub:
        if "partial_id" in sub:  # DIALS sums partials per data set: key on (id, partial_id)
            sub["partial_id"] = ((np.asarray(sub["id"]).astype(np.uint64) << np.uint64(40))
                                 | np.asarray(sub["partial_id"]).astype(np.uint64))
            sub = sum_partials(sub).table
        sub = sub.select(np.flatnonzero(np.asarray(sub["partiality"]) >= FULL_PARTIALITY))
    if len(sub) == 0:
        raise InputError(path, "no scaled reflections left for the delta CC1/2 analysis")
    cell = mean_unit_cell(experiments)
    asu, _ = symmetry.map_to_asu(np.asarray(sub["miller_index"]), experiments[0].space_group)
    asu_group, unique = symmetry.group_ids(asu)
    z = np.asarray(sub["xyzobs.px.value"], dtype=np.float64)[:, 2]
    return DeltaCCObservations(
        asu_group=asu_group, miller_asu=unique,
        intensity=np.asarray(sub["intensity.scale.value"], dtype=np.float64),
        d_star_sq=symmetry.d_star_sq(asu, cell), dataset_id=np.asarray(sub["id"]).astype(np.int64),
        image=np.floor(z).astype(np.int64) + 1, unit_cell=cell)


# --------------------------------------------------------------------------------------
# data groups

@dataclass(frozen=True)
class DataGroups:
    """Observation -> data group, and what each group is (a data set or an image range)."""

    mode: GroupMode
    group_id: np.ndarray       # (n,) int in [0, n_groups)
    dataset_id: np.ndarray     # (G,) int, table id of each group's data set
    first_image: np.ndarray    # (G,) int, first image of the group (image_group mode; else -1)
    last_image: np.ndarray     # (G,) int, last image (inclusive; else -1)

    @property
    def n_groups(self) -> int:
        return int(self.dataset_id.shape[0])


def dataset_groups(dataset_id: np.ndarray) -> DataGroups:
    """One group per data set present, in increasing table id (DIALS' mode=dataset)."""
    ids, group_id = np.unique(np.asarray(dataset_id), return_inverse=True)
    none = np.full(ids.shape, -1, dtype=np.int64)
    return DataGroups("dataset", group_id.reshape(-1), ids.astype(np.int64), none, none)


def image_groups(dataset_id: np.ndarray, image: np.ndarray, group_size: int) -> DataGroups:
    """Image groups of `group_size` images per data set, as DIALS' mode=image_group forms them.

    Per data set, groups start at its first observed image and step by group_size; a last
    group shorter than group_size images (up to the last observed image) is merged into
    the one before. Groups are numbered data set by data set (increasing id), then by image.
    """
    dataset_id = np.asarray(dataset_id, dtype=np.int64)            # (n,)
    image = np.asarray(image, dtype=np.int64)                      # (n,)
    ids, ds = np.unique(dataset_id, return_inverse=True)
    ds = ds.reshape(-1)
    lo = np.full(ids.size, np.iinfo(np.int64).max)
    hi = np.full(ids.size, np.iinfo(np.int64).min)
    np.minimum.at(lo, ds, image)
    np.maximum.at(hi, ds, image)
    n_starts = (hi - lo) // group_size + 1                          # len(range(lo, hi + 1, size))
    last_start = lo + (n_starts - 1) * group_size
    short_tail = (n_starts > 1) & (hi - last_start < group_size - 1)
    n_per_ds = n_starts - short_tail                                # (D,) groups per data set
    offset = np.concatenate([[0], np.cumsum(n_per_ds)[:-1]])
    k = np.minimum((image - lo[ds]) // group_size, n_per_ds[ds] - 1)
    group_id = offset[ds] + k
    g_ds = np.repeat(np.arange(ids.size), n_per_ds)                 # (G,) data set position
    g_k = np.arange(g_ds.size) - offset[g_ds]
    first = lo[g_ds] + g_k * group_size
    last = np.where(g_k == n_per_ds[g_ds] - 1, hi[g_ds], first + group_size - 1)
    return DataGroups("image_group", group_id, ids[g_ds], first, last)


# --------------------------------------------------------------------------------------
# ΔCC½

@dataclass(frozen=True)
class DeltaCCResult:
    """CC½ of all data, with each group left out, and ΔCC½ = CC½_all − CC½_without."""

    cc_half: float                  # σ-τ CC½ of all data (DIALS' `mean_cc_half`)
    cc_half_without: np.ndarray     # (G,) CC½ with the group removed (NaN: group has no data)
    delta: np.ndarray               # (G,) ΔCC½ (NaN: group has no data)
    mean: float                     # mean ΔCC½ over groups with data
    sigma: float                    # population standard deviation of ΔCC½
    cutoff: float                   # mean − stdcutoff·sigma
    below_cutoff: np.ndarray        # (G,) bool, ΔCC½ < cutoff
    bin_limits: np.ndarray          # (n_bins + 1,) 1/d² bin limits
    cc_half_bins: np.ndarray        # (n_bins,) CC½ per bin, all data (NaN where N ≤ 1)
    n_refl_bins: np.ndarray         # (n_bins,) unique reflections with n > 1 per bin
    n_observations: int
    n_unique: int

    def sorted_values(self) -> tuple[np.ndarray, np.ndarray]:
        """(group ids, ΔCC½) from lowest to highest ΔCC½, groups without data left out."""
        groups = np.flatnonzero(np.isfinite(self.delta))
        order = np.argsort(self.delta[groups], kind="stable")
        return groups[order], self.delta[groups][order]


def _mean_and_variance(n: np.ndarray, s1: np.ndarray, s2: np.ndarray):
    """(used, mean, variance of the mean) per reflection from (n, Σx, Σx²); used = n > 1."""
    used = n > 1
    nn = np.where(used, n, 2).astype(np.float64)
    mean = s1 / nn
    var = (s2 - s1 * s1 / nn) / (nn - 1.0) / nn
    return used, np.where(used, mean, 0.0), np.where(used, var, 0.0)


def _cc_half_from_bin_sums(n: np.ndarray, sm: np.ndarray, sm2: np.ndarray, sv: np.ndarray):
    """(overall, per-bin) σ-τ CC½ from per-bin sums over reflections (..., n_bins).

    n: reflections; sm, sm2: Σ(m − c), Σ(m − c)² for a per-bin shift c; sv: Σv.
    """
    use = n > 1
    nn = np.where(use, n, 2.0)
    sigma_y = (sm2 - sm * sm / nn) / (nn - 1.0)
    sigma_e = sv / nn
    with np.errstate(divide="ignore", invalid="ignore"):
        cc = np.where(use, (sigma_y - sigma_e) / (sigma_y + sigma_e), np.nan)
    total = np.where(use, n, 0.0).sum(axis=-1)
    weighted = np.where(use, cc * n, 0.0).sum(axis=-1)
    overall = np.where(total > 0, weighted / np.where(total > 0, total, 1.0), 0.0)
    return overall, cc


def resolution_bins(d_star_sq: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin index (n,), limits (n_bins + 1,)): n_bins equal steps in 1/d² over the data's range.

    DIALS' ResolutionBinner: limits from the largest and smallest d, index
    floor((1/d² − x_min)/step) clamped to the bins.
    """
    d = 1.0 / np.sqrt(np.asarray(d_star_sq, dtype=np.float64))
    x_min, x_max = 1.0 / d.max() ** 2, 1.0 / d.min() ** 2
    if not x_max > x_min:
        raise InputError(None, "delta CC1/2 needs data at more than one resolution")
    step = (x_max - x_min) / n_bins
    index = np.clip(np.floor((1.0 / d**2 - x_min) / step).astype(np.int64), 0, n_bins - 1)
    return index, x_min + step * np.arange(n_bins + 1)


def compute_delta_cchalf(asu_group: np.ndarray, intensity: np.ndarray, d_star_sq: np.ndarray,
                         group_index: np.ndarray, n_groups: int, *, n_bins: int = 10,
                         stdcutoff: float = 4.0) -> DeltaCCResult:
    """ΔCC½ of every data group by the leave-one-group-out σ-τ CC½ (DIALS' estimator).

    asu_group (n,): unique-reflection index; intensity (n,): I/g (unweighted: σ is not
    used by this estimator); d_star_sq (n,): 1/d² (equal within a reflection);
    group_index (n,): data group in [0, n_groups).
    """
    h_raw = np.asarray(asu_group)
    x = np.asarray(intensity, dtype=np.float64)
    grp = np.asarray(group_index, dtype=np.int64)
    _, first, h = np.unique(h_raw, return_index=True, return_inverse=True)
    h = h.reshape(-1)
    n_h_total = first.size
    ibin, limits = resolution_bins(np.asarray(d_star_sq, dtype=np.float64)[first], n_bins)  # (H,)

    # all data: per reflection, then per bin (shifted by the bin mean for precision)
    n_h = np.bincount(h, minlength=n_h_total).astype(np.float64)
    s1_h = np.bincount(h, x, minlength=n_h_total)
    s2_h = np.bincount(h, x * x, minlength=n_h_total)
    used, m, v = _mean_and_variance(n_h, s1_h, s2_h)
    n_b = np.bincount(ibin, used, minlength=n_bins).astype(np.float64)
    shift = np.bincount(ibin, m, minlength=n_bins) / np.maximum(n_b, 1.0)       # (n_bins,)
    mc = np.where(used, m - shift[ibin], 0.0)
    sm_b = np.bincount(ibin, mc, minlength=n_bins)
    sm2_b = np.bincount(ibin, mc * mc, minlength=n_bins)
    sv_b = np.bincount(ibin, v, minlength=n_bins)
    cc_all, cc_bins = _cc_half_from_bin_sums(n_b, sm_b, sm2_b, sv_b)

    # (group, reflection) pairs: what each group contributes to each reflection
    pair_key = grp * n_h_total + h
    pairs, pair = np.unique(pair_key, return_inverse=True)
    pair = pair.reshape(-1)
    pg, ph = pairs // n_h_total, pairs % n_h_total                               # (P,)
    n_p = np.bincount(pair, minlength=pairs.size).astype(np.float64)
    s1_p = np.bincount(pair, x, minlength=pairs.size)
    s2_p = np.bincount(pair, x * x, minlength=pairs.size)
    used_w, m_w, v_w = _mean_and_variance(n_h[ph] - n_p, s1_h[ph] - s1_p, s2_h[ph] - s2_p)
    mc_w = np.where(used_w, m_w - shift[ibin[ph]], 0.0)
    # change of the per-bin sums when the group is removed, accumulated per (group, bin)
    cell = pg * n_bins + ibin[ph]
    size = n_groups * n_bins
    d_n = np.bincount(cell, used_w.astype(np.float64) - used[ph], minlength=size)
    d_sm = np.bincount(cell, mc_w - mc[ph], minlength=size)
    d_sm2 = np.bincount(cell, mc_w * mc_w - mc[ph] ** 2, minlength=size)
    d_sv = np.bincount(cell, v_w - v[ph], minlength=size)
    shape = (n_groups, n_bins)
    cc_without, _ = _cc_half_from_bin_sums(n_b + d_n.reshape(shape), sm_b + d_sm.reshape(shape),
                                           sm2_b + d_sm2.reshape(shape), sv_b + d_sv.reshape(shape))
    present = np.bincount(grp, minlength=n_groups) > 0
    cc_without = np.where(present, cc_without, np.nan)
    delta = cc_all - cc_without
    values = delta[present]
    mean = float(values.mean()) if values.size else float("nan")
    sigma = float(np.sqrt(np.mean((values - mean) ** 2))) if values.size else float("nan")
    cutoff = mean - stdcutoff * sigma
    return DeltaCCResult(
        cc_half=float(cc_all), cc_half_without=cc_without, delta=delta, mean=mean, sigma=sigma,
        cutoff=cutoff, below_cutoff=present & (np.nan_to_num(delta, nan=np.inf) < cutoff),
        bin_limits=limits, cc_half_bins=cc_bins, n_refl_bins=n_b.astype(np.int64),
        n_observations=int(x.size), n_unique=int(n_h_total))


def delta_cchalf(obs: DeltaCCObservations, groups: DataGroups, *, n_bins: int = 10,
                 stdcutoff: float = 4.0) -> DeltaCCResult:
    """`compute_delta_cchalf` on prepared observations and their groups."""
    if groups.n_groups < 2:
        what = "data set" if groups.mode == "dataset" else "image group"
        raise InputError(None, f"delta CC1/2 needs more than one {what}"
                         + ("; use mode=image_group" if groups.mode == "dataset" else
                            "; choose a smaller group_size"), field="filtering.deltacchalf")
    return compute_delta_cchalf(obs.asu_group, obs.intensity, obs.d_star_sq, groups.group_id,
                                groups.n_groups, n_bins=n_bins, stdcutoff=stdcutoff)


# --------------------------------------------------------------------------------------
# which groups to remove

@dataclass(frozen=True)
class Removal:
    """What one filter cycle removes (DIALS' `dataset_removal`)."""

    flagged: np.ndarray                                  # (G,) bool, ΔCC½ below the cutoff
    removed_groups: np.ndarray                           # (k,) group ids removed, in DIALS' order
    image_ranges_removed: list[tuple[ImageRange, int]]   # ((first, last), data set id), image_group mode
    exclude_images: list[tuple[int, int, int]]           # (data set id, first, last) to exclude, incl.
                                                         # valid ranges left without any tested image
    valid_image_ranges: dict[int, list[ImageRange] | None]  # new valid ranges per data set id
    datasets_removed: list[int]                          # table ids of data sets removed entirely


def choose_removals(result: DeltaCCResult, groups: DataGroups,
                    valid_image_ranges: Mapping[int, list[ImageRange] | None] | None = None) -> Removal:
    """Groups to remove after a ΔCC½ analysis, by DIALS' rules.

    mode=dataset: every data set with ΔCC½ < cutoff goes. mode=image_group: a flagged group
    goes only from an edge of its sweep — repeatedly, so the flagged runs at the start and
    end of each sweep go and flagged groups inside stay; their images are excluded; a
    remaining valid range without any image of an analysed group is excluded too; a data set
    left without valid images is removed. `valid_image_ranges` (table id -> ranges; None for
    a scanless one) are the data sets' current valid ranges, by default the groups' span.
    (max_percent_removed / min_completeness do not cap a cycle in DIALS: they end the cycles,
    see `termination_reason`.)
    """
    flagged = np.asarray(result.below_cutoff, dtype=bool)
    if groups.mode == "dataset":
        removed = np.flatnonzero(flagged)
        gone = [int(i) for i in groups.dataset_id[removed]]
        current = dict(valid_image_ranges or {})
        ranges = {int(i): ([] if int(i) in gone else current.get(int(i))) for i in groups.dataset_id}
        return Removal(flagged, removed, [], [], ranges, gone)

    # image groups are numbered consecutively within each data set (see image_groups)
    ids, ds = np.unique(groups.dataset_id, return_inverse=True)
    ds = ds.reshape(-1)
    n_per_ds = np.bincount(ds, minlength=ids.size)
    offset = np.concatenate([[0], np.cumsum(n_per_ds)[:-1]])
    pos = np.arange(groups.n_groups) - offset[ds]                  # (G,) position in its sweep
    kept = (~flagged).astype(np.int64)
    kept_before = np.cumsum(kept) - kept - np.repeat(np.cumsum(kept)[offset] - kept[offset], n_per_ds)
    kept_after = np.repeat(np.bincount(ds, kept, minlength=ids.size), n_per_ds) - kept_before - kept
    prefix = flagged & (kept_before == 0)
    suffix = flagged & (kept_after == 0) & ~prefix
    # DIALS removes edge groups in rounds over sorted ids: a leading run all in round 1, the
    # j-th group from the end of a trailing run in round j + 1
    round_ = np.where(prefix, 1, n_per_ds[ds] - pos)
    removed = np.flatnonzero(prefix | suffix)
    removed = removed[np.lexsort((removed, round_[removed]))]
    image_ranges_removed = [((int(groups.first_image[g]), int(groups.last_image[g])),
                             int(groups.dataset_id[g])) for g in removed]
    exclude = [(d, a, b) for (a, b), d in image_ranges_removed]

    lo = np.full(ids.size, np.iinfo(np.int64).max)
    hi = np.full(ids.size, np.iinfo(np.int64).min)
    np.minimum.at(lo, ds, groups.first_image)
    np.maximum.at(hi, ds, groups.last_image)
    tested = {int(i): (int(a), int(b)) for i, a, b in zip(ids, lo, hi)}
    current = (dict(valid_image_ranges) if valid_image_ranges is not None
               else {i: [span] for i, span in tested.items()})
    new_ranges: dict[int, list[ImageRange] | None] = {}
    gone = []
    for dataset, ranges in current.items():  # loop over data sets (decision logic, once per cycle)
        dataset = int(dataset)
        if ranges is None:
            new_ranges[dataset] = None
            continue
        left = remove_ranges(list(ranges), [(a, b) for d, a, b in exclude if d == dataset])
        span = tested.get(dataset)
        untested = [r for r in left if span is None or r[1] < span[0] or r[0] > span[1]]
        if untested:
            exclude += [(dataset, a, b) for a, b in untested]
            left = remove_ranges(left, untested)
        new_ranges[dataset] = left
        if not left:
            gone.append(dataset)
    return Removal(flagged, removed, image_ranges_removed, exclude, new_ranges, gone)


def termination_reason(cycle: int, n_removed: int, cumul_percent_removed: float,
                       completeness_percent: float | None, *, max_cycles: int,
                       max_percent_removed: float, min_completeness: float | None) -> str | None:
    """Why the scale-and-filter cycles stop after this cycle (1-based), or None to go on.

    DIALS' order: nothing removed; more than max_percent_removed % of the initial reflections
    removed in total; overall completeness (%) below min_completeness; max_cycles reached.
    (DIALS 3.12 reads the completeness under a key its results do not have, so
    min_completeness raises there; here it is the overall completeness of the cycle.)
    """
    if n_removed == 0:
        return "no_more_removed"
    if cumul_percent_removed > max_percent_removed:
        return "max_percent_removed"
    if min_completeness and completeness_percent is not None and completeness_percent < min_completeness:
        return "below_completeness_limit"
    if cycle == max_cycles:
        return "max_cycles"
    return None


# --------------------------------------------------------------------------------------
# scale_and_filter_results.json

def _scalar(x):
    """Python float/int of a numpy scalar (JSON-ready)."""
    return x.item() if hasattr(x, "item") else x


def merging_stats_summary(stats: MergingStatistics) -> dict:
    """The per-cycle merging statistics DIALS keeps (AnalysisResults' parsed form)."""
    bins, overall = stats.bins, stats.overall
    return {
        "ccs": bins.cc_half.tolist(),
        "rmerge": bins.r_merge.tolist(),
        "rpim": bins.r_pim.tolist(),
        "d_min": bins.d_min.tolist(),
        "overall": {
            "cc_one_half": _scalar(overall.cc_half[0]),
            "r_merge": _scalar(overall.r_merge[0]),
            "r_pim": _scalar(overall.r_pim[0]),
            "i_over_sigma_mean": _scalar(overall.i_over_sigma_mean[0]),
            "completeness": 100.0 * _scalar(overall.completeness[0]),
            "n_obs": int(overall.n_obs[0]),
        },
    }


def cycle_results(stats: MergingStatistics, result: DeltaCCResult, removal: Removal,
                  groups: DataGroups, n_removed: int, identifiers: Mapping[int, str],
                  previous: Sequence[dict], initial_n_reflections: int) -> dict:
    """One entry of `cycle_results` in DIALS' layout.

    n_removed: reflections that lost the `scaled` flag this cycle; identifiers: table id ->
    experiment identifier; previous: the earlier cycles' entries (for the cumulative %).
    """
    out: dict = {"merging_stats": merging_stats_summary(stats)}
    out["delta_cc_half_values"] = result.sorted_values()[1].tolist()
    out["mean_cc_half"] = result.cc_half
    if groups.mode == "image_group":
        out["image_ranges_removed"] = [[list(r), d] for r, d in removal.image_ranges_removed]
    out["removed_datasets"] = [identifiers[i] for i in removal.datasets_removed]
    out["removed_ids"] = list(removal.datasets_removed)
    out["n_removed"] = int(n_removed)
    total = sum(c["n_removed"] for c in previous) + int(n_removed)
    out["cumul_percent_removed"] = 100.0 * total / initial_n_reflections
    return out


def scale_and_filter_results(cycles: Sequence[dict], termination: str, initial_n_reflections: int,
                             initial_expids_and_image_ranges: Sequence[tuple[str, ImageRange] | None],
                             expids_and_image_ranges: Sequence[tuple[str, list[ImageRange]] | None],
                             final_stats: MergingStatistics | None) -> dict:
    """The `filtering.output.scale_and_filter_results` JSON document (AnalysisResults.to_dict).

    cycles: `cycle_results` entries; initial_expids_and_image_ranges: (identifier, scan image
    range) per experiment at the first cycle; expids_and_image_ranges: (identifier, valid
    ranges) after the last cycle; None for scanless experiments.
    """
    if termination not in TERMINATION_REASONS:
        raise ValueError(f"unknown termination reason {termination!r}")
    return {
        "termination_reason": termination,
        "initial_n_reflections": int(initial_n_reflections),
        "initial_expids_and_image_ranges": [
            None if e is None else [e[0], [int(e[1][0]), int(e[1][1])]]
            for e in initial_expids_and_image_ranges],
        "expids_and_image_ranges": [
            None if e is None else [e[0], [[int(a), int(b)] for a, b in e[1]]]
            for e in expids_and_image_ranges],
        "cycle_results": {str(i + 1): c for i, c in enumerate(cycles)},
        "final_stats": None if final_stats is None else merging_stats_summary(final_stats),
    }
