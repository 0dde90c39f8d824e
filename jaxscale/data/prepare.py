"""Per-dataset input preparation (spec overview.md §1 steps 3, 4, 8, 9 and §3 steps 1-4).

Row flags follow DIALS 3.12: user-requested cuts (images, resolution, partiality) set
`user_excluded_in_scaling`; the integration-quality filter and non-positive variances set
`excluded_for_scaling`. Rows are never removed, except partials merged into another row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import gemmi
import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.partials import sum_partials
from jaxscale.data.symmetry import d_spacing
from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import JaxscaleError

INTENSITY_CHOICES = ("combine", "profile", "sum")


class UnusableDatasetError(JaxscaleError):
    """No reflection of a dataset survives the integration-quality filter.

    DIALS drops such a dataset from a multi-dataset job and stops a single-dataset one.
    """


@dataclass
class PrepareCounts:
    """Row counts for the log; all after partial summation unless named `_input`."""

    n_input: int
    n_partials_combined: int
    n_rows: int
    n_user_excluded_images: int
    n_user_excluded_resolution: int
    n_user_excluded_partiality: int
    n_user_excluded: int  # rows flagged user_excluded_in_scaling (any reason)
    n_excluded: int  # rows flagged excluded_for_scaling
    n_user_excluded_or_excluded: int  # DIALS' "Excluding n/N reflections"
    n_suitable: int


@dataclass
class PreparedDataset:
    table: ReflectionTable  # with `intensity`, `variance`, `prescaling_correction`, `inverse_scale_factor`
    counts: PrepareCounts
    kept_rows: np.ndarray  # (n_rows,) index of each row in the input table
    intensity_choice: str  # "profile" or "sum" or "combine" as actually applied
    reasons: dict[str, int] = field(default_factory=dict)  # rows removed by each filter step


# --- §1: flags set from user options --------------------------------------------------
def reset_scaling_flags(table: ReflectionTable) -> None:
    """Clear bad_for_scaling and scaled bits on every row (a re-run starts clean)."""
    table["flags"] = F.clear_bits(table["flags"], F.BAD_FOR_SCALING | F.SCALED)


def user_exclusion_masks(
    table: ReflectionTable,
    best_cell: gemmi.UnitCell | None = None,
    d_min: float | None = None,
    d_max: float | None = None,
    partiality_cutoff: float | None = 0.4,
) -> dict[str, np.ndarray]:
    """Rows to flag user_excluded for each cut: {"resolution": (n,), "partiality": (n,)}.

    d from the best (median) cell as DIALS does: d < d_min or d > d_max. Partiality below
    the cutoff (0.4 by default; 0 or None disables).
    """
    n = len(table)
    resolution = np.zeros(n, dtype=bool)
    if d_min or d_max:
        if best_cell is None:
            raise ValueError("a d_min/d_max cut needs the best unit cell")
        d = d_spacing(table["miller_index"], best_cell)
        if d_min:
            resolution |= d < d_min
        if d_max:
            resolution |= d > d_max
    partiality = np.zeros(n, dtype=bool)
    if partiality_cutoff and "partiality" in table:
        partiality = np.asarray(table["partiality"]) < partiality_cutoff
    return {"resolution": resolution, "partiality": partiality}


# --- §3.1: integration-quality filter -------------------------------------------------
def _reducer_kinds(table: ReflectionTable, intensity_choice: str) -> tuple[str, list[str]] | None:
    """(reducer name, intensity kinds it checks) as DIALS' filter_bad_reflections picks them."""
    has_sum = "intensity.sum.value" in table
    has_prf = "intensity.prf.value" in table
    if intensity_choice == "combine":
        if has_sum and has_prf:
            return "sum|prf", ["sum", "prf"]
        if has_prf:
            return "prf", ["prf"]
        if has_sum:
            return "sum", ["sum"]
        return None
    kind = {"profile": "prf", "sum": "sum"}[intensity_choice]
    if f"intensity.{kind}.value" not in table:
        raise UnusableDatasetError(f"intensity_choice={intensity_choice} but no intensity.{kind} column")
    return kind, [kind]


def _qe(table: ReflectionTable) -> np.ndarray | None:
    if "qe" in table:
        return np.asarray(table["qe"], dtype=np.float64)
    if "dqe" in table:
        return np.asarray(table["dqe"], dtype=np.float64)
    return None


def integration_quality_filter(
    table: ReflectionTable,
    intensity_choice: str = "combine",
    partiality_cutoff: float = 0.4,
    min_isigi: float = -5.0,
) -> tuple[np.ndarray, dict[str, int]]:
    """Rows (n,) that pass DIALS' integration-quality filter, and rows removed per step.

    The steps of DIALS' filter_for_export (without partial combination), each applied to
    the rows still passing: id >= 0; integrated by the chosen method(s) (for "sum|prf"
    either flag); variance > 0 where integrated by that method; qe (or dqe) > 0;
    partiality > 0; partiality >= cutoff; I/sigma >= min_isigi for every checked kind
    after the LP/QE/partiality conversion (NaN ratios pass, -inf fails, as in DIALS).
    Raises UnusableDatasetError where DIALS gives up on the dataset (no profile-fitted
    rows for a profile reducer, or no row left after some step).
    """
    n = len(table)
    reducer = _reducer_kinds(table, intensity_choice)
    if reducer is None:
        return np.ones(n, dtype=bool), {}
    name, kinds = reducer
    flags = table["flags"]
    good = np.ones(n, dtype=bool)
    removed: dict[str, int] = {}

    def step(label: str, keep: np.ndarray) -> None:
        nonlocal good
        new = good & keep
        removed[label] = int(good.sum() - new.sum())
        good = new
        if not good.any():
            raise UnusableDatasetError(f"no reflections left after the '{label}' filter")

    if "id" in table:
        step("unassigned (id < 0)", np.asarray(table["id"]) >= 0)
    if name in ("sum|prf", "prf") and not (good & F.has_all(flags, F.INTEGRATED_PRF)).any():
        raise UnusableDatasetError("no profile-fitted (integrated_prf) reflections")
    integrated = {
        "sum|prf": F.has_any(flags, F.INTEGRATED),
        "prf": F.has_all(flags, F.INTEGRATED_PRF),
        "sum": F.has_all(flags, F.INTEGRATED_SUM),
    }[name]
    step("not integrated", integrated)
    flag_of = {"sum": F.INTEGRATED_SUM, "prf": F.INTEGRATED_PRF}
    for k in kinds:
        bad = (np.asarray(table[f"intensity.{k}.variance"]) <= 0) & F.has_all(flags, flag_of[k])
        step(f"{k} variance <= 0", ~bad)

    # LP/QE and partiality conversion (DIALS order: the prf reducer checks partiality first)
    qe = _qe(table)
    partiality = np.asarray(table["partiality"], dtype=np.float64) if "partiality" in table else None
    if name == "prf" and partiality is not None:
        step("partiality <= 0", partiality > 0.0)
    if qe is not None:
        step("qe <= 0", qe > 0.0)
    conversion = np.ones(n)
    with np.errstate(divide="ignore", invalid="ignore"):  # values on dropped rows are unused
        if qe is not None:
            conversion = conversion / qe
        if "lp" in table:
            conversion = conversion * np.asarray(table["lp"], dtype=np.float64)
    if name != "prf" and partiality is not None:
        step("partiality <= 0", partiality > 0.0)
    if partiality is not None:
        step(f"partiality < {partiality_cutoff}", ~(partiality < partiality_cutoff))

    if min_isigi:
        with np.errstate(divide="ignore", invalid="ignore"):
            for k in ("sum", "prf"):  # DIALS' order of `intensities`
                if k not in kinds:
                    continue
                c = conversion
                if k == "sum" and partiality is not None:
                    c = conversion / partiality
                i = np.asarray(table[f"intensity.{k}.value"], dtype=np.float64) * c
                v = np.asarray(table[f"intensity.{k}.variance"], dtype=np.float64) * (c * c)
                step(f"{k} I/sigma < {min_isigi}", ~(i / np.sqrt(v) < min_isigi))
    return good, removed


# --- §3.4: initial intensities --------------------------------------------------------
def prescaling_correction(table: ReflectionTable) -> np.ndarray:
    """conv (n,) = lp / qe (qe, else dqe; factor 1 where qe <= 0 or a column is absent)."""
    conv = np.ones(len(table))
    if "lp" in table:
        conv = conv * np.asarray(table["lp"], dtype=np.float64)
    qe = _qe(table)
    if qe is not None:
        inverse_qe = np.ones(len(table))
        np.divide(1.0, qe, out=inverse_qe, where=qe > 0.0)
        conv = conv * inverse_qe
    return conv


def inverse_partiality(table: ReflectionTable) -> np.ndarray:
    """1/p (n,), with 1 where p <= 0 or no partiality column."""
    inv = np.ones(len(table))
    if "partiality" in table:
        p = np.asarray(table["partiality"], dtype=np.float64)
        np.divide(1.0, p, out=inv, where=p > 0.0)
    return inv


def choose_initial_intensities(table: ReflectionTable, intensity_choice: str = "combine") -> str:
    """Add `intensity`, `variance`, `prescaling_correction`; flag V <= 0 excluded.

    profile: I_prf conv; sum: I_sum conv / p; combine: sum values, overwritten by profile
    values on rows flagged integrated_prf. Returns the choice actually applied ("sum" when
    profile values are absent or no row is profile-fitted).
    """
    choice = intensity_choice
    if "intensity.prf.value" not in table:
        choice = "sum"
    elif choice == "profile" and not F.has_all(table["flags"], F.INTEGRATED_PRF).any():
        choice = "sum"
    elif "intensity.sum.value" not in table:
        choice = "profile"  # (DIALS would fail here)
    conv = prescaling_correction(table)
    table["prescaling_correction"] = conv
    if choice == "profile":
        intensity = np.asarray(table["intensity.prf.value"], dtype=np.float64) * conv
        variance = np.asarray(table["intensity.prf.variance"], dtype=np.float64) * conv * conv
    else:
        inv_p = inverse_partiality(table)
        sum_conv = conv * inv_p
        i_sum = np.asarray(table["intensity.sum.value"], dtype=np.float64)
        intensity = i_sum * conv * inv_p
        variance = np.asarray(table["intensity.sum.variance"], dtype=np.float64) * (sum_conv * sum_conv)
        if "partiality" in table and "partiality.inv.variance" in table:
            variance = variance + i_sum * conv * np.asarray(table["partiality.inv.variance"])
        if choice == "combine":
            prf = F.has_all(table["flags"], F.INTEGRATED_PRF)
            intensity = np.where(prf, np.asarray(table["intensity.prf.value"]) * conv, intensity)
            variance = np.where(prf, np.asarray(table["intensity.prf.variance"]) * conv * conv, variance)
    table["intensity"] = intensity
    table["variance"] = variance
    table["flags"] = F.set_bits(table["flags"], variance <= 0.0, F.EXCLUDED_FOR_SCALING)
    return choice


def init_inverse_scale(table: ReflectionTable) -> None:
    """`inverse_scale_factor` = 1 where the column is absent or entirely zero."""
    if "inverse_scale_factor" not in table or not np.any(table["inverse_scale_factor"] != 0.0):
        table["inverse_scale_factor"] = np.ones(len(table))


# --- the whole per-dataset preparation --------------------------------------------------
def prepare_dataset(
    table: ReflectionTable,
    *,
    intensity_choice: str = "combine",
    partiality_cutoff: float = 0.4,
    min_isigi: float = -5.0,
    best_cell: gemmi.UnitCell | None = None,
    d_min: float | None = None,
    d_max: float | None = None,
    image_excluded: np.ndarray | None = None,
    reset_flags: bool = True,
) -> PreparedDataset:
    """DIALS' preparation of one dataset's table, as dials.scale does before scaling.

    In order: flag reset (bad_for_scaling, scaled); user_excluded for rows on excluded
    images (`image_excluded` (n,), from `exclude.apply_exclude_images`), outside
    d_min/d_max (best cell) or below the partiality cutoff; the integration-quality filter
    (excluded); partial summation (rows merged away); inverse_scale_factor = 1; initial
    intensities (excluded where V <= 0). The input table is not modified.
    """
    if intensity_choice not in INTENSITY_CHOICES:
        raise ValueError(f"intensity_choice must be one of {INTENSITY_CHOICES}")
    # shallow copy: every column changed below is replaced by a new array, never edited
    work = ReflectionTable(dict(table.columns), dict(table.identifiers), dict(table.dials_types))
    n_input = len(work)
    if reset_flags:
        reset_scaling_flags(work)
    flags = work["flags"]
    images = np.zeros(n_input, dtype=bool) if image_excluded is None else np.asarray(image_excluded, bool)
    flags = F.set_bits(flags, images, F.USER_EXCLUDED_IN_SCALING)
    flags = F.clear_bits(flags, F.SCALED, where=images)
    cuts = user_exclusion_masks(work, best_cell, d_min, d_max, partiality_cutoff)
    for mask in cuts.values():
        flags = F.set_bits(flags, mask, F.USER_EXCLUDED_IN_SCALING)
    work["flags"] = flags

    good, removed = integration_quality_filter(work, intensity_choice, partiality_cutoff, min_isigi)
    work["flags"] = F.set_bits(work["flags"], ~good, F.EXCLUDED_FOR_SCALING)

    summed = sum_partials(work)
    work, kept = summed.table, summed.kept_rows
    init_inverse_scale(work)
    applied = choose_initial_intensities(work, intensity_choice)

    user = F.has_any(work["flags"], F.USER_EXCLUDED_IN_SCALING)
    excluded = F.has_any(work["flags"], F.EXCLUDED_FOR_SCALING)
    counts = PrepareCounts(
        n_input=n_input,
        n_partials_combined=summed.n_combined,
        n_rows=len(work),
        n_user_excluded_images=int(images[kept].sum()),
        n_user_excluded_resolution=int(cuts["resolution"][kept].sum()),
        n_user_excluded_partiality=int(cuts["partiality"][kept].sum()),
        n_user_excluded=int(user.sum()),
        n_excluded=int(excluded.sum()),
        n_user_excluded_or_excluded=int((user | excluded).sum()),
        n_suitable=int((~(user | excluded)).sum()),
    )
    if counts.n_suitable == 0:
        raise UnusableDatasetError("all reflections were determined to be unsuitable for scaling")
    return PreparedDataset(work, counts, kept, applied, removed)


def suitable_for_scaling(table: ReflectionTable) -> np.ndarray:
    """Rows (n,) neither user_excluded nor excluded (outliers count as suitable)."""
    return ~F.has_any(table["flags"], F.USER_EXCLUDED_IN_SCALING | F.EXCLUDED_FOR_SCALING)
