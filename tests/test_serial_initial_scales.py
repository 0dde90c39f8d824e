"""_initial_scales (serial KB starting values): planted truth, and the same numbers as a plain
Gauss-Newton that evaluates every row at every step-halving try."""
from __future__ import annotations

import numpy as np

from jaxscale.serial import _initial_scales, simulate_flat_stills


def _full_evaluation_reference(intensity, variance, group_id, e, d, n_groups, n_experiments, ref):
    """The algorithm written plainly: model and chi2 on all rows at every try and after each step."""
    w, s = 1.0 / variance, 1.0 / (2.0 * d * d)
    log_k, b = np.zeros(n_experiments), np.zeros(n_experiments)

    def model(lk, bb, i0_obs):
        return np.exp(lk[e] + bb[e] * s) * i0_obs

    def chi2_of(m):
        return np.bincount(e, w * (intensity - m) ** 2, minlength=n_experiments)

    for _ in range(2):
        g = np.exp(log_k[e] + b[e] * s)
        den = np.bincount(group_id, w * g * g, minlength=n_groups)
        i0_obs = (np.bincount(group_id, w * g * intensity, minlength=n_groups) / np.where(den > 0, den, 1.0))[group_id]
        m = model(log_k, b, i0_obs)
        chi2 = chi2_of(m)
        for _ in range(5):
            r, m_s = intensity - m, m * s
            a_kk = np.bincount(e, w * m * m, minlength=n_experiments)
            g_k = np.bincount(e, w * r * m, minlength=n_experiments)
            a_kb = np.bincount(e, w * m * m_s, minlength=n_experiments)
            a_bb = np.bincount(e, w * m_s * m_s, minlength=n_experiments)
            g_b = np.bincount(e, w * r * m_s, minlength=n_experiments)
            det = a_kk * a_bb - a_kb * a_kb
            ok = det > 1e-12 * np.maximum(a_kk * a_bb, 1e-300)
            det_safe = np.where(ok, det, 1.0)
            dk = np.where(ok, (a_bb * g_k - a_kb * g_b) / det_safe, 0.0)
            db = np.where(ok, (a_kk * g_b - a_kb * g_k) / det_safe, 0.0)
            step = np.minimum(1.0, np.minimum(1.0 / np.maximum(np.abs(dk), 1e-300),
                                              10.0 / np.maximum(np.abs(db), 1e-300)))
            for _ in range(6):
                worse = ~(chi2_of(model(log_k + step * dk, b + step * db, i0_obs)) <= chi2)
                if not worse.any():
                    break
                step = np.where(worse, 0.5 * step, step)
            step = np.where(worse, 0.0, step)
            log_k, b = log_k + step * dk, b + step * db
            m = model(log_k, b, i0_obs)
            chi2 = chi2_of(m)
        bad = ~np.isfinite(log_k) | ~np.isfinite(b)
        log_k[bad], b[bad] = 0.0, 0.0
    k = np.exp(log_k)
    return np.stack([k / k[ref], b - b[ref]], axis=1)


def _sim(n_stills=400, seed=1):
    sim = simulate_flat_stills(n_stills, 60, n_groups=3000, b_sigma=8.0, outlier_fraction=0.01, seed=seed)
    args = (sim["intensity"], sim["variance"], sim["group_id"], sim["experiment_index"], sim["d"],
            int(sim["n_groups"]), int(sim["n_experiments"]), 0)
    return sim, args


def test_initial_scales_identical_to_full_evaluation():
    # gross outliers and a wide B spread make many stills halve their steps (the rows re-evaluated)
    _, args = _sim()
    np.testing.assert_array_equal(_initial_scales(*args), _full_evaluation_reference(*args))


def test_initial_scales_identical_with_shuffled_rows():
    sim, args = _sim(seed=2)
    perm = np.random.default_rng(0).permutation(sim["intensity"].size)
    shuffled = tuple(a[perm] for a in args[:5]) + args[5:]
    np.testing.assert_array_equal(_initial_scales(*shuffled), _full_evaluation_reference(*shuffled))


def test_initial_scales_identical_in_small_blocks(monkeypatch):
    # blocks of ~500 rows: dozens of still blocks and group-mean blocks, stills without rows between
    import jaxscale.serial as serial

    sim, args = _sim(seed=4)
    keep = np.isin(sim["experiment_index"], np.arange(0, 400, 7), invert=True)
    args = tuple(a[keep] for a in args[:5]) + args[5:7] + (1,)  # still 0 has no rows: reference 1
    monkeypatch.setattr(serial, "_BLOCK_ROWS", 500)
    assert len(serial.blocks_of_runs(args[3], 500)) > 20
    np.testing.assert_array_equal(_initial_scales(*args), _full_evaluation_reference(*args))


def test_initial_scales_recover_planted_k_and_b():
    sim, args = _sim(seed=3)
    x = _initial_scales(*args)
    k_true = sim["k"] / sim["k"][0]
    b_true = sim["B"] - sim["B"][0]
    assert np.sqrt(np.mean(np.log(x[:, 0] / k_true) ** 2)) < 0.07  # 0.049 measured
    assert np.sqrt(np.mean((x[:, 1] - b_true) ** 2)) < 1.5
