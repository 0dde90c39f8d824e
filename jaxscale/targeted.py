"""Targeted scaling: data sets scaled against a fixed I_h (overview.md §5.2, target.md §4).

Two cases, as dials.scale:

* `scaling_options.target_cycle` (default on) with scaled and unscaled data sets mixed: the
  unscaled ones are scaled against the merged intensities of the scaled ones (I_h fixed,
  the scaled models fixed); then, unless `only_target`, all data sets go through the
  normal joint algorithm. With `only_target` the targeted algorithm finishes (below) and
  `only_save_targeted` writes only the newly scaled data sets.
* a reference (`scaling_options.reference`, or the deprecated `target_mtz` / `target_model`):
  every data set is scaled against the reference intensities (a merged MTZ, or |F_calc|^2 of
  a model at d_min = cut_data.d_min or 2.0 A), then the targeted algorithm finishes:
  outliers against the reference, L-BFGS, the full-matrix round when the engine is
  SimpleLBFGS, outliers; the error model is not refined; the reference is not written.

With I_h fixed the data sets are independent, so one joint minimisation over all of them
gives what DIALS' one-data-set-at-a-time loop gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gemmi
import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.symmetry import group_ids, map_to_asu, pack_hkl
from jaxscale.errors.outliers import targeted_outliers
from jaxscale.exceptions import InputError, ParameterError

MODEL_D_MIN = 2.0  # d_min of model-calculated intensities without cut_data.d_min (DIALS)


@dataclass(frozen=True)
class Reference:
    """Reference intensities on unique Miller indices (any setting of the space group)."""

    miller: np.ndarray  # i[m, 3]
    intensity: np.ndarray  # f[m]
    variance: np.ndarray  # f[m] (0: exact, e.g. calculated from a model)
    source: str


@dataclass(frozen=True)
class TargetPlan:
    """Whether and how a run starts with targeted scaling."""

    active: bool
    reference_path: str | None
    targets: np.ndarray  # bool per data set: supplies I_h (already scaled), not refined
    only_target: bool


def reference_path(params: Any) -> str | None:
    """`reference=`, or the deprecated target_mtz / target_model (only one may be given)."""
    so = params.scaling_options
    given = [p for p in (so.reference, so.target_mtz, so.target_model) if p]
    if len(given) > 1:
        raise ParameterError("give only one of scaling_options.reference, target_mtz and target_model")
    return str(given[0]) if given else None


def plan(params: Any, model: Any) -> TargetPlan:
    """The targeted-scaling plan for a built model (which data sets are already scaled)."""
    scaled = np.array([model.states[k].is_scaled for k in model.dataset_indices], dtype=bool)
    path = reference_path(params)
    if path is not None:
        return TargetPlan(True, path, np.zeros_like(scaled), True)
    so = params.scaling_options
    mixed = bool(so.target_cycle and scaled.size > 1 and scaled.any() and not scaled.all())
    return TargetPlan(mixed, None, scaled, bool(so.only_target))


# ------------------------------------------------------------------------- references
def _intensity_columns(mtz: gemmi.Mtz, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hkl (m, 3), I (m,), sigma (m,)) from a merged MTZ: IMEAN-like (J + Q), else
    I(+)/I(-) (K + M, both as reflections of hkl and -hkl), else amplitudes squared (F + Q)."""
    cols = list(mtz.columns)
    data = np.array(mtz, dtype=np.float64)  # (m, n_columns), H K L first
    hkl = data[:, :3].astype(np.int32)

    def pair(kind: str, sig: str):
        for i, c in enumerate(cols[:-1]):
            if c.type == kind and cols[i + 1].type == sig:
                return i, i + 1
        return None

    def finite(h, i, s):
        ok = np.isfinite(i) & np.isfinite(s)
        return h[ok], i[ok], s[ok]

    found = pair("J", "Q")
    if found:
        return finite(hkl, data[:, found[0]], data[:, found[1]])
    found = pair("K", "M")
    if found:
        i, s = found
        j, t = i + 2, i + 3
        if j + 1 < len(cols) and cols[j].type == "K":
            return finite(np.r_[hkl, -hkl], np.r_[data[:, i], data[:, j]], np.r_[data[:, s], data[:, t]])
        return finite(hkl, data[:, i], data[:, s])
    found = pair("F", "Q")
    if found:
        f, s = data[:, found[0]], data[:, found[1]]
        return finite(hkl, f * f, 2.0 * np.abs(f) * s)
    raise InputError(path, "no intensity (J+Q, K+M) or amplitude (F+Q) columns in the reference MTZ")


def reference_from_mtz(path: str) -> Reference:
    """Merged intensities (and sigmas) of a reference MTZ file."""
    try:
        mtz = gemmi.read_mtz_file(path)
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the reference MTZ: {exc}") from None
    hkl, inten, sigma = _intensity_columns(mtz, path)
    if hkl.shape[0] == 0:
        raise InputError(path, "the reference MTZ holds no intensities")
    return Reference(hkl, inten.astype(np.float64), (sigma.astype(np.float64)) ** 2, path)


def reference_from_model(path: str, miller: np.ndarray, d_min: float | None) -> Reference:
    """|F_calc|^2 of a model (PDB / mmCIF) at the observed indices with d >= d_min
    (cut_data.d_min, else 2.0 A as DIALS), from gemmi's X-ray density FFT."""
    try:
        st = gemmi.read_structure(path)
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the reference model: {exc}") from None
    if len(st) == 0:
        raise InputError(path, "the reference model has no atoms")
    st.setup_entities()
    d_min = float(d_min) if d_min else MODEL_D_MIN
    calc = gemmi.DensityCalculatorX()
    calc.d_min = d_min
    calc.rate = 2.0  # finer grid than gemmi's 1.5: weak reflections within ~0.1 % of the direct sum
    calc.grid.setup_from(st)
    calc.set_refmac_compatible_blur(st[0])
    calc.put_model_density_on_grid(st[0])
    f_grid = gemmi.transform_map_to_f_phi(calc.grid, half_l=True)
    asu = f_grid.prepare_asu_data(dmin=d_min, unblur=calc.blur)
    hkl = np.asarray(asu.miller_array, dtype=np.int32)
    amplitude = np.abs(np.asarray(asu.value_array))
    return Reference(hkl, amplitude ** 2, np.zeros(hkl.shape[0]), path)


def load_reference(path: str, miller: np.ndarray, params: Any) -> Reference:
    """A reference by file type: .mtz intensities, or a .pdb/.cif/.ent model."""
    if not Path(path).exists():
        raise InputError(path, "reference file not found", field="scaling_options.reference")
    if path.lower().endswith(".mtz"):
        return reference_from_mtz(path)
    return reference_from_model(path, miller, params.cut_data.d_min)


def reference_per_group(ref: Reference, group_asu: np.ndarray, space_group: gemmi.SpaceGroup,
                        anomalous: bool) -> tuple[np.ndarray, np.ndarray]:
    """(I_h, var(I_h)) per observation group (f[n_groups], NaN where the reference has
    none): reference entries mapped to the groups' ASU, inverse-variance averaged."""
    asu, _ = map_to_asu(ref.miller, space_group, anomalous=anomalous)
    gid, uniq = group_ids(asu)
    var = ref.variance
    exact = var <= 0
    w = np.where(exact, 1.0, 1.0 / np.where(exact, 1.0, var))
    n_ref = uniq.shape[0]
    wsum = np.bincount(gid, w, minlength=n_ref)
    mean = np.bincount(gid, w * ref.intensity, minlength=n_ref) / wsum
    var_mean = np.where(np.bincount(gid, exact, minlength=n_ref) > 0, 0.0, 1.0 / wsum)
    keys = pack_hkl(uniq)
    want = pack_hkl(group_asu)
    pos = np.clip(np.searchsorted(keys, want), 0, max(n_ref - 1, 0))
    hit = (keys[pos] == want) if n_ref else np.zeros(want.shape, dtype=bool)
    return np.where(hit, mean[pos], np.nan), np.where(hit, var_mean[pos], np.nan)


# ------------------------------------------------------------------------- the algorithm
def dataset_free_mask(scaler: Any, refine: np.ndarray) -> np.ndarray:
    """Flat bool mask of the parameters of data sets with refine[k] (and not fixed otherwise)."""
    model = scaler.model
    fixed = {}
    for key, slices in model.param_slices.items():  # a few components
        mask = np.array(model.fixed_mask[key], dtype=bool, copy=True)
        for k, sl in slices.items():  # loop over data sets
            if not refine[k]:
                mask[sl] = True
        fixed[key] = mask
    return scaler.target.free_mask(fixed) & scaler.free


def _group_means(scaler: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed I_h = sum(w g I)/sum(w g^2) and its variance 1/sum(w g^2) per group over rows."""
    o = scaler.obs
    n_groups = o.group_asu.shape[0]
    w = scaler.weights(scaler.error_model) * rows
    num = np.bincount(o.group, w * scaler.g * o.intensity, minlength=n_groups)
    den = np.bincount(o.group, w * scaler.g ** 2, minlength=n_groups)
    have = den > 0
    safe = np.where(have, den, 1.0)
    return np.where(have, num / safe, np.nan), np.where(have, 1.0 / safe, np.nan)


def _targeted_outliers(scaler: Any, rows: np.ndarray, ih: np.ndarray, var_ih: np.ndarray, label: str) -> None:
    """Outliers of the refined rows against the fixed I_h; other rows keep their flags."""
    o = scaler.obs
    variance = 1.0 / scaler.weights(scaler.error_model)
    out = targeted_outliers(o.intensity[rows], variance[rows], scaler.g[rows], ih[o.group[rows]],
                            var_ih[o.group[rows]], zmax=scaler.p.scaling_options.outlier_zmax)
    scaler.outlier[rows] = out
    scaler.log(f"{int(out.sum())} outliers found against the target ({label})")


def targeted_scaling(scaler: Any, params: Any, plan: TargetPlan, tables: Sequence[Any], full_matrix: bool,
                     log: Any) -> tuple[bool, list[int]]:
    """Run the targeted part on a prepared engine (`jaxscale.scale._Scaler`).

    Returns (whether the normal joint algorithm follows, data sets to write).
    """
    o = scaler.obs
    n_sets = len(scaler.experiments)
    targets = plan.targets
    refine = ~targets
    scaler.reject_outliers("initial", per_dataset=True)
    for k in np.flatnonzero(targets):  # scaled data sets keep their stored outlier flags
        sel = o.of_dataset(k)
        prep = scaler.prepared[k]
        scaler.outlier[sel] = F.has_any(np.asarray(tables[k]["flags"])[prep.kept_rows][o.row[sel]],
                                        F.OUTLIER_IN_SCALING)
    if targets.any():
        log(f"{int(scaler.outlier[refine[o.dataset]].sum())} initial outliers in the data sets to scale; the "
            "scaled data sets keep their stored outlier flags")
    sg = scaler.experiments[0].space_group
    if plan.reference_path is not None:
        ref = load_reference(plan.reference_path, o.miller, params)
        ih, var_ih = reference_per_group(ref, o.group_asu, sg, bool(params.anomalous))
        n_hit = int(np.isfinite(ih).sum())
        log(f"Reference {ref.source}: {ref.miller.shape[0]} intensities, {n_hit} of {ih.size} groups matched")
        if n_hit == 0:
            raise InputError(ref.source, "no reference intensity matches an observed reflection "
                             "(different space group setting or resolution?)", field="scaling_options.reference")
        who = "the reference"
    else:
        ih, var_ih = _group_means(scaler, targets[o.dataset] & ~scaler.outlier)
        who = f"the scaled data sets {np.flatnonzero(targets).tolist()}"
    refined_rows = refine[o.dataset]
    free = dataset_free_mask(scaler, refine)
    log(f"Targeted scaling of data sets {np.flatnonzero(refine).tolist()} against {who} (I_h fixed)")
    scaler.lbfgs_round("Targeted round", rows=scaler.minimisation_rows() & refined_rows, free=free,
                       ih_of_group=ih)
    scaler.expand()
    if not plan.only_target and plan.reference_path is None:
        # DIALS' multi-scaler after a target cycle lists the unscaled data sets first: the
        # joint error model starts from the first unscaled data set's (1, 0.02), not from
        # the stored model of a scaled one (lcys 20_25 + 30: a = 1.000 after round 2, as DIALS)
        scaler.lead_error_model(int(np.flatnonzero(refine)[0]))
        return True, list(range(n_sets))
    _targeted_outliers(scaler, refined_rows, ih, var_ih, "after the targeted round")
    scaler.lbfgs_round("Targeted round 2", rows=scaler.minimisation_rows() & refined_rows, free=free,
                       ih_of_group=ih)
    with_cov = False
    if full_matrix and params.scaling_refinery.engine == "SimpleLBFGS":
        with_cov = scaler.full_matrix_round(rows=scaler.minimisation_rows() & refined_rows, free=free,
                                            ih_of_group=ih)
    scaler.expand(with_covariance=with_cov)
    _targeted_outliers(scaler, refined_rows, ih, var_ih, "final")
    if plan.reference_path is not None or params.scaling_options.only_save_targeted:
        return False, [int(k) for k in np.flatnonzero(refine)]
    return False, list(range(n_sets))


__all__ = ["Reference", "TargetPlan", "plan", "reference_path", "reference_from_mtz", "reference_from_model",
           "load_reference", "reference_per_group", "dataset_free_mask", "targeted_scaling"]
