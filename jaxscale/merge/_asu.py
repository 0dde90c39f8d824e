"""Vectorised reciprocal-space ASU mapping for merging (gemmi's CCP4 ASU definition).

Private stand-in until `jaxscale.data.symmetry` lands: gemmi 0.7.5 only maps one index at
a time (`ReciprocalAsu.to_asu`), so all symmetry images of every index are formed at once
from gemmi's rotation matrices and the first image inside gemmi's ASU condition is taken.
For P222-type (mmm) Laue groups the CCP4 and cctbx ASUs coincide; for others the set of
unique reflections is the same but the representative (and so the group order that the
half-dataset split depends on, merging_stats.md §9) may differ from cctbx.
"""
from __future__ import annotations

import re
from functools import lru_cache

import gemmi
import numpy as np

_CMP = re.compile(r"([hkl])\s*(>=|<=|==|=|>|<)\s*(-?[hkl0-9]+)")


@lru_cache(maxsize=64)
def _asu_condition(hm: str):
    """gemmi's ASU condition string for `hm` compiled into a numpy predicate."""
    text = gemmi.ReciprocalAsu(gemmi.SpaceGroup(hm)).condition_str()
    expr = _CMP.sub(lambda m: f"({m.group(1)}{'==' if m.group(2) in ('=', '==') else m.group(2)}{m.group(3)})", text)
    expr = expr.replace(" and ", " & ").replace(" or ", " | ")
    code = compile(expr, f"<asu {hm}>", "eval")
    return lambda h, k, l: np.broadcast_to(eval(code, {}, {"h": h, "k": k, "l": l}), h.shape)


@lru_cache(maxsize=64)
def _rotations(hm: str) -> np.ndarray:
    """Point-group rotations as integer matrices acting on row vectors h' = h R, (n_ops, 3, 3)."""
    ops = gemmi.SpaceGroup(hm).operations()
    return np.array([np.array(op.rot) // op.DEN for op in ops.sym_ops], dtype=np.int64)


def map_to_asu(miller: np.ndarray, space_group: gemmi.SpaceGroup, anomalous: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map Miller indices (n, 3) to the ASU.

    Returns (asu (n, 3) int64, friedel_minus (n,) bool, centric (n,) bool). `asu` is the
    ASU representative of the full Laue orbit; `friedel_minus` is True where h is reached
    from it only through the inversion (an I(−) observation). Centric reflections are
    always I(+). With anomalous=True the returned key is −asu for I(−) rows, as cctbx
    does, so that grouping on the key keeps Bijvoet mates apart.
    """
    hkl = np.asarray(miller, dtype=np.int64).reshape(-1, 3)
    rot = _rotations(space_group.hm)
    proper = np.einsum("ni,oij->noj", hkl, rot)                  # (n, n_ops, 3)
    images = np.concatenate([proper, -proper], axis=1)           # (n, 2 n_ops, 3)
    inside = _asu_condition(space_group.hm)(images[..., 0], images[..., 1], images[..., 2])
    first = np.argmax(inside, axis=1)                             # first image in the ASU
    if len(hkl) and not inside[np.arange(len(hkl)), first].all():
        raise ValueError(f"ASU mapping failed for some indices in {space_group.hm}")
    asu = images[np.arange(len(hkl)), first]
    n_ops = rot.shape[0]
    centric = (proper == -hkl[:, None, :]).all(axis=2).any(axis=1)   # −h in the proper orbit
    proper_hit = (inside[:, :n_ops]).any(axis=1)
    friedel_minus = ~proper_hit & ~centric
    if anomalous:
        asu = np.where(friedel_minus[:, None], -asu, asu)
    return asu, friedel_minus, centric
