"""Reciprocal-space symmetry on arrays of Miller indices: ASU mapping, grouping, d-spacing.

gemmi owns the space-group operators and the asymmetric-unit definition (the CCP4 ASU,
which is the cctbx/DIALS convention: checked identical for all 527 cctbx settings in
`tests/data/test_symmetry.py`). Everything here works on whole (n, 3) arrays.
"""
from __future__ import annotations

from typing import Sequence

import gemmi
import numpy as np

_PACK_BITS = 21  # each index shifted into [0, 2**21): |h| < 2**20 is ample for any crystal
_PACK_OFFSET = 1 << (_PACK_BITS - 1)


def _as_hkl(miller: np.ndarray) -> np.ndarray:
    """Contiguous int32 (n, 3) copy, the layout gemmi's array functions accept."""
    return np.ascontiguousarray(np.asarray(miller).reshape(-1, 3), dtype=np.int32)


def rotation_matrices(space_group: gemmi.SpaceGroup) -> np.ndarray:
    """Integer matrices M (n_ops, 3, 3) with h' = h @ M for each symmetry operation.

    Obtained by letting gemmi apply each operation to the unit indices (no operator
    algebra re-derived here); centring translations do not act on Miller indices.
    """
    units = ([1, 0, 0], [0, 1, 0], [0, 0, 1])
    mats = [[op.apply_to_hkl(u) for u in units] for op in space_group.operations().sym_ops]
    return np.asarray(mats, dtype=np.int64)


def pack_hkl(hkl: np.ndarray) -> np.ndarray:
    """One int64 key per (h, k, l) row (n,), ordered like (h, k, l) lexicographically."""
    h = np.asarray(hkl, dtype=np.int64) + _PACK_OFFSET
    return (h[:, 0] << (2 * _PACK_BITS)) | (h[:, 1] << _PACK_BITS) | h[:, 2]


def map_to_asu(
    miller: np.ndarray, space_group: gemmi.SpaceGroup, anomalous: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Map Miller indices (n, 3) into the reciprocal ASU; returns (hkl_asu (n, 3), isym (n,)).

    `isym` is the CCP4 M/ISYM code (2k+1: symmetry op k applied; 2k+2: op k then Friedel
    inversion), with gemmi's operator order. With `anomalous=False` Friedel mates share
    the ASU index; with `anomalous=True` an I(-) observation gets the negated ASU index,
    as cctbx's `map_to_asu` with anomalous_flag does (centric reflections and all
    reflections of centrosymmetric groups count as I(+)).
    """
    hkl = _as_hkl(miller)
    n = hkl.shape[0]
    data = gemmi.IntAsuData(gemmi.UnitCell(1, 1, 1, 90, 90, 90), space_group, hkl, np.zeros(n, np.int32))
    data.ensure_asu()
    asu = np.asarray(data.miller_array, dtype=np.int32)
    isym = _isym(hkl, asu, rotation_matrices(space_group))
    if anomalous:
        plus = (isym % 2 == 1) | is_centric(hkl, space_group)
        asu = np.where(plus[:, None], asu, -asu).astype(np.int32)
    return asu, isym


def _isym(hkl: np.ndarray, asu: np.ndarray, rotations: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """CCP4 ISYM (n,) of h given its ASU index and the operators' matrices (n_ops, 3, 3).

    The image h @ M_k is identified by the exact float key (h @ M_k) . (R^2, R, 1) with
    R = 2 max|image component| + 1 (exact while R^3 < 2^53), so all operators are one BLAS product
    per chunk of rows. First matching operator wins, +image before -image (gemmi's order).
    """
    n = hkl.shape[0]
    growth = float(np.abs(rotations).sum(axis=1).max(initial=1))  # max |(h @ M)_j| / max |h|
    radix = 2.0 * growth * float(np.abs(hkl).max(initial=0)) + 1.0
    if radix**3 >= 2.0**53:
        raise ValueError(f"Miller indices too large for ASU mapping: max |h| = {np.abs(hkl).max()}")
    weights = np.array([radix * radix, radix, 1.0])
    op_keys = np.einsum("kij,j->ik", rotations.astype(np.float64), weights)  # (3, n_ops)
    isym = np.empty(n, dtype=np.int32)
    for start in range(0, n, chunk):  # loop over row blocks, to bound memory
        rows = slice(start, min(start + chunk, n))
        keys = hkl[rows].astype(np.float64) @ op_keys  # (rows, n_ops)
        target = (asu[rows].astype(np.float64) @ weights)[:, None]
        is_plus = keys == target
        first = np.argmax(is_plus | (keys == -target), axis=1)
        plus_first = np.take_along_axis(is_plus, first[:, None], axis=1)[:, 0]
        isym[rows] = 2 * first + np.where(plus_first, 1, 2)
    return isym


def anomalous_plus(miller: np.ndarray, space_group: gemmi.SpaceGroup) -> np.ndarray:
    """True (n,) where the observation is I(+) under cctbx's anomalous convention."""
    asu, _ = map_to_asu(miller, space_group, anomalous=True)
    base, _ = map_to_asu(miller, space_group, anomalous=False)
    return np.all(asu == base, axis=1)


def group_ids(
    hkl_asu: np.ndarray, plus_minus: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Integer group of each observation: (group_id (n,), unique_hkl (m, 3)).

    Groups are numbered in increasing packed-(h, k, l) order. With `plus_minus` (bool (n,),
    True = I(+)) the key also separates I(+) from I(-) for the same ASU index.
    """
    hkl = np.asarray(hkl_asu).reshape(-1, 3)
    key = pack_hkl(hkl)
    if plus_minus is not None:
        key = (key << 1) | (~np.asarray(plus_minus, dtype=bool)).astype(np.int64)
    unique_key, first, group_id = np.unique(key, return_index=True, return_inverse=True)
    return group_id.reshape(-1).astype(np.int64), hkl[first].astype(np.int32)


def is_centric(hkl: np.ndarray, space_group: gemmi.SpaceGroup) -> np.ndarray:
    """Centric flag (n,) bool."""
    return np.asarray(space_group.operations().centric_flag_array(_as_hkl(hkl)), dtype=bool)


def epsilon(hkl: np.ndarray, space_group: gemmi.SpaceGroup) -> np.ndarray:
    """Symmetry enhancement factor epsilon (n,) without centring (cctbx `epsilons()`)."""
    ops = space_group.operations()
    return np.asarray(ops.epsilon_factor_without_centering_array(_as_hkl(hkl)), dtype=np.int32)


def is_systematically_absent(hkl: np.ndarray, space_group: gemmi.SpaceGroup) -> np.ndarray:
    """Systematic-absence flag (n,) bool."""
    return np.asarray(space_group.operations().systematic_absences(_as_hkl(hkl)), dtype=bool)


def d_star_sq(hkl: np.ndarray, cell: gemmi.UnitCell) -> np.ndarray:
    """1/d^2 (n,) from the reciprocal metric tensor of `cell`: h G* h^T."""
    g = cell.reciprocal_metric_tensor()  # SMat33: u11 u22 u33 u12 u13 u23
    h = np.asarray(hkl, dtype=np.float64).reshape(-1, 3)
    return (
        g.u11 * h[:, 0] ** 2 + g.u22 * h[:, 1] ** 2 + g.u33 * h[:, 2] ** 2
        + 2.0 * (g.u12 * h[:, 0] * h[:, 1] + g.u13 * h[:, 0] * h[:, 2] + g.u23 * h[:, 1] * h[:, 2])
    )


def d_spacing(hkl: np.ndarray, cell: gemmi.UnitCell) -> np.ndarray:
    """Resolution d (n,) in Angstrom; inf for (0, 0, 0)."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(d_star_sq(hkl, cell))


def best_unit_cell(experiments: Sequence) -> gemmi.UnitCell:
    """Per-parameter median of the experiments' cells (recalculated cell where present).

    DIALS' `determine_best_unit_cell`: the one cell used for d-cuts and merging statistics.
    """
    params = np.array([e.unit_cell.parameters for e in experiments], dtype=np.float64)
    return gemmi.UnitCell(*np.median(params, axis=0))
