"""Error model and outlier rejection recover planted truth."""
from __future__ import annotations

import numpy as np

from jaxscale.errors import (
    cap_weights,
    normalised_intensity_outliers,
    refine_error_model,
    simple_outliers,
    standard_outliers,
    targeted_outliers,
)
from tests.errors.synthetic import make_grouped


def test_individual_recovers_planted_a_b():
    """DIALS' delta = sqrt((n-1)/n)(I/g - I_h)/sigma' has variance ((n-1)/n)^2 for correct
    sigmas (the prefactor is the inverse of the unbiasing one), so with all groups of size
    n = 4 and equal weights in a group the refined a is a_true * 3/4 while b is unbiased."""
    d = make_grouped(n_groups=3000, a=1.4, b=0.04, seed=1, mult_range=(4, 5), g_per_group=True)
    res = refine_error_model(d["intensity"], d["variance"], d["g"], d["group_id"])
    assert res.refined
    assert abs(res.a - 1.4 * 0.75) / 1.05 < 0.05
    assert abs(res.b - 0.04) / 0.04 < 0.15
    # corrected bin variances close to 1
    assert np.all(np.abs(res.bin_variances_corrected - 1.0) < 0.25)
    assert np.isclose(res.isa, 1 / (res.a * res.b))


def test_regression_recovers_planted_a_b():
    d = make_grouped(n_groups=3000, a=1.3, b=0.05, seed=2, g_per_group=True)
    res = refine_error_model(d["intensity"], d["variance"], d["g"], d["group_id"], minimisation="regression")
    assert abs(res.a - 1.3) / 1.3 < 0.15
    assert abs(res.b - 0.05) / 0.05 < 0.3


def test_too_few_reflections_leaves_model_unchanged():
    d = make_grouped(n_groups=40, seed=3)
    res = refine_error_model(d["intensity"], d["variance"], d["g"], d["group_id"], a=1.1, b=0.03)
    assert not res.refined and (res.a, res.b) == (1.1, 0.03) and "Insufficient" in res.message


def test_fixed_b_refines_only_a():
    d = make_grouped(n_groups=2000, a=1.5, b=0.04, seed=4, mult_range=(5, 6), g_per_group=True)
    res = refine_error_model(d["intensity"], d["variance"], d["g"], d["group_id"], b=0.04, refine_b=False)
    assert res.b == 0.04 and abs(res.a - 1.5 * 0.8) / 1.2 < 0.05


def test_standard_outliers_find_planted():
    d = make_grouped(n_groups=1500, a=1.0, b=0.0, seed=5, n_outliers=40)
    w = 1.0 / d["true_var"]
    out = standard_outliers(d["intensity"], w, d["g"], d["group_id"], zmax=6.0)
    assert np.all(out[d["outlier"]])
    assert np.count_nonzero(out & ~d["outlier"]) <= 2


def test_standard_outliers_same_in_blocks_of_groups(monkeypatch):
    # the passes run on blocks of whole groups; blocks of ~50 rows (hundreds of blocks, groups of
    # 2..40 members cut at block edges, shuffled rows) must flag exactly what one block flags
    from jaxscale.errors import outliers

    d = make_grouped(n_groups=800, a=1.0, b=0.0, seed=7, n_outliers=120, mult_range=(2, 40))
    perm = np.random.default_rng(1).permutation(d["intensity"].size)
    args = (d["intensity"][perm], 1.0 / d["true_var"][perm], d["g"][perm], d["group_id"][perm] * 3 + 1)
    monkeypatch.setattr(outliers, "_BLOCK_ROWS", 1 << 30)
    whole = standard_outliers(*args)
    monkeypatch.setattr(outliers, "_BLOCK_ROWS", 50)
    assert len(outliers.blocks_of_runs(np.sort(args[3]), 50)) > 100
    blocked = standard_outliers(*args)
    assert np.count_nonzero(whole) >= 120 and np.all(whole[d["outlier"][perm]])
    np.testing.assert_array_equal(blocked, whole)


def test_group_order_is_the_stable_argsort():
    from jaxscale.errors.outliers import group_order

    rng = np.random.default_rng(2)
    cases = [rng.integers(0, 50, 1000), rng.integers(-5, 70_000, 20_000), rng.integers(-100, 100, 500).astype(np.int8),
             rng.integers(0, 2**31, 5000).astype(np.int32), rng.integers(-2**40, 2**40, 1000),
             rng.integers(0, 300, 1000).astype(np.uint64), np.zeros(0, dtype=np.int64)]
    for ids in cases:
        o = group_order(ids)
        expected = np.argsort(ids, kind="stable")
        np.testing.assert_array_equal(o.order, expected)
        np.testing.assert_array_equal(o.gid_sorted, np.unique(ids, return_inverse=True)[1][expected])


def test_standard_iterates_within_a_group():
    # one group of 6 with two gross outliers: two passes flag both; a pair is never tested
    i = np.array([100.0, 101, 99, 100, 400, -300, 100, 500])
    gid = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    w = np.full(8, 1.0)
    out = standard_outliers(i, w, np.ones(8), gid)
    assert out.tolist() == [False, False, False, False, True, True, False, False]


def test_simple_outliers_single_pass():
    """Unit-sigma data (DIALS' second variance term (g/sum w g^2)^2 is small there)."""
    rng = np.random.default_rng(6)
    gid = np.repeat(np.arange(125), 20)
    i = 100.0 + rng.normal(size=gid.size)
    planted = np.zeros(gid.size, bool)
    planted[::50] = True
    i[planted] += 30.0
    out = simple_outliers(i, np.ones(gid.size), np.ones(gid.size), gid, zmax=6.0)
    assert out.tolist() == planted.tolist()


def test_weight_cap_at_ten_times_median():
    w = np.array([1.0, 2.0, 3.0, 100.0, 5.0, 5.0])
    gid = np.array([0, 0, 0, 0, 1, 1])
    np.testing.assert_allclose(cap_weights(w, gid), [1.0, 2.0, 3.0, 25.0, 5.0, 5.0])


def test_weight_cap_matches_per_group_median_over_size_classes():
    # group sizes 1..3000 (many size classes of the padded sort, odd and even), shuffled rows,
    # heavy-tailed weights so most groups are capped; an inf weight caps at 10 x a finite median
    rng = np.random.default_rng(3)
    sizes = np.r_[rng.integers(1, 40, 300), [1, 2, 3, 4, 1024, 1025, 2047, 2048, 3000]]
    gid = np.repeat(np.arange(sizes.size) * 7 + 5, sizes)  # ids need not be compact
    w = rng.lognormal(0.0, 2.0, gid.size)
    w[np.flatnonzero(gid == gid[-1])[0]] = np.inf
    perm = rng.permutation(gid.size)
    gid, w = gid[perm], w[perm]
    expected = w.copy()
    for g in np.unique(gid):  # reference: the median of each group, one group at a time
        sel = gid == g
        expected[sel] = np.minimum(w[sel], 10.0 * np.median(w[sel]))
    assert np.count_nonzero(expected < w) > 100
    np.testing.assert_array_equal(cap_weights(w, gid), expected)


def test_targeted_outliers():
    out = targeted_outliers(
        np.array([100.0, 200.0, 100.0]), np.array([4.0, 4.0, 4.0]), np.ones(3),
        np.array([100.0, 100.0, np.nan]), np.array([1.0, 1.0, 1.0]),
    )
    assert out.tolist() == [False, True, False]


def test_e_squared_outliers():
    rng = np.random.default_rng(0)
    n = 5000
    dss = rng.uniform(0.01, 1.0, n)
    i = rng.exponential(1000 * np.exp(-2 * dss))  # Wilson-like acentric
    i[:5] = 200 * 1000 * np.exp(-2 * dss[:5])
    out = normalised_intensity_outliers(i, dss, np.ones(n), emax=10.0)
    assert out[:5].all() and out[5:].sum() < 3


def test_e_squared_per_dataset_equals_each_dataset_alone():
    """dataset=...: each data set normalised in its own shells, all at once, gives what the
    test gives on each data set alone (shell counts 10/15/20 by size, a degenerate d range,
    repeated d values, negative and extreme intensities, non-compact data-set ids)."""
    rng = np.random.default_rng(1)
    flagged = 0
    for trial in range(40):  # loop over random multi-data-set cases
        sizes = rng.choice([3, 60, 900, 15001, 20001], size=int(rng.integers(1, 6)), p=[0.1, 0.4, 0.3, 0.1, 0.1])
        ds = rng.permutation(np.repeat(np.arange(sizes.size) * 7, sizes))
        dss = rng.uniform(0.001, 0.5, ds.size) ** rng.uniform(0.5, 2)
        if trial % 10 == 0:
            dss[ds == ds[0]] = 0.25
        if trial % 7 == 0:
            dss = np.round(dss, 2)
        i = rng.gamma(0.5, 100, ds.size) * rng.choice([1.0, 1.0, 1.0, -0.2], ds.size)
        i[rng.random(ds.size) < 0.01] *= 300
        eps = rng.choice([1.0, 2.0], ds.size)
        expected = np.zeros(ds.size, dtype=bool)
        for k in np.unique(ds):  # loop over the (few) data sets of a case
            rows = ds == k
            expected[rows] = normalised_intensity_outliers(i[rows], dss[rows], eps[rows], emax=10.0)
        flagged += int(expected.sum())
        np.testing.assert_array_equal(normalised_intensity_outliers(i, dss, eps, emax=10.0, dataset=ds), expected)
    assert flagged > 100  # the cases do reach the threshold


def test_interp_rows_equals_numpy_interp():
    from jaxscale.errors.outliers import _interp_rows

    rng = np.random.default_rng(2)
    xp, fp = np.sort(rng.uniform(0.05, 0.95, 20)), rng.uniform(0, 5, 20)
    x = np.concatenate([rng.uniform(0, 1, 2000), xp, [0.0, 1.0, np.nan]])
    near = np.clip(np.searchsorted(xp, x) - 1 + rng.integers(-1, 2, x.size), 0, 19)  # a guess one off
    got = _interp_rows(x, xp[None], fp[None], np.array([20]), np.zeros(x.size, dtype=np.int64), near)
    np.testing.assert_array_equal(got, np.interp(x, xp, fp))


def test_rejection_over_dataset_group_keys_equals_each_dataset_alone():
    """The engine's per-data-set initial rejection runs once over (data set, group) keys: the
    groups are independent, so that is each data set's own rejection (standard and simple)."""
    d = make_grouped(n_groups=1200, seed=4, n_outliers=80, mult_range=(2, 12))
    rng = np.random.default_rng(4)
    dataset = rng.integers(0, 5, d["group_id"].size)  # each group's rows spread over data sets
    key = dataset * (int(d["group_id"].max()) + 1) + d["group_id"]
    w = 1.0 / d["variance"]
    for method in (standard_outliers, simple_outliers):
        expected = np.zeros(dataset.size, dtype=bool)
        for k in range(5):  # loop over the data sets
            rows = dataset == k
            expected[rows] = method(d["intensity"][rows], w[rows], d["g"][rows], d["group_id"][rows])
        assert expected.sum() >= 10  # planted outliers found in their data sets' groups
        np.testing.assert_array_equal(method(d["intensity"], w, d["g"], key), expected)
