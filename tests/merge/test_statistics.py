"""Merging statistics against DIALS 3.12: its own log (printed digits) and its full-precision
numbers (fixtures made by reference/make_reference_stats.py with DIALS' python)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.merge.merging import scaled_observations
from jaxscale.merge.statistics import (
    critical_correlation,
    merging_statistics,
    resolution_cc_half_fit,
    split_halves,
    volume_bin_limits,
)

REFERENCE = Path(__file__).parent / "reference"

# DIALS/iotbx name -> our ShellStatistics field
NAMES = {
    "d_max": "d_max", "d_min": "d_min", "n_obs": "n_obs", "n_uniq": "n_uniq",
    "mean_redundancy": "multiplicity", "completeness": "completeness", "i_mean": "i_mean",
    "sigi_mean": "sigi_mean", "i_over_sigma_mean": "i_over_sigma_mean", "r_merge": "r_merge",
    "r_meas": "r_meas", "r_pim": "r_pim", "r_anom": "r_anom", "cc_one_half": "cc_half",
    "cc_one_half_n_refl": "cc_half_n", "cc_one_half_significance": "cc_half_significant",
    "cc_one_half_critical_value": "cc_half_critical", "cc_one_half_sigma_tau": "cc_half_sigma_tau",
    "cc_star": "cc_star", "cc_anom": "cc_anom", "cc_anom_significance": "cc_anom_significant",
    "cc_anom_critical_value": "cc_anom_critical", "anom_completeness": "anom_completeness",
    "anom_signal": "anom_signal", "delta_i_mean_over_sig_delta_i_mean": "delta_i_over_sigma",
    "anom_slope": "anom_slope", "anom_intercept": "anom_intercept", "anom_slope_n": "anom_slope_n",
}


def _stats(folder: Path):
    obs = scaled_observations(read_refl(folder / "scaled.refl"), read_expt(folder / "scaled.expt"))
    return obs, merging_statistics(obs)


@pytest.fixture(scope="module")
def lcys(shared_data):
    return _stats(shared_data / "lcys_4sweep_dials" / "reference_dials3.12_scale")


@pytest.fixture(scope="module")
def quartz(shared_data):
    return _stats(shared_data / "quartz_3ded_dials")


def _compare_shell(ours, ref: dict, i: int, where: str, rtol=1e-9, skip=()):
    for dials_name, name in NAMES.items():
        want = ref.get(dials_name)
        if want is None or dials_name in skip:
            continue
        got = getattr(ours, name)[i].item()
        if isinstance(want, bool):
            assert bool(got) == want, f"{where} {name}: {got} != {want}"
        else:
            assert got == pytest.approx(want, rel=rtol, abs=1e-12), f"{where} {name}: {got} != {want}"


@pytest.mark.parametrize("dataset", ["lcys", "quartz"])
def test_full_precision_against_iotbx(dataset, request):
    """Every per-bin and overall number equals iotbx's (1e-9 relative) on the same input."""
    obs, st = request.getfixturevalue(dataset)
    ref = json.loads((REFERENCE / f"{dataset}_reference_stats.json").read_text())
    assert len(obs) == ref["n_obs_array"]
    for i, b in enumerate(ref["bins"]):
        _compare_shell(st.bins, b, i, f"bin {i + 1}")
    _compare_shell(st.overall, ref["overall"], 0, "overall")
    if ref["anomalous_bins"] is not None:
        for i, b in enumerate(ref["anomalous_bins"]):
            _compare_shell(st.anomalous_bins, b, i, f"anomalous bin {i + 1}")
        _compare_shell(st.anomalous_overall, ref["anomalous_overall"], 0, "anomalous overall")
    assert st.d_min_cc_half_fit == pytest.approx(ref["d_min_cc_half_fit"], abs=1e-4)


# --- dials.scale.log, parsed: every shell to the printed precision ----------------------

_BIN_COLS = ["d_max", "d_min", "n_obs", "n_uniq", "multiplicity", "completeness%", "i_mean",
             "i_over_sigma_mean", "r_merge", "r_meas", "r_pim", "r_anom", "cc_half", "cc_anom"]
_SUMMARY = {  # log label -> (source, field, scale)
    "High resolution limit": ("main", "d_min", 1), "Low resolution limit": ("main", "d_max", 1),
    "Completeness": ("main", "completeness", 100), "Multiplicity": ("main", "multiplicity", 1),
    "I/sigma": ("main", "i_over_sigma_mean", 1), "Rmerge(I)": ("main", "r_merge", 1),
    "Rmerge(I+/-)": ("anom", "r_merge", 1), "Rmeas(I)": ("main", "r_meas", 1),
    "Rmeas(I+/-)": ("anom", "r_meas", 1), "Rpim(I)": ("main", "r_pim", 1),
    "Rpim(I+/-)": ("anom", "r_pim", 1), "CC half": ("main", "cc_half", 1),
    "Anomalous completeness": ("anom", "anom_completeness", 100),
    "Anomalous multiplicity": ("anom", "multiplicity", 1),
    "Anomalous correlation": ("anom", "cc_anom", 1), "Anomalous slope": ("anom", "anom_slope", 1),
    "dF/F": ("anom", "anom_signal", 1), "dI/s(dI)": ("anom", "delta_i_over_sigma", 1),
    "Total observations": ("main", "n_obs", 1), "Total unique": ("main", "n_uniq", 1),
}


def _parse_log(text: str):
    block = text.split("Merging statistics by resolution bin")[1].split("Summary of merging")[0]
    rows = [ln.split() for ln in block.splitlines() if re.match(r"^\s*\d+\.\d\d\s+\d+\.\d\d\s+\d+", ln)]
    summary = {}
    for ln in text.split("Summary of merging statistics")[1].splitlines():
        m = re.match(r"^(\S.*?)\s{2,}(-?[\d.]+(?:\s+-?[\d.]+)*)\s*$", ln)
        if m and m.group(1) in _SUMMARY:
            summary[m.group(1)] = m.group(2).split()
    return rows, summary


def _same_printed(got: float, token: str) -> bool:
    """`got` rounded to the token's decimals equals the printed number (−0.000 == 0.000)."""
    token = token.rstrip("*")
    decimals = len(token.split(".")[1]) if "." in token else 0
    return float("%.*f" % (decimals, got)) == float(token)


def test_lcys_log_every_shell(lcys, shared_data):
    """Our numbers printed at the log's precision equal dials.scale.log, every shell."""
    _, st = lcys
    log = (shared_data / "lcys_4sweep_dials" / "reference_dials3.12_scale" / "dials.scale.log").read_text()
    rows, summary = _parse_log(log)
    assert len(rows) == len(st.bins) + 1 == 21
    for i, tokens in enumerate(rows):
        shells, k = (st.bins, i) if i < 20 else (st.overall, 0)
        assert len(tokens) == len(_BIN_COLS)
        for col, token in zip(_BIN_COLS, tokens):
            name = col.rstrip("%")
            got = getattr(shells, name)[k].item() * (100 if col.endswith("%") else 1)
            assert _same_printed(got, token), f"row {i + 1} {name}: {got} vs log {token}"
        assert shells.cc_half_significant[k] == tokens[12].endswith("*")
        assert shells.cc_anom_significant[k] == tokens[13].endswith("*")
    assert set(summary) == set(_SUMMARY)
    for label, tokens in summary.items():
        source, name, scale = _SUMMARY[label]
        overall, bins = (st.overall, st.bins) if source == "main" else (st.anomalous_overall, st.anomalous_bins)
        values = [overall, bins, bins]
        idx = [0, 0, -1]
        for token, s, j in zip(tokens, values, idx):
            got = getattr(s, name)[j].item() * scale
            assert _same_printed(got, token), f"{label}: {got} vs log {token}"
    assert st.suggested is None and "Resolution limit suggested" not in log


# --- planted truth ---------------------------------------------------------------------

def _split_reference(groups, values, weights):
    """Loop-by-loop cctbx split (merging_stats.md §9) on groups given as index lists."""
    rng = np.random.RandomState(1)
    out = []
    for g in groups:
        n = len(g)
        if n < 2:
            out.append((np.nan, np.nan))
            continue
        x, w = values[g].copy(), weights[g].copy()
        nsum = n // 2
        if n % 2 and rng.random_sample() < 0.5:
            nsum += 1
        s = sw = 0.0
        for i in range(nsum):
            j = i + min(n - i - 1, int(rng.random_sample() * (n - i)))
            s, sw = s + x[j] * w[j], sw + w[j]
            x[j], w[j] = x[i], w[i]
        out.append((s / sw, np.sum(x[nsum:] * w[nsum:]) / np.sum(w[nsum:])))
    return np.array(out)


def test_split_halves_matches_sequential_reference():
    rng = np.random.default_rng(5)
    n = rng.integers(1, 12, size=300)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    values, weights = rng.normal(size=n.sum()), rng.uniform(0.5, 2, size=n.sum())
    reset = np.zeros(len(n), bool)
    reset[[0, 120, 121, 250]] = True                  # four streams, like four shells
    h1, h2 = split_halves(start, n, reset, values, weights)
    bounds = [0, 120, 121, 250, len(n)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        groups = [np.arange(start[k], start[k] + n[k]) for k in range(a, b)]
        ref = _split_reference(groups, values, weights)
        np.testing.assert_allclose(h1[a:b], ref[:, 0], rtol=1e-13, equal_nan=True)
        np.testing.assert_allclose(h2[a:b], ref[:, 1], rtol=1e-13, equal_nan=True)


@pytest.mark.parametrize("seed,n_u", [(0, 1 << 15), (1, 1 << 15), (2, 50)])  # 50: the stream runs out
def test_draw_chain_on_host_equals_the_scan(seed, n_u):
    """The host chain of small jobs gives the compiled scan's integers exactly."""
    from jaxscale.merge.statistics import _draw_positions, _draw_positions_host

    rng = np.random.default_rng(seed)
    n = rng.integers(0, 9, size=700)
    reset = rng.random(700) < 0.03
    reset[0] = seed != 1  # a chain that does not start with a reset
    u = np.random.RandomState(1).random_sample(n_u)
    first, nsum = _draw_positions_host(n, reset, u)
    want_first, want_nsum = (np.asarray(a) for a in _draw_positions(n, reset, u))
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_array_equal(nsum, want_nsum)
    extra = (nsum - n // 2)[(n % 2 == 1) & (n >= 3)]
    assert set(extra.tolist()) == {0, 1}  # some odd groups drew the extra number, some not


def test_critical_correlation_student_t():
    # t_{0.99}(10) = 2.763769458 (tables); r = t / sqrt(10 + t^2)
    t = 2.763769458
    assert critical_correlation(np.array([12]))[0] == pytest.approx(t / math.sqrt(10 + t * t), rel=1e-8)
    assert critical_correlation(np.array([2, 1]))[:2].tolist() == [0.0, 0.0]


def test_volume_bins_equal_d_star_cubed():
    ds2 = np.linspace(0.02, 2.9, 500)
    lim = volume_bin_limits(ds2, 20)
    steps = np.diff(lim[1:-1] ** 1.5)
    np.testing.assert_allclose(steps, steps[0], rtol=1e-10)


def test_tanh_fit_recovers_planted_curve():
    x = np.linspace(0.1, 3.0, 20)
    r, s0 = 0.4, 2.2
    y = 0.5 * (1 - np.tanh((x - s0) / r))
    d = resolution_cc_half_fit(x, y, np.ones(20, bool), limit=0.3)
    x03 = s0 + r * np.arctanh(1 - 2 * 0.3)       # exact crossing of the planted curve
    j = np.flatnonzero(x > x03)[0]               # DIALS interpolates linearly between bins
    xs = x[j - 1] + (0.3 - y[j - 1]) * (x[j] - x[j - 1]) / (y[j] - y[j - 1])
    assert d == pytest.approx(1 / math.sqrt(xs), rel=1e-6)
