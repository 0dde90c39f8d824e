"""Simulated serial still shots, each its own experiment, with planted KB-type truth.

Per still: a random crystal orientation, a scale k and a B (DIALS convention,
g = k exp(B / (2 d^2))). Reflections are found by drawing random points on the detector,
taking the reciprocal-lattice point nearest to the matching Ewald-sphere point, and keeping
it when its excitation error gives a partiality above a cutoff (so partialities follow a
Gaussian rocking profile). Everything is vectorised over all stills of a chunk.
Optional: indexing ambiguity (a planted fraction of stills re-indexed by a twin operator of
a merohedral/polar group, with the crystal model re-indexed consistently), anomalous signal,
noise on the reported partiality.
"""
from __future__ import annotations

import gemmi
import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.table import ReflectionTable
from jaxscale.io.expt import Experiment, ExperimentList
from jaxscale.sim import common as C
from jaxscale.sim.rotation import shaped_cell


_HKL_BITS = 11  # |h|, |k|, |l| < 1024 in the per-still key (checked)


def _still_hkl_key(still: np.ndarray, hkl: np.ndarray) -> np.ndarray:
    """One int64 per (still, h, k, l): still in the high bits, 11 bits per index."""
    off = 1 << (_HKL_BITS - 1)
    h = hkl.astype(np.int64) + off
    packed = (h[:, 0] << (2 * _HKL_BITS)) | (h[:, 1] << _HKL_BITS) | h[:, 2]
    return (still.astype(np.int64) << (3 * _HKL_BITS)) | packed


def _keep_first_n(rows: dict[str, np.ndarray], need: np.ndarray) -> dict[str, np.ndarray]:
    """Drop repeated (still, hkl) rows, then keep at most need[still] rows per still; sorted by (still, hkl)."""
    key = _still_hkl_key(rows["still"], rows["hkl"])
    _, first = np.unique(key, return_index=True)  # sorted by key = by still, then hkl
    rows = {k: v[first] for k, v in rows.items()}
    s = rows["still"]
    rank = np.arange(len(s)) - np.searchsorted(s, s, side="left")
    keep = rank < need[s]
    return {k: v[keep] for k, v in rows.items()}


def _candidates(
    A: np.ndarray, A_inv: np.ndarray, n_per_still: int, *, s0: np.ndarray, detector: C.FlatDetector, d_min: float,
    sigma_excitation: float, mosaic_rad: float, partiality_min: float, space_group: gemmi.SpaceGroup,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Reflections found from n_per_still random detector points on each of m stills (A: (m, 3, 3)).

    The nearest lattice point to the Ewald-sphere point behind each detector point is kept
    when it is allowed, within d_min, on the panel, and its Gaussian-profile partiality
    exp(-eps^2 / 2 sigma^2) (eps: excitation error) reaches partiality_min.
    """
    m = len(A)
    k0 = float(np.linalg.norm(s0))  # 1 / wavelength
    size_f = detector.image_size[0] * detector.pixel_size
    size_s = detector.image_size[1] * detector.pixel_size
    f32 = np.float32  # the search runs in float32 (excitation errors ~1e-4 of k0 ~ 1); kept rows are redone in float64
    norm = lambda v: np.sqrt(np.einsum("...i,...i->...", v, v))  # noqa: E731
    x = rng.uniform(0.0, size_f, (m, n_per_still)).astype(f32)
    y = rng.uniform(0.0, size_s, (m, n_per_still)).astype(f32)
    ray = detector.origin.astype(f32) + x[..., None] * detector.fast.astype(f32) + y[..., None] * detector.slow.astype(f32)
    ray *= (f32(k0) / norm(ray))[..., None]
    ray -= s0.astype(f32)  # reciprocal-space point on the Ewald sphere, (m, K, 3)
    hkl = np.rint(np.einsum("mij,mkj->mki", A_inv.astype(f32), ray))
    r = np.einsum("mij,mkj->mki", A.astype(f32), hkl)
    r_len = norm(r)
    r += s0.astype(f32)
    excitation = norm(r) - f32(k0)
    ok = (r_len > 0) & (r_len <= f32(1.0 / d_min))
    ok &= np.abs(excitation) <= f32(np.sqrt(-2 * np.log(partiality_min)) * 1.01) * (sigma_excitation + mosaic_rad * r_len)
    still, col = np.nonzero(ok)
    hkl = hkl[still, col].astype(np.int32)
    # float64 from here on, for the kept rows only
    r = np.einsum("nij,nj->ni", A[still], hkl.astype(float))
    r_len = norm(r)
    s1 = r + s0
    excitation = norm(s1) - k0
    partiality = np.exp(-0.5 * (excitation / (sigma_excitation + mosaic_rad * r_len)) ** 2)
    s1 *= (k0 / norm(s1))[:, None]
    _, _, on = detector.project(s1)
    on &= (partiality >= partiality_min) & (r_len <= 1.0 / d_min)
    on &= ~np.asarray(space_group.operations().systematic_absences(np.ascontiguousarray(hkl)), dtype=bool)
    return {"still": still[on], "hkl": hkl[on], "s1": s1[on], "partiality": partiality[on]}


def _find_reflections(
    A: np.ndarray, need: np.ndarray, *, max_rounds: int = 6, **kw,
) -> dict[str, np.ndarray]:
    """Reflections of stills with crystal matrices A (m, 3, 3) until each has need[i] of them.

    A pilot on a few stills measures the acceptance rate; later rounds redraw only for the
    stills still short. Returns per reflection: still (local index), hkl (true indexing),
    s1, partiality (true), sorted by still then hkl.
    """
    A_inv = np.linalg.inv(A)
    pilot = min(len(A), 64)
    trial = _candidates(A[:pilot], A_inv[:pilot], 200, **kw)
    if len(trial["still"]) == 0:
        raise ValueError("no reflection of any still reaches the Ewald sphere on the detector; check d_min and the cell")
    rate = len(trial["still"]) / (200.0 * pilot)
    if np.abs(trial["hkl"]).max() >= 1 << (_HKL_BITS - 1):
        raise ValueError("Miller indices beyond 1023: cell too large for this d_min")
    rows: dict[str, np.ndarray] | None = None
    todo = np.arange(len(A))
    for _ in range(max_rounds):  # round 1 fills almost every still; the rest mop up
        deficit = need[todo] - (0 if rows is None else np.bincount(rows["still"], minlength=len(A))[todo])
        n_draw = int(np.ceil(deficit.max() * 1.4 / rate)) + 8
        new = _candidates(A[todo], A_inv[todo], n_draw, **kw)
        new["still"] = todo[new["still"]]
        if rows is None:
            rows = _keep_first_n(new, need)
        else:
            redo = np.zeros(len(A), dtype=bool)
            redo[todo] = True
            again = redo[rows["still"]]
            fixed = {k: v[~again] for k, v in rows.items()}
            merged = _keep_first_n({k: np.concatenate([rows[k][again], new[k]]) for k in new}, need)
            rows = {k: np.concatenate([fixed[k], merged[k]]) for k in new}
        have = np.bincount(rows["still"], minlength=len(A))
        todo = np.nonzero(have < need)[0]
        if len(todo) == 0:
            break
    order = np.argsort(_still_hkl_key(rows["still"], rows["hkl"]), kind="stable")
    return {k: v[order] for k, v in rows.items()}


def twin_operator(cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup, op: str | None) -> np.ndarray:
    """Integer M (3, 3), h' = h @ M, of the indexing-ambiguity operator (gemmi's first twin law by default)."""
    if op is None:
        laws = gemmi.find_twin_laws(cell, space_group, 3.0, False)
        if not laws:
            raise ValueError(f"space group {space_group.hm} with cell {cell.parameters} has no indexing ambiguity")
        return C.hkl_matrix(laws[0])
    return C.hkl_matrix(gemmi.Op(op))


def simulate_stills(
    n_stills: int = 1000,
    obs_per_still: int = 100,
    *,
    space_group: str = "P 21 21 21",
    cell: tuple[float, float, float, float, float, float] | None = None,
    d_min: float = 2.0,
    wavelength: float = 1.3,
    seed: int = 0,
    scale_sigma: float = 0.3,
    B_sigma: float = 5.0,
    outlier_fraction: float = 0.002,
    error_model: tuple[float, float] = (1.0, 0.03),
    anomalous_signal: float = 0.0,
    ambiguity_fraction: float = 0.0,
    ambiguity_op: str | None = None,
    partiality_noise: float = 0.0,
    partiality_min: float = 0.1,
    wilson_B: float = 20.0,
    mean_intensity: float = 1000.0,
    background_per_pixel: float = 1.0,
    sigma_excitation: float = 3e-4,
    mosaicity_deg: float = 0.05,
    chunk_stills: int = 5_000,
) -> tuple[ReflectionTable, ExperimentList, dict]:
    """Simulate `n_stills` integrated stills with up to `obs_per_still` reflections each.

    cell: None gives a cell of the group's crystal system with a = 60 A.
    Per-still truth: scale k ~ exp(N(0, scale_sigma)), B ~ N(0, B_sigma) (DIALS convention).
    ambiguity_fraction: fraction of stills whose reported Miller indices (and crystal model)
    are re-indexed by `ambiguity_op` (a gemmi real-space triplet such as "-x,y,-z"; default
    gemmi's first twin law for the cell/group). partiality_noise: log-normal sd of the
    reported partiality around the true one. Returns (table, experiments, truth).
    """
    rng = np.random.default_rng(seed)
    sg = gemmi.SpaceGroup(space_group)
    unit_cell = gemmi.UnitCell(*cell) if cell is not None else shaped_cell(sg, 60.0)
    beam = C.beam_dict(wavelength)
    s0_dir = np.asarray(beam["direction"])
    s0 = -s0_dir / wavelength
    detector = C.detector_for_resolution(wavelength, d_min)
    unique = C.wilson_unique_set(unit_cell, sg, d_min, mean_intensity=mean_intensity, wilson_B=wilson_B,
                                 anomalous_signal=anomalous_signal, rng=rng)

    U = C.random_rotations(n_stills, rng)
    real_rows = C.real_space_rows(unit_cell, U)  # (n_stills, 3, 3)
    A = np.linalg.inv(real_rows)
    k_still = np.exp(rng.normal(0.0, scale_sigma, n_stills))
    B_still = rng.normal(0.0, B_sigma, n_stills)
    reindexed = rng.random(n_stills) < ambiguity_fraction
    M = twin_operator(unit_cell, sg, ambiguity_op) if ambiguity_fraction > 0 else np.eye(3, dtype=np.int64)

    need = np.full(n_stills, int(obs_per_still), dtype=np.int64)
    found = []
    for start in range(0, n_stills, chunk_stills):  # chunks bound memory; each is vectorised
        stop = min(start + chunk_stills, n_stills)
        refl = _find_reflections(A[start:stop], need[start:stop], space_group=sg, d_min=d_min,
                                 s0=s0, detector=detector, sigma_excitation=sigma_excitation,
                                 mosaic_rad=np.radians(mosaicity_deg), partiality_min=partiality_min, rng=rng)
        refl["still"] = refl["still"] + start
        found.append(refl)
    refl = {k: np.concatenate([f[k] for f in found]) for k in found[0]}
    still, hkl, s1, p_true = refl["still"], refl["hkl"], refl["s1"], refl["partiality"]
    n = len(still)

    d = unit_cell.calculate_d_array(np.ascontiguousarray(hkl))
    g = k_still[still] * np.exp(B_still[still] / (2.0 * d**2))
    urow, i_true = unique.observe(hkl, sg)
    lp = 1.0 / C.polarization_factor(s1, beam)
    qe = detector.quantum_efficiency(s1)
    raw_full = g * i_true * qe / lp
    bg_px = background_per_pixel * rng.lognormal(0.0, 0.2, n)
    meas = C.measure(raw_full, p_true, background_per_pixel=bg_px, n_foreground=40, n_background=300,
                     error_model=error_model, outlier_fraction=outlier_fraction, rng=rng)
    p_reported = p_true
    if partiality_noise > 0:
        p_reported = np.clip(p_true * rng.lognormal(0.0, partiality_noise, n), 1e-3, 1.0)

    # re-index the planted fraction: reported h' = h @ M, crystal A' = A M^-T so A' h' = A h
    hkl_reported = hkl.copy()
    sel = reindexed[still]
    hkl_reported[sel] = (hkl[sel].astype(np.int64) @ M).astype(np.int32)
    M_inv_T = np.linalg.inv(M.astype(float)).T
    rows_reported = real_rows.copy()
    rows_reported[reindexed] = np.linalg.inv(A[reindexed] @ M_inv_T)

    x_mm, y_mm, _ = detector.project(s1)
    px = detector.pixel_size
    x_px, y_px, xo, yo = C.pixel_centroids(x_mm, y_mm, px, 0.3, rng)
    bbox = C.spot_bbox(x_px, y_px, np.zeros(n), np.ones(n))
    zeros = np.zeros(n)
    identifiers = C.new_identifiers(n_stills, rng)
    table = ReflectionTable({
        "miller_index": hkl_reported,
        "id": still.astype(np.int32),
        "panel": np.zeros(n, np.uint64),
        "flags": np.full(n, F.PREDICTED | F.INDEXED | F.INTEGRATED_SUM, dtype=np.uint64),
        "entering": np.zeros(n, bool),
        "d": d,
        "s1": s1,
        "xyzcal.px": np.stack([x_px, y_px, zeros], 1),
        "xyzcal.mm": np.stack([x_mm, y_mm, zeros], 1),
        "xyzobs.px.value": np.stack([xo, yo, zeros + 0.5], 1),
        "xyzobs.mm.value": np.stack([xo * px, yo * px, zeros], 1),
        "bbox": bbox,
        "partiality": p_reported,
        "lp": lp,
        "qe": qe,
        "intensity.sum.value": meas.sum_value,
        "intensity.sum.variance": meas.sum_variance,
        "background.sum.value": meas.background_sum,
        "background.sum.variance": meas.background_variance,
        "background.mean": meas.background_sum / 40.0,
    }, dict(enumerate(identifiers)))
    table.dials_types.update(C.DIALS_TYPES)

    beam_model = beam
    detector_model = detector.to_dict()  # one dict object shared by every experiment
    hall = " " + sg.hall.strip()
    rows_list = rows_reported.tolist()
    experiments = ExperimentList(
        Experiment(
            identifier=identifiers[i],
            beam=beam_model,
            detector=detector_model,
            crystal={"__id__": "crystal", "real_space_a": rows_list[i][0], "real_space_b": rows_list[i][1],
                     "real_space_c": rows_list[i][2], "space_group_hall_symbol": hall},
            imageset={"__id__": "ImageSet", "images": [f"sim_still_{i:07d}.cbf"], "mask": None, "gain": None,
                      "pedestal": None, "dx": None, "dy": None, "params": {}},
        )
        for i in range(n_stills)  # model dicts only; the arrays above are all vectorised
    )

    truth = {
        "kind": np.array("stills"),
        "space_group": np.array(sg.hm),
        "unit_cell": np.array(unit_cell.parameters),
        "still_scale": k_still,
        "still_B": B_still,
        "reindexed": reindexed,
        "ambiguity_matrix": M,
        "orientation": U,
        "inverse_scale": g,
        "partiality_true": p_true,
        "miller_index_true": hkl,
        "i_true": i_true,
        "unique_index": urow,
        "outlier": meas.outlier,
        **C.unique_set_truth(unique, error_model=error_model, wilson_B=wilson_B, mean_intensity=mean_intensity,
                             anomalous_signal=anomalous_signal),
    }
    return table, experiments, truth
