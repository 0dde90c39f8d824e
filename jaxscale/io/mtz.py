"""Unmerged and merged MTZ files, through gemmi.

Reading: `read_unmerged_mtz` turns an unmerged MTZ (DIALS export, AIMLESS scaled-unmerged,
reciprocalspaceship) into a ReflectionTable with DIALS column names and one Experiment per
sweep (runs of consecutive batch numbers of one dataset).

Writing: `write_unmerged_mtz` reproduces DIALS 3.12 `dials.export` / `dials.scale
output.unmerged_mtz=` (spec formats.md §3 and §5): the same row selection, columns, batch
numbering and one batch header per image with Mosflm U in the "Cambridge" frame.
`write_merged_mtz` is a generic column writer for merged data.

Symmetry (ASU, M/ISYM) is gemmi's. ISYM numbers follow the file's own SYMM records, which
gemmi writes in its operator order; DIALS writes cctbx's order, so for the same ASU index
the ISYM value may differ while the original index it encodes is the same.
"""
from __future__ import annotations

import datetime
import math
import os
import uuid
from typing import Sequence

import gemmi
import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.table import ReflectionTable, RowsByValue
from jaxscale.exceptions import InputError
from jaxscale.io.atomic import atomic_path
from jaxscale.io.expt import Experiment, ExperimentList

# --- MTZ batch-header layout (CCP4 orientation block; verified against iotbx) ----------
# ints (29)
_I_IORTYP, _I_LBCELL, _I_MISFLG, _I_JUMPAX, _I_NCRYST, _I_LCRFLG = 3, 4, 10, 11, 12, 13
_I_LDTYPE, _I_JSAXS, _I_NBSCAL, _I_NGONAX, _I_LBMFLG, _I_NDET, _I_NBSETID = 14, 15, 16, 17, 18, 19, 20
# floats (156)
_F_CELL, _F_UMAT, _F_PHIXYZ, _F_CRYDAT, _F_DATUM = 0, 6, 15, 21, 33
_F_PHISTT, _F_PHIEND, _F_SCANAX, _F_TIME1, _F_TIME2 = 36, 37, 38, 41, 42
_F_BSCALE, _F_BBFAC, _F_SDBSCALE, _F_SDBFAC, _F_PHIRANGE = 43, 44, 45, 46, 47
_F_E1, _F_E2, _F_E3, _F_SOURCE, _F_SO, _F_ALAMBD = 59, 62, 65, 80, 83, 86
_F_DX, _F_THETA, _F_DETLM = 111, 112, 113  # detector 1; detector 2 starts 6 later

_WAVELENGTH_TOLERANCE = 1e-4  # Å; experiments closer than this share one MTZ dataset


# =====================================================================================
# small batched geometry helpers (all angles in radians unless named _deg)
# =====================================================================================
def _rotations(axes: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Right-handed rotation matrices (n, 3, 3) about unit `axes` (n, 3) or (3,) by `angles` (n,)."""
    angles = np.asarray(angles, dtype=float)
    axes = np.broadcast_to(np.asarray(axes, dtype=float), angles.shape + (3,))
    axes = axes / np.linalg.norm(axes, axis=-1, keepdims=True)
    x, y, z = axes[..., 0], axes[..., 1], axes[..., 2]
    zero = np.zeros_like(x)
    K = np.stack([np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)], -2)
    s, c = np.sin(angles)[..., None, None], np.cos(angles)[..., None, None]
    return np.eye(3) + s * K + (1.0 - c) * (K @ K)


def _cell_from_reciprocal(A: np.ndarray) -> np.ndarray:
    """Cell parameters (n, 6) from reciprocal bases A (n, 3, 3) (columns a*, b*, c*)."""
    O = np.swapaxes(np.linalg.inv(A), -1, -2)  # columns a, b, c
    G = np.swapaxes(O, -1, -2) @ O
    abc = np.sqrt(np.stack([G[..., 0, 0], G[..., 1, 1], G[..., 2, 2]], -1))
    al = np.degrees(np.arccos(np.clip(G[..., 1, 2] / (abc[..., 1] * abc[..., 2]), -1, 1)))
    be = np.degrees(np.arccos(np.clip(G[..., 0, 2] / (abc[..., 0] * abc[..., 2]), -1, 1)))
    ga = np.degrees(np.arccos(np.clip(G[..., 0, 1] / (abc[..., 0] * abc[..., 1]), -1, 1)))
    return np.concatenate([abc, np.stack([al, be, ga], -1)], -1)


def _orthogonalisation(cell: np.ndarray) -> np.ndarray:
    """Orthogonalisation matrices O (n, 3, 3), a along x, b in the xy plane (cctbx/dxtbx)."""
    a, b, c = cell[..., 0], cell[..., 1], cell[..., 2]
    al, be, ga = (np.radians(cell[..., k]) for k in (3, 4, 5))
    v = np.sqrt(1 - np.cos(al) ** 2 - np.cos(be) ** 2 - np.cos(ga) ** 2 + 2 * np.cos(al) * np.cos(be) * np.cos(ga))
    zero = np.zeros_like(a)
    rows = [
        np.stack([a, b * np.cos(ga), c * np.cos(be)], -1),
        np.stack([zero, b * np.sin(ga), c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)], -1),
        np.stack([zero, zero, c * v / np.sin(ga)], -1),
    ]
    return np.stack(rows, -2)


def _b_matrix(cell: np.ndarray) -> np.ndarray:
    """dxtbx B = (fractionalisation)ᵀ = (O⁻¹)ᵀ, (n, 3, 3)."""
    return np.swapaxes(np.linalg.inv(_orthogonalisation(cell)), -1, -2)


def _b_mosflm(cell: np.ndarray) -> np.ndarray:
    """Mosflm B (n, 3, 3) from direct cells (n, 6): reciprocal parameters in upper triangle."""
    O = _orthogonalisation(cell)
    Gs = np.linalg.inv(np.swapaxes(O, -1, -2) @ O)  # reciprocal metric
    ast, bst, cst = (np.sqrt(Gs[..., k, k]) for k in range(3))
    cos_best = Gs[..., 0, 2] / (ast * cst)
    cos_gast = Gs[..., 0, 1] / (ast * bst)
    sin_best = np.sqrt(1 - cos_best**2)
    sin_gast = np.sqrt(1 - cos_gast**2)
    cos_al = np.cos(np.radians(cell[..., 3]))
    zero = np.zeros_like(ast)
    rows = [
        np.stack([ast, bst * cos_gast, cst * cos_best], -1),
        np.stack([zero, bst * sin_gast, -cst * sin_best * cos_al], -1),
        np.stack([zero, zero, 1.0 / cell[..., 2]], -1),
    ]
    return np.stack(rows, -2)


def _half_rotations(M: np.ndarray) -> np.ndarray:
    """Rotations (n, 3, 3) about the axes of rotations M (n, 3, 3) by half their angles."""
    angle = np.arccos(np.clip((np.trace(M, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0))
    vec = np.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    norm = np.linalg.norm(vec, axis=-1)
    tiny = norm < 1e-15
    axes = np.where(tiny[..., None], np.array([0.0, 0.0, 1.0]), vec / np.where(tiny, 1.0, norm)[..., None])
    return _rotations(axes, np.where(tiny, 0.0, angle / 2.0))


def _cambridge_frame(expt: Experiment) -> np.ndarray:
    """R (3, 3) sending the datum rotation axis to +z and the beam (source→sample) into +x."""
    datum = np.asarray((expt.goniometer or {}).get("rotation_axis", (1.0, 0.0, 0.0)), dtype=float)
    z = datum / np.linalg.norm(datum)
    us0 = -expt.s0_direction
    x = us0 - (us0 @ z) * z
    x /= np.linalg.norm(x)
    return np.vstack([x, np.cross(z, x), z])


def _cell_array(expt: Experiment) -> np.ndarray:
    return np.array(expt.unit_cell.parameters, dtype=float)


def median_cell(experiments: Sequence[Experiment]) -> gemmi.UnitCell:
    """Per-parameter median of the experiments' cells (DIALS `determine_best_unit_cell`)."""
    return gemmi.UnitCell(*np.median([_cell_array(e) for e in experiments], axis=0))


# =====================================================================================
# batch numbering (dials/util/batch_handling.py)
# =====================================================================================
def _next_epoch(value: int) -> int:
    """The next number above `value` ending in 01 and not consecutive with it."""
    if value % 100 == 99:
        return value + 2
    if value % 100 == 0:
        return value + 101
    return value - value % 100 + 101


def _image_range(expt: Experiment) -> tuple[int, int]:
    return expt.image_range if expt.scan else (0, 0)


def calculate_batch_offsets(image_ranges: Sequence[tuple[int, int]]) -> list[int]:
    """Batch offsets giving unique, non-overlapping, non-consecutive batch ranges.

    A range (shifted by +1 if it starts at 0) that does not touch an already kept one keeps
    its image numbers; the others start, in order, at the next "epoch" above the maximum.
    """
    offsets = [0] * len(image_ranges)
    kept: list[tuple[int, int]] = []
    to_shift: list[int] = []
    max_batch = 0
    for i, (first, last) in enumerate(image_ranges):
        lo, hi = (first + 1, last + 1) if first == 0 else (first, last)
        if any(lo < khi + 1 and hi >= klo - 1 for klo, khi in kept):
            to_shift.append(i)
        else:
            offsets[i] = lo - first
            kept.append((lo, hi))
            max_batch = max(max_batch, hi)
    for i in to_shift:
        first, last = image_ranges[i]
        start = _next_epoch(max_batch)
        offsets[i] = start - first
        max_batch = start + (last - first)
    return offsets


def batch_offsets_for(experiments: Sequence[Experiment], path: str | None = None) -> list[int]:
    """Existing scan batch offsets if they differ between experiments, else new ones."""
    existing = [e.batch_offset for e in experiments if e.scan]
    if len(set(existing)) > 1:
        offsets = [e.batch_offset if e.scan else 0 for e in experiments]
        effective = offsets
    else:
        offsets = calculate_batch_offsets([_image_range(e) for e in experiments])
        effective = [o + _image_range(e)[0] for o, e in zip(offsets, experiments)]
    if len(set(effective)) != len(effective):
        raise InputError(path, f"duplicate batch offsets {offsets}", field="batch_offset")
    return offsets


# =====================================================================================
# batch headers
# =====================================================================================
def _batch_orientations(expt: Experiment, force_static: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (cell (n, 6), Mosflm U (n, 3, 3)) in the Cambridge frame (formats.md §5)."""
    first, last = _image_range(expt)
    n = last - first + 1
    R = _cambridge_frame(expt)
    gonio = expt.goniometer
    Fc = R @ expt.fixed_rotation @ R.T if gonio else np.eye(3)
    Sc = R @ expt.setting_rotation @ R.T if gonio else np.eye(3)
    scan_points = (expt.crystal or {}).get("A_at_scan_points") or []
    if not force_static and gonio and expt.scan and len(scan_points) >= n + 1:
        A = R @ np.asarray(scan_points, dtype=float).reshape(-1, 3, 3)[: n + 1]  # (n+1, 3, 3)
        B = _b_matrix(_cell_from_reciprocal(A))
        U = A @ np.linalg.inv(B)
        U0, U1, B0, B1 = U[:-1], U[1:], B[:-1], B[1:]
        Uc = _half_rotations(U1 @ np.swapaxes(U0, -1, -2)) @ U0
        Bc = 0.5 * (B0 + B1)
        cells = _cell_from_reciprocal(Bc)
        start, width = expt.oscillation
        # DIALS 3.12 passes the centre angle in degrees to a function expecting radians.
        phi_c = start + np.arange(n) * width + width / 2.0
        datum = R @ np.asarray(gonio["rotation_axis"], dtype=float)
        axis = Sc @ datum
        UB = _rotations(axis, -phi_c) @ Sc @ _rotations(datum, phi_c) @ Fc @ Uc @ Bc
    else:
        A = R @ expt.A_matrix
        cells = np.broadcast_to(_cell_array(expt), (n, 6))
        UB = np.broadcast_to(Sc @ Fc @ A, (n, 3, 3))
    U_mosflm = UB @ np.linalg.inv(_b_mosflm(cells))
    return np.asarray(cells), U_mosflm


def _batch_floats(expt: Experiment, wavelength: float, force_static: bool = False) -> np.ndarray:
    """The 156 float words (n_images, 156) of every batch header of one experiment."""
    first, last = _image_range(expt)
    n = last - first + 1
    R = _cambridge_frame(expt)
    cells, U = _batch_orientations(expt, force_static)
    out = np.zeros((n, 156), dtype=np.float64)
    out[:, _F_CELL : _F_CELL + 6] = cells
    out[:, _F_UMAT : _F_UMAT + 9] = np.swapaxes(U, -1, -2).reshape(n, 9)  # Uᵀ row by row (column-major U)
    out[:, _F_CRYDAT] = float((expt.crystal or {}).get("mosaicity", 0.0) or 0.0)
    if expt.scan:
        start, width = expt.oscillation
        phistt = start + np.arange(n) * width
        out[:, _F_PHISTT], out[:, _F_PHIEND], out[:, _F_PHIRANGE] = phistt, phistt + width, width
    if expt.goniometer:
        axis = (R @ expt.setting_rotation @ R.T) @ (R @ np.asarray(expt.goniometer["rotation_axis"], dtype=float))
        out[:, _F_SCANAX : _F_SCANAX + 3] = axis
        out[:, _F_E1 : _F_E1 + 3] = axis
    so = R @ expt.s0_direction  # sample → source
    out[:, _F_SO : _F_SO + 3] = so
    out[:, _F_SOURCE + int(np.argmin(so))] = -1.0
    out[:, _F_ALAMBD] = wavelength
    out[:, _F_BSCALE] = 1.0
    panels = (expt.detector or {}).get("panels") or []
    if panels:
        p = panels[0]
        normal = np.cross(np.asarray(p["fast_axis"], float), np.asarray(p["slow_axis"], float))
        out[:, _F_DX] = float(np.dot(np.asarray(p["origin"], float), normal))
        nx, ny = p["image_size"]
        out[:, _F_DETLM + 1], out[:, _F_DETLM + 3] = nx, ny
    return out


def _add_batches(mtz: gemmi.Mtz, expt: Experiment, batch_offset: int, dataset_id: int, wavelength: float,
                 force_static: bool) -> None:
    floats = _batch_floats(expt, wavelength, force_static).astype(np.float32).tolist()
    first, _ = _image_range(expt)
    ints = [0] * 29
    ints[0:3] = [185, 29, 156]
    ints[_I_LBCELL : _I_LBCELL + 6] = [-1] * 6
    ints[_I_NCRYST], ints[_I_LDTYPE], ints[_I_JSAXS], ints[_I_NGONAX], ints[_I_NDET] = 1, 2, 1, 1, 1
    ints[_I_NBSETID] = dataset_id
    for i, words in enumerate(floats):  # gemmi builds headers one Batch object at a time
        batch = gemmi.Mtz.Batch()
        batch.number = first + i + batch_offset
        batch.title = f"Batch {batch.number}"
        batch.axes = ["AXIS", "", ""]
        bi, bf = batch.ints, batch.floats
        for k, v in enumerate(ints):
            bi[k] = v
        for k in np.flatnonzero(words):
            bf[int(k)] = words[k]
        mtz.batches.append(batch)


# =====================================================================================
# row selection (dials/util/filter_reflections.py, scale / profile+sum choices)
# =====================================================================================
def _combine_partials(cols: dict[str, np.ndarray], kinds: list[str]) -> np.ndarray:
    """Combine partial reflections sharing a `partial_id` in place; return rows to keep.

    Candidates: partiality < 0.99 and positive variances. Per group of >1 rows the first
    row receives the combination (scale: inverse-variance mean; sum: sum; prf:
    (I/σ)²-weighted mean) and the summed partiality; the other rows are dropped.
    """
    n = len(cols["partiality"])
    cand = cols["partiality"] < 0.99
    for k in kinds:
        cand &= cols[f"intensity.{k}.variance"] > 0
    keep = np.ones(n, dtype=bool)
    rows = np.flatnonzero(cand)
    if rows.size == 0:
        return keep
    key = cols["id"][rows].astype(np.int64) * (1 << 40) + cols["partial_id"][rows].astype(np.int64)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    multi = counts[inverse] > 1
    rows, inverse = rows[multi], inverse[multi]
    if rows.size == 0:
        return keep
    group_first = np.full(counts.size, n, dtype=np.int64)
    np.minimum.at(group_first, inverse, rows)
    first_row = group_first[inverse]
    ng = counts.size
    groups = np.unique(inverse)  # groups with more than one row

    def seg(x: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=x, minlength=ng)

    for k in kinds:
        v, var = cols[f"intensity.{k}.value"], cols[f"intensity.{k}.variance"]
        I, V = v[rows], var[rows]
        if k == "scale":
            w = 1.0 / V
            tw = seg(w)
            new_v, new_var = seg(w * I) / tw, 1.0 / tw
        elif k == "sum":
            new_v, new_var = seg(I), seg(V)
        else:  # prf
            w = I * I / V
            tw = seg(w)
            ok = tw != 0
            new_v = np.where(ok, seg(w * I) / np.where(ok, tw, 1.0), 0.0)
            new_var = np.where(ok, seg(w * V) / np.where(ok, tw, 1.0), seg(V))
        v[group_first[groups]], var[group_first[groups]] = new_v[groups], new_var[groups]
    cols["partiality"][group_first[groups]] = seg(cols["partiality"][rows])[groups]
    keep[rows[rows != first_row]] = False
    return keep


def _export_rows(table: ReflectionTable, cell: gemmi.UnitCell, partiality_threshold: float,
                 d_min: float | None, min_isigi: float | None, combine_partials: bool,
                 path: str | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """The filtered, corrected columns DIALS exports, and which intensity kinds they hold."""
    t = table
    flags = t["flags"] if "flags" in t else np.zeros(len(t), dtype=np.uint64)
    sel = t.experiment_ids() >= 0
    if "intensity.scale.value" in t and "inverse_scale_factor" in t:
        kinds = ["scale"]
        sel &= ~F.has_any(flags, F.BAD_FOR_SCALING)
        sel &= t["inverse_scale_factor"] > 0
        sel &= t["intensity.scale.variance"] > 0
    else:
        kinds = [k for k, c in (("prf", "intensity.prf.value"), ("sum", "intensity.sum.value")) if c in t]
        if not kinds:
            raise InputError(path, "table has no intensity.scale, intensity.prf or intensity.sum columns",
                             field="intensity")
        if kinds == ["prf", "sum"]:
            if not F.has_any(flags, F.INTEGRATED_PRF).any():
                kinds = ["sum"]
                sel &= F.has_all(flags, F.INTEGRATED_SUM)
            else:
                sel &= F.has_all(flags, F.INTEGRATED)
        else:
            sel &= F.has_all(flags, F.INTEGRATED_PRF if kinds == ["prf"] else F.INTEGRATED_SUM)
        for k, bit in (("prf", F.INTEGRATED_PRF), ("sum", F.INTEGRATED_SUM)):
            if k in kinds:
                sel &= ~((t[f"intensity.{k}.variance"] <= 0) & F.has_all(flags, bit))
    cols = {k: v[sel] for k, v in t.columns.items()}
    cols["d"] = cell.calculate_d_array(cols["miller_index"].astype(np.int32))
    if d_min:
        keep = cols["d"] > d_min
        cols = {k: v[keep] for k, v in cols.items()}
    if "partiality" in cols:
        keep = cols["partiality"] > 0
        cols = {k: v[keep] for k, v in cols.items()}
    for k in kinds:  # copies, so the caller's table is untouched
        cols[f"intensity.{k}.value"] = cols[f"intensity.{k}.value"].astype(np.float64, copy=True)
        cols[f"intensity.{k}.variance"] = cols[f"intensity.{k}.variance"].astype(np.float64, copy=True)
    if kinds == ["scale"]:
        g = cols["inverse_scale_factor"]
        cols["intensity.scale.value"] /= g
        cols["intensity.scale.variance"] /= g * g
    else:
        conversion = np.ones(len(cols["d"]))
        qe = cols.get("qe", cols.get("dqe"))
        if qe is not None:
            keep = qe > 0
            cols = {k: v[keep] for k, v in cols.items()}
            conversion = 1.0 / cols.get("qe", cols.get("dqe"))
        if "lp" in cols:
            conversion = conversion * cols["lp"]
        sum_conversion = conversion / cols["partiality"] if "partiality" in cols else conversion
        for k in kinds:
            c = sum_conversion if k == "sum" else conversion
            cols[f"intensity.{k}.value"] *= c
            cols[f"intensity.{k}.variance"] *= c * c
    if "partiality" in cols:
        cols["partiality"] = cols["partiality"].astype(np.float64, copy=True)
        if combine_partials and "partial_id" in cols:
            keep = _combine_partials(cols, kinds)
            cols = {k: v[keep] for k, v in cols.items()}
        cols["fractioncalc"] = cols["partiality"]
        keep = cols["partiality"] >= partiality_threshold
        cols = {k: v[keep] for k, v in cols.items()}
    else:
        cols["fractioncalc"] = np.ones(len(cols["d"]))
    if min_isigi is not None:
        keep = np.ones(len(cols["d"]), dtype=bool)
        for k in kinds:
            keep &= ~(cols[f"intensity.{k}.value"] / np.sqrt(cols[f"intensity.{k}.variance"]) < min_isigi)
        cols = {k: v[keep] for k, v in cols.items()}
    return cols, kinds


# =====================================================================================
# writers
# =====================================================================================
def _new_mtz(space_group: gemmi.SpaceGroup, cell: gemmi.UnitCell, title: str) -> gemmi.Mtz:
    mtz = gemmi.Mtz(with_base=False)
    mtz.spacegroup = space_group
    mtz.cell = cell
    mtz.title = title
    from jaxscale import __version__

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d at %H:%M:%S UTC")
    mtz.history = [f"From jaxscale {__version__}, run on {now}"]
    return mtz


def _add_dataset(mtz: gemmi.Mtz, dataset_id: int, project: str, crystal: str, dataset: str,
                 cell: gemmi.UnitCell, wavelength: float) -> None:
    ds = mtz.add_dataset(dataset)
    ds.id = dataset_id
    ds.project_name, ds.crystal_name, ds.dataset_name = project, crystal, dataset
    ds.cell, ds.wavelength = cell, float(wavelength)


def _set_columns(mtz: gemmi.Mtz, labels_types: list[tuple[str, str]], data: np.ndarray) -> None:
    for label, mtz_type in labels_types:
        mtz.add_column(label, mtz_type)
    mtz.set_data(np.ascontiguousarray(data, dtype=np.float32))


def _match_wavelengths(experiments: Sequence[Experiment]) -> list[int]:
    """1-based MTZ dataset id per experiment: one per distinct wavelength, in order seen."""
    seen: list[float] = []
    ids = []
    for e in experiments:
        w = e.wavelength
        hit = [i for i, s in enumerate(seen) if math.isclose(w, s, abs_tol=_WAVELENGTH_TOLERANCE)]
        if not hit:
            seen.append(w)
            hit = [len(seen) - 1]
        ids.append(hit[0] + 1)
    return ids


def write_unmerged_mtz(
    path: str | os.PathLike,
    table: ReflectionTable,
    experiments: Sequence[Experiment],
    *,
    crystal_name: str = "XTAL",
    project_name: str = "DIALS",
    dataset_name: str = "FROMDIALS",
    best_cell: gemmi.UnitCell | Sequence[float] | None = None,
    partiality_threshold: float = 0.4,
    d_min: float | None = None,
    min_isigi: float | None = -5.0,
    combine_partials: bool = True,
    force_static_model: bool = False,
) -> int:
    """Write an unmerged MTZ exactly as DIALS 3.12 `dials.export` does; return the row count.

    Scaled tables (with `intensity.scale.*` and `inverse_scale_factor`) give I, SIGI =
    scaled intensities plus SCALEUSED/SIGSCALEUSED; otherwise IPR/SIGIPR and I/SIGI hold the
    lp/qe(/partiality)-corrected profile and summation intensities.
    """
    path_s = os.fspath(path)
    experiments = list(experiments)
    if not experiments:
        raise InputError(path_s, "no experiments to export", field="experiments")
    ids_in_table = np.unique(table.experiment_ids())
    id_to_expt: dict[int, int] = {}
    if table.identifiers:
        index = {e.identifier: i for i, e in enumerate(experiments)}
        for k, ident in table.identifiers.items():
            if ident not in index:
                raise InputError(path_s, f"table identifier {ident} has no experiment", field="identifiers")
            id_to_expt[int(k)] = index[ident]
    else:
        id_to_expt = {int(k): int(k) for k in ids_in_table if 0 <= k < len(experiments)}
    space_groups = {e.space_group.hall.strip() for e in experiments}
    if len(space_groups) != 1:
        raise InputError(path_s, f"experiments do not share one space group ({sorted(space_groups)})",
                         field="space_group")
    sg = experiments[0].space_group
    if best_cell is None:
        cell = median_cell(experiments)
    else:
        cell = best_cell if isinstance(best_cell, gemmi.UnitCell) else gemmi.UnitCell(*best_cell)

    cols, kinds = _export_rows(table, cell, partiality_threshold, d_min, min_isigi, combine_partials, path_s)
    offsets = batch_offsets_for(experiments, path_s)
    dataset_ids = _match_wavelengths(experiments)
    wavelengths = {}
    for e, d in zip(experiments, dataset_ids):
        wavelengths.setdefault(d, e.wavelength)

    mtz = _new_mtz(sg, cell, "From jaxscale")
    order_parts, batch_parts, rot_parts = [], [], []
    rows_of_id = RowsByValue(np.asarray(cols["id"]))
    for k, i_expt in id_to_expt.items():
        expt = experiments[i_expt]
        rows = rows_of_id(k)
        _add_batches(mtz, expt, offsets[i_expt], dataset_ids[i_expt], wavelengths[dataset_ids[i_expt]],
                     force_static_model)
        z_obs = cols["xyzobs.px.value"][rows, 2]
        z_cal = cols["xyzcal.px"][rows, 2] if "xyzcal.px" in cols else z_obs
        batch_parts.append(np.floor(z_obs).astype(np.int64) + 1 + offsets[i_expt])
        if expt.scan:
            start, width = expt.oscillation
            rot_parts.append(start + (z_cal - (expt.image_range[0] - 1)) * width)
        else:
            rot_parts.append(z_cal)
        order_parts.append(rows)
    order = np.concatenate(order_parts) if order_parts else np.zeros(0, dtype=np.int64)
    if order.size == 0:
        raise InputError(path_s, "no reflections left to export after filtering", field="rows")
    cols = {k: v[order] for k, v in cols.items()}
    n = order.size

    out: list[tuple[str, str, np.ndarray]] = [
        ("H", "H", cols["miller_index"][:, 0]), ("K", "H", cols["miller_index"][:, 1]),
        ("L", "H", cols["miller_index"][:, 2]), ("M/ISYM", "Y", np.zeros(n)),
        ("BATCH", "B", np.concatenate(batch_parts)),
    ]
    if kinds == ["scale"]:
        out += [("I", "J", cols["intensity.scale.value"]), ("SIGI", "Q", np.sqrt(cols["intensity.scale.variance"])),
                ("SCALEUSED", "R", cols["inverse_scale_factor"]),
                ("SIGSCALEUSED", "R", np.sqrt(cols.get("inverse_scale_factor_variance", np.zeros(n))))]
    else:
        if "prf" in kinds:
            labels = ("IPR", "SIGIPR") if "sum" in kinds else ("I", "SIGI")
            out += [(labels[0], "J", cols["intensity.prf.value"]),
                    (labels[1], "Q", np.sqrt(cols["intensity.prf.variance"]))]
        if "sum" in kinds:
            out += [("I", "J", cols["intensity.sum.value"]), ("SIGI", "Q", np.sqrt(cols["intensity.sum.variance"]))]
    if "background.sum.value" in cols and "background.sum.variance" in cols:
        out += [("BG", "R", cols["background.sum.value"]), ("SIGBG", "R", np.sqrt(cols["background.sum.variance"]))]
    out += [("FRACTIONCALC", "R", cols["fractioncalc"]),
            ("XDET", "R", cols["xyzobs.px.value"][:, 0]), ("YDET", "R", cols["xyzobs.px.value"][:, 1]),
            ("ROT", "R", np.concatenate(rot_parts))]
    if "lp" in cols:
        out.append(("LP", "R", cols["lp"]))
    out.append(("QE", "R", cols.get("qe", cols.get("dqe", np.ones(n)))))

    for d_id in sorted(wavelengths):
        _add_dataset(mtz, d_id, project_name, crystal_name, dataset_name, cell, wavelengths[d_id])
    data = np.stack([np.asarray(c, dtype=np.float64) for _, _, c in out], axis=1)
    mtz.switch_to_original_hkl()  # before data: marks H K L as original indices for gemmi
    _set_columns(mtz, [(lab, typ) for lab, typ, _ in out], data)
    mtz.switch_to_asu_hkl()  # H K L → ASU, ISYM from gemmi's operators (= the SYMM records)
    with atomic_path(path_s) as tmp:
        mtz.write_to_file(str(tmp))
    return n


def write_merged_mtz(
    path: str | os.PathLike,
    *,
    cell: gemmi.UnitCell | Sequence[float],
    space_group: gemmi.SpaceGroup | str,
    wavelength: float,
    miller: np.ndarray,
    columns: dict[str, tuple[str, np.ndarray]],
    crystal_name: str = "XTAL",
    project_name: str = "DIALS",
    dataset_name: str = "NATIVE",
) -> None:
    """Write merged data: H K L (miller, (n, 3), written as given) then `columns` in order.

    `columns` maps label → (MTZ type character, values (n,)); NaN marks a missing value.
    """
    cell = cell if isinstance(cell, gemmi.UnitCell) else gemmi.UnitCell(*cell)
    sg = space_group if isinstance(space_group, gemmi.SpaceGroup) else gemmi.SpaceGroup(space_group)
    miller = np.asarray(miller)
    if miller.ndim != 2 or miller.shape[1] != 3:
        raise ValueError(f"miller must be (n, 3), got {miller.shape}")
    for label, (mtz_type, values) in columns.items():
        if len(values) != len(miller):
            raise ValueError(f"column {label} has {len(values)} values for {len(miller)} reflections")
        if len(mtz_type) != 1:
            raise ValueError(f"column {label}: MTZ type must be one character, got {mtz_type!r}")
    mtz = _new_mtz(sg, cell, "From jaxscale")
    _add_dataset(mtz, 1, project_name, crystal_name, dataset_name, cell, wavelength)
    data = np.column_stack([miller.astype(np.float64)] + [np.asarray(v, dtype=np.float64) for _, v in columns.values()])
    _set_columns(mtz, [("H", "H"), ("K", "H"), ("L", "H")] + [(k, t) for k, (t, _) in columns.items()], data)
    with atomic_path(path) as tmp:
        mtz.write_to_file(str(tmp))


# =====================================================================================
# reader
# =====================================================================================
def _read_mtz(path: str) -> gemmi.Mtz:
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    try:
        return gemmi.read_mtz_file(path)
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(path, f"not a readable MTZ file ({exc})") from None


def _sweeps(batch_numbers: np.ndarray, batch_group: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) batch numbers of runs of consecutive batch numbers within one group."""
    order = np.argsort(batch_numbers, kind="stable")
    b, g = batch_numbers[order], batch_group[order]
    breaks = np.flatnonzero((np.diff(b) != 1) | (np.diff(g) != 0)) + 1
    starts = np.concatenate([[0], breaks]).astype(int)
    ends = np.concatenate([breaks - 1, [b.size - 1]]).astype(int)
    return [(int(b[s]), int(b[e])) for s, e in zip(starts, ends)]


def _reciprocal_from_header(cells: np.ndarray, umats: np.ndarray) -> np.ndarray:
    """A = U·B_Mosflm (n, 3, 3) from batch cells (n, 6) and stored umat words (n, 9) = Uᵀ."""
    U = np.swapaxes(umats.reshape(-1, 3, 3), -1, -2)
    return U @ _b_mosflm(cells)


def _s1_from_headers(hkl: np.ndarray, A: np.ndarray, axis: np.ndarray, s0: np.ndarray,
                     rot_deg: np.ndarray) -> np.ndarray:
    """Diffracted beam vectors s1 = s0 + R(axis, φ)·A·h (n, 3), per-row A (n, 3, 3)."""
    r = np.einsum("nij,nj->ni", A, hkl.astype(float))
    return s0 + np.einsum("nij,nj->ni", _rotations(axis, np.radians(rot_deg)), r)


def _column_pairs(mtz: gemmi.Mtz) -> dict[str, str]:
    """Intensity label → its sigma label: the first Q column right after each J column."""
    cols = list(mtz.columns)
    pairs = {}
    for i, c in enumerate(cols[:-1]):
        if c.type == "J" and cols[i + 1].type == "Q":
            pairs[c.label] = cols[i + 1].label
    return pairs


def read_unmerged_mtz(path: str | os.PathLike) -> tuple[ReflectionTable, ExperimentList]:
    """Read an unmerged MTZ: a table with original indices and one Experiment per sweep.

    A sweep is a run of consecutive batch numbers of one dataset (all batches of a dataset
    when the file has no batch headers). Columns (DIALS names): miller_index (original,
    from M/ISYM), id, flags, batch, intensity.sum.* (I, SIGI²), intensity.prf.* (IPR),
    xyzobs.px.value (XDET, YDET, z = batch − first batch + 0.5), partiality (FRACTIONCALC;
    1 where absent or zero throughout), lp, qe, background.sum.*, inverse_scale_factor(+variance) from SCALEUSED, rot
    (ROT, degrees), d (MTZ cell), and s1 where the batch headers give an orientation that
    reproduces |s1| = 1/λ (checked, since old exports use other frames).
    """
    path_s = os.fspath(path)
    mtz = _read_mtz(path_s)
    labels = mtz.column_labels()
    for c in mtz.columns:
        if c.label == "M_ISYM" and "M/ISYM" not in labels:
            c.label = "M/ISYM"
    batch_cols = [c.label for c in mtz.columns if c.type == "B"]
    if not batch_cols:
        raise InputError(path_s, "no BATCH column: not an unmerged MTZ", field="BATCH")
    pairs = _column_pairs(mtz)
    sum_label = next((lab for lab in ("I", "IOBS", "IMEAN") if lab in pairs), None)
    prf_label = "IPR" if "IPR" in pairs else None
    if sum_label is None and prf_label is None:
        raise InputError(path_s, f"no intensity column (type J followed by its sigma, type Q); columns are {labels}",
                         field="I")
    if mtz.nreflections == 0:
        raise InputError(path_s, "file holds no reflections")
    if mtz.spacegroup is None:
        raise InputError(path_s, "no space group in the MTZ header", field="SYMINF")
    if "M/ISYM" in mtz.column_labels():
        mtz.switch_to_original_hkl()
    data = np.array(mtz, dtype=np.float64)  # (n, ncol)
    col = {c.label: data[:, i] for i, c in enumerate(mtz.columns)}
    n = data.shape[0]
    sg = mtz.spacegroup
    batch = np.rint(col[batch_cols[0]]).astype(np.int64)
    hkl = np.stack([col["H"], col["K"], col["L"]], 1).astype(np.int32)

    # --- sweeps, from the batch headers or else from the BATCH values
    headers = list(mtz.batches)
    if headers:
        numbers = np.array([b.number for b in headers], dtype=np.int64)
        floats = np.array([list(b.floats) for b in headers], dtype=np.float64)  # (n_batches, 156)
        group = np.array([b.dataset_id * 1000 + b.ints[_I_NCRYST] for b in headers], dtype=np.int64)
        missing = np.setdiff1d(np.unique(batch), numbers)
        if missing.size:
            raise InputError(path_s, f"{missing.size} BATCH value(s) have no batch header, e.g. {missing[:3].tolist()}",
                             field="BATCH")
        sweeps = _sweeps(numbers, group)
    else:
        numbers = np.unique(batch)
        floats = np.zeros((numbers.size, 156))
        sweeps = [(int(numbers[0]), int(numbers[-1]))]
    order = np.argsort(numbers)
    row_header = order[np.searchsorted(numbers[order], batch)]  # header index of each row
    firsts = np.array([s for s, _ in sweeps])
    sweep_of_row = (np.searchsorted(firsts, batch, side="right") - 1).astype(np.int32)

    ds_wavelength = {d.id: d.wavelength for d in mtz.datasets}
    default_wl = next((d.wavelength for d in reversed(list(mtz.datasets)) if d.wavelength > 0), 0.0)
    mtz_cell = np.array(mtz.cell.parameters)
    cells = np.where(floats[:, :1] > 0, floats[:, _F_CELL : _F_CELL + 6], mtz_cell)
    umats = floats[:, _F_UMAT : _F_UMAT + 9]
    oriented = np.any(umats != 0, axis=1)
    umats = np.where(oriented[:, None], umats, np.eye(3).ravel())
    A_batch = _reciprocal_from_header(cells, umats)  # (n_batches, 3, 3)

    experiments = ExperimentList()
    identifiers: dict[int, str] = {}
    beam_s0 = np.zeros((len(sweeps), 3))
    axes = np.zeros((len(sweeps), 3))
    wavelengths = np.zeros(len(sweeps))
    for k, (first, last) in enumerate(sweeps):
        h = int(order[np.searchsorted(numbers[order], first)])
        f = floats[h]
        wl = float(f[_F_ALAMBD]) or ds_wavelength.get(headers[h].dataset_id if headers else -1, default_wl)
        so = f[_F_SO : _F_SO + 3]
        direction = so / np.linalg.norm(so) if np.any(so) else np.array([-1.0, 0.0, 0.0])
        axis = f[_F_E1 : _F_E1 + 3] if np.any(f[_F_E1 : _F_E1 + 3]) else f[_F_SCANAX : _F_SCANAX + 3]
        axis = axis / np.linalg.norm(axis) if np.any(axis) else np.array([0.0, 0.0, 1.0])
        real = np.linalg.inv(A_batch[h])  # rows a, b, c
        ident = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{os.path.abspath(path_s)}#{first}-{last}"))
        identifiers[k] = ident
        experiments.append(Experiment(
            identifier=ident,
            beam={"direction": direction.tolist(), "wavelength": wl},
            detector={"panels": [{"name": "Panel", "image_size": [int(f[_F_DETLM + 1]), int(f[_F_DETLM + 3])],
                                  "directed_distance": float(f[_F_DX])}]},
            goniometer={"rotation_axis": axis.tolist(), "fixed_rotation": np.eye(3).ravel().tolist(),
                        "setting_rotation": np.eye(3).ravel().tolist()},
            scan={"image_range": [1, last - first + 1], "batch_offset": first - 1,
                  "oscillation": [float(f[_F_PHISTT]), float(f[_F_PHIRANGE])]},
            crystal={"__id__": "crystal", "real_space_a": real[0].tolist(), "real_space_b": real[1].tolist(),
                     "real_space_c": real[2].tolist(), "space_group_hall_symbol": sg.hall},
        ))
        beam_s0[k], axes[k], wavelengths[k] = -direction / wl if wl > 0 else 0.0, axis, wl

    cols: dict[str, np.ndarray] = {"miller_index": hkl, "id": sweep_of_row, "batch": batch.astype(np.int32)}
    flag = np.zeros(n, dtype=np.uint64)
    if sum_label:
        cols["intensity.sum.value"], cols["intensity.sum.variance"] = col[sum_label], col[pairs[sum_label]] ** 2
        flag |= np.uint64(F.INTEGRATED_SUM)
    if prf_label:
        cols["intensity.prf.value"], cols["intensity.prf.variance"] = col[prf_label], col[pairs[prf_label]] ** 2
        flag |= np.uint64(F.INTEGRATED_PRF)
    cols["flags"] = flag
    first_of_row = firsts[sweep_of_row]
    xdet = col.get("XDET", col.get("X", np.zeros(n)))
    ydet = col.get("YDET", col.get("Y", np.zeros(n)))
    cols["xyzobs.px.value"] = np.stack([xdet, ydet, batch - first_of_row + 0.5], 1)
    # FRACTIONCALC all zero (AIMLESS/careless outputs) or absent: the reflections are full
    fraction = col.get("FRACTIONCALC")
    cols["partiality"] = fraction.copy() if fraction is not None and np.any(fraction > 0) else np.ones(n)
    for src, dst in (("LP", "lp"), ("QE", "qe"), ("ROT", "rot")):
        if src in col:
            cols[dst] = col[src]
    if "BG" in col:
        cols["background.sum.value"] = col["BG"]
        cols["background.sum.variance"] = col["SIGBG"] ** 2 if "SIGBG" in col else np.zeros(n)
    if "SCALEUSED" in col:
        cols["inverse_scale_factor"] = col["SCALEUSED"]
        cols["inverse_scale_factor_variance"] = col["SIGSCALEUSED"] ** 2 if "SIGSCALEUSED" in col else np.zeros(n)
    cols["d"] = mtz.cell.calculate_d_array(hkl)
    if "ROT" in col and oriented[row_header].all() and (wavelengths > 0).all():
        s1 = _oriented_s1(hkl, A_batch[row_header], axes[sweep_of_row], beam_s0[sweep_of_row],
                          col["ROT"], wavelengths[sweep_of_row])
        if s1 is not None:
            cols["s1"] = s1
    types = {"miller_index": "cctbx::miller::index<>", "id": "int", "batch": "int", "flags": "std::size_t",
             "xyzobs.px.value": "vec3<double>", "s1": "vec3<double>"}
    return ReflectionTable(cols, identifiers, {k: types.get(k, "double") for k in cols}), experiments


def _oriented_s1(hkl: np.ndarray, A: np.ndarray, axis: np.ndarray, s0: np.ndarray, rot_deg: np.ndarray,
                 wavelength: np.ndarray) -> np.ndarray | None:
    """s1 (n, 3) from the headers' orientation, or None if it fails the |s1| = 1/λ check.

    DIALS writes `so` as the unit sample→source vector in the Cambridge frame; older
    exports wrote s0 in the lab frame, so both beam senses are tried.
    """
    best, best_err = None, np.inf
    for sign in (1.0, -1.0):
        s1 = _s1_from_headers(hkl, A, axis, sign * s0, rot_deg)
        ratio = np.linalg.norm(s1, axis=1) * wavelength
        err = float(np.quantile(np.abs(ratio - 1.0), 0.9))
        if err < best_err:
            best, best_err = s1, err
    return best if best_err < 0.02 else None
