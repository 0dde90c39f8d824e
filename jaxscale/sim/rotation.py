"""A simulated single rotation sweep with planted scales (physical-model truth).

Reflections are predicted by rotating reciprocal-lattice points about the goniometer axis
and solving the Ewald condition in closed form (all points at once), then projected onto a
flat panel. Each observation's inverse scale is planted in DIALS' physical-model form,

    g = scale(phi) * exp(B(phi) / (2 d^2)) * (1 + absorption(s0c, s1c)),

(DIALS sign convention for B: radiation damage makes B more negative) and the raw
integrated intensity is g * I_true * qe / lp, so that after DIALS' lp/qe (and, for
summation, partiality) corrections E[I] = g * I_true.
"""
from __future__ import annotations

from typing import Callable

import gemmi
import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.table import ReflectionTable
from jaxscale.io.expt import Experiment, ExperimentList
from jaxscale.sim import common as C

# Cell shape per crystal system (lengths relative to a, angles) used when no cell is given.
_CELL_SHAPES = {
    "triclinic": (1.0, 1.15, 1.3, 82.0, 87.0, 95.0),
    "monoclinic": (1.0, 1.15, 1.3, 90.0, 105.0, 90.0),
    "orthorhombic": (1.0, 1.25, 1.45, 90.0, 90.0, 90.0),
    "tetragonal": (1.0, 1.0, 1.4, 90.0, 90.0, 90.0),
    "trigonal": (1.0, 1.0, 1.5, 90.0, 90.0, 120.0),
    "hexagonal": (1.0, 1.0, 1.5, 90.0, 90.0, 120.0),
    "cubic": (1.0, 1.0, 1.0, 90.0, 90.0, 90.0),
}

ROTATION_AXIS = np.array([1.0, 0.0, 0.0])


def default_scale_profile(t: np.ndarray) -> np.ndarray:
    """Smooth relative scale along the sweep; t = fraction of the sweep in [0, 1]."""
    return 1.0 - 0.3 * t + 0.1 * np.sin(4.0 * np.pi * t)


def default_B_profile(t: np.ndarray) -> np.ndarray:
    """Relative B (DIALS convention, A^2): radiation damage, linear in dose, -4 A^2 at the end."""
    return -4.0 * t


def shaped_cell(space_group: gemmi.SpaceGroup, a: float) -> gemmi.UnitCell:
    """A cell of the space group's crystal system with first length `a` (A)."""
    system = space_group.crystal_system_str()
    ra, rb, rc, al, be, ga = _CELL_SHAPES[system]
    return gemmi.UnitCell(a * ra, a * rb, a * rc, al, be, ga)


def predict_rotation(
    hkl: np.ndarray, A: np.ndarray, s0: np.ndarray, axis: np.ndarray, phi_start: float, phi_end: float,
) -> dict[str, np.ndarray]:
    """Reflecting positions of lattice points hkl (n, 3) in a rotation phi_start..phi_end (radians).

    A (3, 3): reciprocal basis as columns (lab frame at phi = 0). Solves
    |s0 + R(phi) r0|^2 = |s0|^2 as a cos(phi) + b sin(phi) = c for both roots and every
    full turn inside the range. Returns per reflection event: index into hkl, phi, s1.
    """
    e = axis / np.linalg.norm(axis)
    r0 = hkl.astype(float) @ A.T  # (n, 3)
    r_par = r0 @ e  # (n,)
    r_perp = r0 - r_par[:, None] * e
    r_cross = np.cross(e, r_perp)
    a = r_perp @ s0
    b = r_cross @ s0
    c = -0.5 * np.einsum("ij,ij->i", r0, r0) - r_par * (e @ s0)
    rho = np.hypot(a, b)
    ok = np.abs(c) < rho
    base = np.arctan2(b, a)
    half = np.arccos(np.clip(c / np.where(rho > 0, rho, 1.0), -1.0, 1.0))
    n_turns = int(np.ceil((phi_end - phi_start) / (2 * np.pi)))
    rows, phis, entering = [], [], []
    idx = np.nonzero(ok)[0]
    for sign in (1.0, -1.0):  # the two roots
        phi0 = phi_start + np.mod(base[idx] + sign * half[idx] - phi_start, 2 * np.pi)
        for turn in range(n_turns):  # a handful of full turns at most
            phi = phi0 + 2 * np.pi * turn
            keep = phi < phi_end
            rows.append(idx[keep])
            phis.append(phi[keep])
            entering.append(np.full(int(keep.sum()), sign > 0))
    row = np.concatenate(rows)
    phi = np.concatenate(phis)
    cphi, sphi = np.cos(phi)[:, None], np.sin(phi)[:, None]
    r = r_par[row, None] * e + cphi * r_perp[row] + sphi * r_cross[row]
    return {"row": row, "phi": phi, "s1": s0 + r, "entering": np.concatenate(entering)}


def _truncated_normal_mean(mu: np.ndarray, sigma: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Mean of N(mu, sigma^2) restricted to [lo, hi] (centroid of a partially recorded spot)."""
    al = (lo - mu) / sigma
    be = (hi - mu) / sigma
    pdf = lambda z: np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)  # noqa: E731
    mass = np.maximum(C.gaussian_fraction(al, be), 1e-300)
    return mu + sigma * (pdf(al) - pdf(be)) / mass


def _count_predictions(cell, space_group, d_min, wavelength, phi_range, detector, U) -> int:
    """How many observations a sweep with this cell and orientation yields (used to size the cell)."""
    hkl = C.lattice_points(cell, space_group, d_min)
    A = np.linalg.inv(C.real_space_rows(cell, U))
    s0 = -np.array([0.0, 0.0, 1.0]) / wavelength
    pred = predict_rotation(hkl, A, s0, ROTATION_AXIS, *phi_range)
    _, _, on = detector.project(pred["s1"])
    return int(on.sum())


def simulate_rotation_sweep(
    n_obs_target: int = 100_000,
    *,
    space_group: str = "P 21 21 21",
    cell: tuple[float, float, float, float, float, float] | None = None,
    d_min: float = 1.6,
    wavelength: float = 0.9763,
    osc_start: float = 0.0,
    osc_width: float = 0.1,
    n_images: int = 3600,
    seed: int = 0,
    scale_profile: Callable[[np.ndarray], np.ndarray] | None = None,
    B_profile: Callable[[np.ndarray], np.ndarray] | None = None,
    absorption_strength: float = 0.05,
    outlier_fraction: float = 0.002,
    error_model: tuple[float, float] = (1.0, 0.02),
    anomalous_signal: float = 0.0,
    wilson_B: float = 20.0,
    mean_intensity: float = 2000.0,
    background_per_pixel: float = 0.5,
    mosaicity_deg: float = 0.1,
) -> tuple[ReflectionTable, ExperimentList, dict]:
    """Simulate one integrated rotation sweep of about `n_obs_target` observations.

    cell: (a, b, c, alpha, beta, gamma); None sizes a cell of the space group's system so the
    sweep yields a little over n_obs_target predictions, which are then subsampled to exactly
    n_obs_target (with an explicit cell all predictions up to n_obs_target are kept).
    scale_profile, B_profile: functions of t = fraction of the sweep in [0, 1] giving the
    relative scale and B (DIALS convention: g_decay = exp(B / (2 d^2))).
    error_model (a, b): the true noise is a^2 (sigma^2 + (b I)^2) around the counting sigma.
    Returns (table, experiments, truth); truth's per-observation arrays follow table rows.
    """
    rng = np.random.default_rng(seed)
    sg = gemmi.SpaceGroup(space_group)
    scale_profile = scale_profile or default_scale_profile
    B_profile = B_profile or default_B_profile
    phi_start = np.radians(osc_start)
    phi_end = np.radians(osc_start + n_images * osc_width)
    detector = C.detector_for_resolution(wavelength, d_min)

    U = C.random_rotations(1, rng)[0]
    if cell is None:  # the count scales with the cell volume: one small trial sizes the cell
        trial_a = 40.0
        trial = _count_predictions(shaped_cell(sg, trial_a), sg, d_min, wavelength, (phi_start, phi_end),
                                   detector, U)
        a_len = trial_a * (1.05 * n_obs_target / max(trial, 1)) ** (1.0 / 3.0)
        unit_cell = shaped_cell(sg, a_len)
    else:
        unit_cell = gemmi.UnitCell(*cell)

    # crystal, lattice, truth on the ASU
    real_rows = C.real_space_rows(unit_cell, U)
    A = np.linalg.inv(real_rows)
    beam = C.beam_dict(wavelength)
    s0_dir = np.asarray(beam["direction"])  # sample -> source
    s0 = -s0_dir / wavelength
    unique = C.wilson_unique_set(unit_cell, sg, d_min, mean_intensity=mean_intensity, wilson_B=wilson_B,
                                 anomalous_signal=anomalous_signal, rng=rng)
    hkl_all = C.lattice_points(unit_cell, sg, d_min)

    # prediction, detector, partiality
    pred = predict_rotation(hkl_all, A, s0, ROTATION_AXIS, phi_start, phi_end)
    s1 = pred["s1"]
    x_mm, y_mm, on = detector.project(s1)
    s1_unit = s1 / np.linalg.norm(s1, axis=1, keepdims=True)
    zeta = np.cross(s1_unit, -s0_dir) @ ROTATION_AXIS
    sigma_phi = np.radians(mosaicity_deg) / np.maximum(np.abs(zeta), 1e-6)
    partiality = C.gaussian_fraction((phi_start - pred["phi"]) / sigma_phi, (phi_end - pred["phi"]) / sigma_phi)
    keep = on & (np.abs(zeta) > 0.02) & (partiality > 0.02)
    keep_idx = np.nonzero(keep)[0]
    if len(keep_idx) > n_obs_target:
        keep_idx = np.sort(rng.choice(keep_idx, size=n_obs_target, replace=False))
    row = pred["row"][keep_idx]
    phi_cal = pred["phi"][keep_idx]
    s1, s1_unit, zeta = s1[keep_idx], s1_unit[keep_idx], zeta[keep_idx]
    x_mm, y_mm = x_mm[keep_idx], y_mm[keep_idx]
    sigma_phi, partiality = sigma_phi[keep_idx], partiality[keep_idx]
    entering = pred["entering"][keep_idx]
    hkl = hkl_all[row]
    n = len(row)

    # observed centroid and planted inverse scale
    width = np.radians(osc_width)
    phi_obs = _truncated_normal_mean(phi_cal, sigma_phi, phi_start, phi_end)
    phi_obs = phi_obs + rng.normal(0.0, 0.05 * width, n)
    phi_obs = np.clip(phi_obs, phi_start + 1e-6 * width, phi_end - 1e-6 * width)
    z_obs = (phi_obs - phi_start) / width
    z_cal = (phi_cal - phi_start) / width
    t_obs = (phi_obs - phi_start) / (phi_end - phi_start)
    d = unit_cell.calculate_d_array(np.ascontiguousarray(hkl, dtype=np.int32))
    scale = scale_profile(t_obs)
    B = B_profile(t_obs)
    decay = np.exp(B / (2.0 * d**2))
    surface, surface_coeffs = C.absorption_surface(absorption_strength, rng)
    R_inv = np.swapaxes(C.rotation_about(ROTATION_AXIS, phi_obs), 1, 2)
    s0c = R_inv @ s0_dir  # (n, 3) crystal-frame reversed beam
    s1c = np.einsum("nij,nj->ni", R_inv, s1_unit)
    absorption = 1.0 + 0.5 * (surface(s0c) + surface(s1c))
    g = scale * decay * absorption

    # true intensity, corrections, measurement
    urow, i_true = unique.observe(hkl, sg)
    lp = np.abs(zeta) / C.polarization_factor(s1, beam)
    qe = detector.quantum_efficiency(s1)
    raw_full = g * i_true * qe / lp
    bg_px = background_per_pixel * rng.lognormal(0.0, 0.2, n)
    meas = C.measure(raw_full, partiality, background_per_pixel=bg_px, n_foreground=50, n_background=400,
                     error_model=error_model, outlier_fraction=outlier_fraction, rng=rng)

    # table
    order = np.argsort(z_obs, kind="stable")
    px = detector.pixel_size
    x_px, y_px, xo, yo = C.pixel_centroids(x_mm, y_mm, px, 0.2, rng)
    sig_z = sigma_phi / width
    z0 = np.clip(np.floor(z_cal - 3 * sig_z), 0, n_images - 1)
    z1 = np.clip(np.ceil(z_cal + 3 * sig_z), z0 + 1, n_images)
    bbox = C.spot_bbox(x_px, y_px, z0, z1)
    flag = np.full(n, F.PREDICTED | F.INDEXED | F.INTEGRATED_SUM | F.INTEGRATED_PRF, dtype=np.uint64)
    flag[rng.random(n) < 0.3] |= np.uint64(F.STRONG | F.USED_IN_REFINEMENT)
    identifier = C.new_identifiers(1, rng)[0]
    cols = {
        "miller_index": hkl.astype(np.int32),
        "id": np.zeros(n, np.int32),
        "panel": np.zeros(n, np.uint64),
        "flags": flag,
        "entering": entering,
        "d": d,
        "s1": s1,
        "xyzcal.px": np.stack([x_px, y_px, z_cal], 1),
        "xyzcal.mm": np.stack([x_mm, y_mm, phi_cal], 1),
        "xyzobs.px.value": np.stack([xo, yo, z_obs], 1),
        "xyzobs.mm.value": np.stack([xo * px, yo * px, phi_obs], 1),
        "bbox": bbox,
        "zeta": zeta,
        "partiality": partiality,
        "lp": lp,
        "qe": qe,
        "intensity.sum.value": meas.sum_value,
        "intensity.sum.variance": meas.sum_variance,
        "intensity.prf.value": meas.prf_value,
        "intensity.prf.variance": meas.prf_variance,
        "background.sum.value": meas.background_sum,
        "background.sum.variance": meas.background_variance,
        "background.mean": meas.background_sum / 50.0,
        "imageset_id": np.zeros(n, np.int32),
    }
    table = ReflectionTable({k: v[order] for k, v in cols.items()}, {0: identifier})
    table.dials_types.update(C.DIALS_TYPES, imageset_id="int")

    experiment = Experiment(
        identifier=identifier,
        beam=beam,
        detector=detector.to_dict(),
        goniometer={"rotation_axis": ROTATION_AXIS.tolist(), "fixed_rotation": np.eye(3).ravel().tolist(),
                    "setting_rotation": np.eye(3).ravel().tolist()},
        scan={"image_range": [1, int(n_images)], "batch_offset": 0,
              "oscillation": [float(osc_start), float(osc_width)],
              "exposure_time": [0.1] * int(n_images), "epochs": [0.1 * k for k in range(int(n_images))],
              "valid_image_ranges": {}},
        crystal=C.crystal_dict(real_rows, sg),
        profile={"__id__": "gaussian_rs", "n_sigma": 3.0, "sigma_b": 0.03, "sigma_m": float(mosaicity_deg)},
        imageset={"__id__": "ImageSequence", "template": "sim_rotation_#####.cbf", "mask": None, "gain": None,
                  "pedestal": None, "dx": None, "dy": None, "params": {}},
    )
    experiments = ExperimentList([experiment])

    t_grid = (np.arange(n_images + 1)) / n_images
    truth = {
        "kind": np.array("rotation"),
        "space_group": np.array(sg.hm),
        "unit_cell": np.array(unit_cell.parameters),
        "inverse_scale": g[order],
        "scale": scale[order],
        "B": B[order],
        "decay": decay[order],
        "absorption": absorption[order],
        "i_true": i_true[order],
        "unique_index": urow[order],
        "outlier": meas.outlier[order],
        **C.unique_set_truth(unique, error_model=error_model, wilson_B=wilson_B, mean_intensity=mean_intensity,
                             anomalous_signal=anomalous_signal),
        "phi_grid_deg": osc_start + t_grid * n_images * osc_width,
        "scale_profile": scale_profile(t_grid),
        "B_profile": B_profile(t_grid),
        "absorption_linear": surface_coeffs["linear"],
        "absorption_quadratic": surface_coeffs["quadratic"],
        "orientation": U,
    }
    return table, experiments, truth
