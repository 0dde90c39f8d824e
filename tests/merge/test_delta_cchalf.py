"""ΔCC½ analysis and filter decisions against DIALS 3.12 and planted truth.

Reference numbers: tests/merge/reference/delta_cchalf_lcys.json, written by
tests/merge/reference/delta_cchalf_reference.py (DIALS' own CCHalfFromDials).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxscale.merge import delta_cchalf as dc

REFERENCE = Path(__file__).parent / "reference" / "delta_cchalf_lcys.json"
LCYS = "lcys_4sweep_dials/reference_dials3.12_scale"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def lcys(shared_data):
    from jaxscale.io.expt import read_expt
    from jaxscale.io.refl import read_refl
    return read_refl(shared_data / LCYS / "scaled.refl"), read_expt(shared_data / LCYS / "scaled.expt")


def _planted(table, planted):
    """The reference script's perturbation: per (id, first, last, factor) range, I·factor or reversed."""
    out = table.copy()
    image = np.floor(np.asarray(out["xyzobs.px.value"])[:, 2]).astype(np.int64) + 1
    ids = np.asarray(out["id"])
    values = np.asarray(out["intensity.scale.value"], dtype=np.float64).copy()
    for id_, first, last, factor in planted:
        rows = np.flatnonzero((ids == id_) & (image >= first) & (image <= last))
        values[rows] = values[rows][::-1] if factor is None else values[rows] * factor
    out["intensity.scale.value"] = values
    return out


def _reference_delta(ref: dict, n_groups: int) -> np.ndarray:
    return np.array([ref["delta_cc_half"][str(i)] for i in range(n_groups)])


# --------------------------------------------------------------------------------------
# real data against DIALS


def test_lcys_dataset_mode_matches_dials(lcys, reference):
    table, experiments = lcys
    ref = reference["dataset"]
    obs = dc.delta_cchalf_observations(table, experiments)
    groups = dc.dataset_groups(obs.dataset_id)
    result = dc.delta_cchalf(obs, groups, stdcutoff=ref["stdcutoff"])
    assert len(obs) == ref["n_observations"]
    assert result.cc_half == pytest.approx(ref["mean_cc_half"], abs=1e-12)
    np.testing.assert_allclose(result.delta, _reference_delta(ref, 4), rtol=0, atol=1e-12)
    assert result.cutoff == pytest.approx(ref["cutoff_value"], abs=1e-12)
    assert not result.below_cutoff.any()
    removal = dc.choose_removals(result, groups)
    assert removal.datasets_removed == ref["experiment_ids_fully_removed"] == []


@pytest.mark.parametrize("case", ["image_group_100", "planted_image_group_100",
                                  "planted_image_group_100_std1"])
def test_lcys_image_groups_match_dials(lcys, reference, case):
    table, experiments = lcys
    ref = reference[case]
    if case.startswith("planted"):
        table = _planted(table, reference["planted"])
    obs = dc.delta_cchalf_observations(table, experiments)
    groups = dc.image_groups(obs.dataset_id, obs.image, ref["group_size"])
    # groups: same numbering and image ranges as DIALS
    ranges = {int(k): v for k, v in ref["group_ranges"].items()}
    assert groups.n_groups == len(ranges)
    identifiers = ref["identifiers"]
    for g in range(groups.n_groups):
        assert identifiers[str(groups.dataset_id[g])] == ranges[g][0]
        assert [groups.first_image[g], groups.last_image[g]] == ranges[g][1]
    result = dc.delta_cchalf(obs, groups, stdcutoff=ref["stdcutoff"])
    assert result.cc_half == pytest.approx(ref["mean_cc_half"], abs=1e-12)
    np.testing.assert_allclose(result.delta, _reference_delta(ref, groups.n_groups), rtol=0, atol=1e-12)
    assert result.cutoff == pytest.approx(ref["cutoff_value"], abs=1e-12)
    # removals: edge rule, order, untested ranges, final valid ranges
    valid = {i: [e.image_range] for i, e in enumerate(experiments)}
    removal = dc.choose_removals(result, groups, valid)
    assert [[list(r), d] for r, d in removal.image_ranges_removed] == ref["image_ranges_removed"]
    assert [[list(r) for r in removal.valid_image_ranges[i]] for i in range(4)] == ref["valid_image_ranges_after"]
    assert removal.datasets_removed == ref["experiment_ids_fully_removed"]


# --------------------------------------------------------------------------------------
# planted truth and brute force


def _simulate(n_datasets=30, n_unique=400, seed=0, bad=None):
    """Wilson-like intensities, each data set observes a random 60 % of the reflections."""
    rng = np.random.default_rng(seed)
    true = rng.exponential(1000.0, n_unique)
    d_star_sq = rng.uniform(0.01, 0.5, n_unique)
    rows = [np.flatnonzero(rng.random(n_unique) < 0.6) for _ in range(n_datasets)]
    h = np.concatenate(rows)
    dataset = np.repeat(np.arange(n_datasets), [r.size for r in rows])
    intensity = true[h] + rng.normal(0.0, 0.05 * np.sqrt(true[h]) * 10 + 5.0)
    if bad is not None:
        sel = dataset == bad
        intensity[sel] = rng.permutation(intensity[sel])   # randomised: no longer matches
    return h, intensity, d_star_sq[h], dataset


def test_planted_bad_dataset_is_the_only_one_removed():
    h, intensity, dss, dataset = _simulate(bad=17)
    groups = dc.dataset_groups(dataset)
    result = dc.compute_delta_cchalf(h, intensity, dss, groups.group_id, groups.n_groups)
    assert np.flatnonzero(result.below_cutoff).tolist() == [17]
    assert np.argmin(result.delta) == 17
    removal = dc.choose_removals(result, groups)
    assert removal.datasets_removed == [17]
    # and nothing is flagged without the planted fault
    h, intensity, dss, dataset = _simulate(bad=None)
    clean = dc.compute_delta_cchalf(h, intensity, dss, dataset, 30)
    assert not clean.below_cutoff.any()


def _cc_half_direct(h, x, dss, n_bins):
    """Plain per-reflection, per-bin evaluation of DIALS' formula (independent of the module)."""
    d = 1.0 / np.sqrt(dss)
    lo, hi = 1.0 / d.max() ** 2, 1.0 / d.min() ** 2
    step = (hi - lo) / n_bins
    means, variances = [[] for _ in range(n_bins)], [[] for _ in range(n_bins)]
    for key in np.unique(h):
        values = x[h == key]
        if values.size > 1:
            b = min(max(int(np.floor((1.0 / d[h == key][0] ** 2 - lo) / step)), 0), n_bins - 1)
            means[b].append(values.mean())
            variances[b].append(values.var(ddof=1) / values.size)
    total = count = 0.0
    for m, v in zip(means, variances):
        if len(m) > 1:
            sy, se = np.var(m, ddof=1), np.mean(v)
            total += len(m) * (sy - se) / (sy + se)
            count += len(m)
    return total / count if count else 0.0


def test_leave_one_group_out_equals_recomputation():
    rng = np.random.default_rng(3)
    n_unique, n_obs, n_groups, n_bins = 60, 400, 7, 4
    key = rng.integers(0, n_unique, n_obs)
    dss_unique = rng.uniform(0.02, 0.3, n_unique)
    x = rng.exponential(50.0, n_unique)[key] + rng.normal(0, 10.0, n_obs)
    group = rng.integers(0, n_groups, n_obs)
    result = dc.compute_delta_cchalf(key * 7 + 3, x, dss_unique[key], group, n_groups, n_bins=n_bins)
    assert result.cc_half == pytest.approx(_cc_half_direct(key, x, dss_unique[key], n_bins), abs=1e-12)
    for g in range(n_groups):
        keep = group != g
        # the bins stay those of all data; only reflections vanish
        expected = _cc_half_direct_fixed_bins(key[keep], x[keep], dss_unique[key][keep], dss_unique[key], n_bins)
        assert result.cc_half_without[g] == pytest.approx(expected, abs=1e-12)
    assert result.delta == pytest.approx(result.cc_half - result.cc_half_without)
    assert result.sigma == pytest.approx(np.std(result.delta))


def _cc_half_direct_fixed_bins(h, x, dss, dss_all, n_bins):
    """As _cc_half_direct with bin limits from `dss_all` (DIALS bins once, on all data)."""
    d_all = 1.0 / np.sqrt(dss_all)
    pad_h = np.concatenate([h, [-1, -2]])   # two single observations at the extremes: n=1, unused
    pad_x = np.concatenate([x, [0.0, 0.0]])
    pad_d = np.concatenate([dss, [1.0 / d_all.max() ** 2, 1.0 / d_all.min() ** 2]])
    return _cc_half_direct(pad_h, pad_x, pad_d, n_bins)


def test_group_without_data_is_nan_and_ignored():
    h, intensity, dss, dataset = _simulate(n_datasets=5)
    result = dc.compute_delta_cchalf(h, intensity, dss, dataset, 6)   # group 5 empty
    assert np.isnan(result.delta[5]) and not result.below_cutoff[5]
    assert result.mean == pytest.approx(np.mean(result.delta[:5]))
    assert result.sorted_values()[0].size == 5


# --------------------------------------------------------------------------------------
# grouping and decision rules


def test_image_groups_rule():
    # data set 4: images 3..27, size 10 -> starts 3, 13, 23; 27 - 23 < 9 so 23.. joins 13..
    # data set 1: images 1..30 -> 1..10, 11..20, 21..30 (last group full)
    image = np.concatenate([np.arange(3, 28), np.arange(1, 31)])
    dataset = np.concatenate([np.full(25, 4), np.full(30, 1)])
    groups = dc.image_groups(dataset, image, 10)
    assert groups.dataset_id.tolist() == [1, 1, 1, 4, 4]
    assert groups.first_image.tolist() == [1, 11, 21, 3, 13]
    assert groups.last_image.tolist() == [10, 20, 30, 12, 27]
    assert groups.group_id[:25].tolist() == [3] * 10 + [4] * 15
    assert groups.group_id[25:].tolist() == [0] * 10 + [1] * 10 + [2] * 10
    single = dc.image_groups(np.zeros(5, int), np.array([2, 3, 4, 5, 6]), 10)
    assert single.n_groups == 1 and single.last_image.tolist() == [6]


def _fake_result(flagged):
    flagged = np.asarray(flagged, dtype=bool)
    delta = np.where(flagged, -1.0, 0.0)
    return dc.DeltaCCResult(1.0, 1.0 - delta, delta, 0.0, 0.0, -0.5, flagged, np.zeros(11),
                            np.zeros(10), np.zeros(10, int), 0, 0)


def test_edge_rule_order_and_whole_sweep():
    # sweep 0: 7 groups flagged T T F T F T T; sweep 1: all 3 flagged
    image = np.concatenate([np.arange(1, 71), np.arange(1, 31)])
    dataset = np.concatenate([np.zeros(70, int), np.ones(30, int)])
    groups = dc.image_groups(dataset, image, 10)
    flagged = [1, 1, 0, 1, 0, 1, 1, 1, 1, 1]
    removal = dc.choose_removals(_fake_result(flagged), groups, {0: [(1, 70)], 1: [(1, 30)], 2: None})
    # DIALS' rounds over sorted ids: round 1 removes 0, 1, 6, 7, 8, 9; round 2 removes 5
    assert removal.removed_groups.tolist() == [0, 1, 6, 7, 8, 9, 5]
    assert removal.valid_image_ranges == {0: [(21, 50)], 1: [], 2: None}
    assert removal.datasets_removed == [1]
    dataset_mode = dc.choose_removals(_fake_result([0, 1, 0]), dc.dataset_groups(np.array([0, 5, 9])))
    assert dataset_mode.datasets_removed == [5]


def test_termination_reason_order():
    kw = dict(max_cycles=3, max_percent_removed=10.0, min_completeness=90.0)
    assert dc.termination_reason(3, 0, 50.0, 10.0, **kw) == "no_more_removed"
    assert dc.termination_reason(1, 5, 10.5, 10.0, **kw) == "max_percent_removed"
    assert dc.termination_reason(1, 5, 1.0, 89.0, **kw) == "below_completeness_limit"
    assert dc.termination_reason(3, 5, 1.0, 95.0, **kw) == "max_cycles"
    assert dc.termination_reason(2, 5, 1.0, 95.0, **kw) is None


# --------------------------------------------------------------------------------------
# scale_and_filter_results.json


def _layout(value):
    """Key tree of a JSON document: dicts by key, lists by their first element's layout."""
    if isinstance(value, dict):
        return {k: _layout(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_layout(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def test_scale_and_filter_results_layout_and_stats(lcys, reference):
    """Our document has DIALS' layout; its merging-stats numbers are DIALS' (lcys reference)."""
    from jaxscale.merge.merging import scaled_observations
    from jaxscale.merge.statistics import merging_statistics

    table, experiments = lcys
    stats = merging_statistics(scaled_observations(table, experiments), anomalous=False, _suggest=False)
    summary = dc.merging_stats_summary(stats)
    dials_stats = json.loads((REFERENCE.parent / "lcys_reference_stats.json").read_text())
    np.testing.assert_allclose(summary["ccs"], [b["cc_one_half"] for b in dials_stats["bins"]], atol=1e-9)
    np.testing.assert_allclose(summary["rmerge"], [b["r_merge"] for b in dials_stats["bins"]], rtol=1e-9)
    np.testing.assert_allclose(summary["rpim"], [b["r_pim"] for b in dials_stats["bins"]], rtol=1e-9)
    np.testing.assert_allclose(summary["d_min"], [b["d_min"] for b in dials_stats["bins"]], rtol=1e-9)
    overall = dials_stats["overall"]
    assert summary["overall"]["completeness"] == pytest.approx(100 * overall["completeness"], rel=1e-9)
    assert summary["overall"]["n_obs"] == overall["n_obs"]
    assert summary["overall"]["i_over_sigma_mean"] == pytest.approx(overall["i_over_sigma_mean"], rel=1e-9)

    obs = dc.delta_cchalf_observations(table, experiments)
    groups = dc.image_groups(obs.dataset_id, obs.image, 100)
    result = dc.delta_cchalf(obs, groups, stdcutoff=1.5)
    valid = {i: [e.image_range] for i, e in enumerate(experiments)}
    removal = dc.choose_removals(result, groups, valid)
    identifiers = {i: e.identifier for i, e in enumerate(experiments)}
    n_initial = len(scaled_observations(table, experiments))
    cycle = dc.cycle_results(stats, result, removal, groups, 0, identifiers, [], n_initial)
    assert cycle["cumul_percent_removed"] == 0.0
    assert cycle["delta_cc_half_values"] == sorted(cycle["delta_cc_half_values"])
    reason = dc.termination_reason(1, 0, 0.0, None, max_cycles=2, max_percent_removed=10, min_completeness=None)
    doc = dc.scale_and_filter_results(
        [cycle], reason, n_initial, [(e.identifier, e.image_range) for e in experiments],
        [(identifiers[i], removal.valid_image_ranges[i]) for i in range(4)], stats)
    dials_doc = json.loads((REFERENCE.parent / "delta_cchalf_scale_and_filter_results.json").read_text())
    ours = json.loads(json.dumps(doc))
    assert _layout(ours) == _layout(dials_doc)
    assert ours["termination_reason"] == dials_doc["termination_reason"] == "no_more_removed"
    assert ours["initial_expids_and_image_ranges"] == dials_doc["initial_expids_and_image_ranges"]
    assert ours["expids_and_image_ranges"] == dials_doc["expids_and_image_ranges"]
    assert len(ours["cycle_results"]["1"]["delta_cc_half_values"]) == len(
        dials_doc["cycle_results"]["1"]["delta_cc_half_values"])
