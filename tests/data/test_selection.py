"""Reflection-subset selection: DIALS counts on quartz, the connected-selection example of DIALS'
docstring, determinism and group-size rules on synthetic data."""
from __future__ import annotations

import gemmi
import numpy as np

from jaxscale.data.prepare import prepare_dataset, suitable_for_scaling
from jaxscale.data.selection import (
    ClassMatrix,
    _greedy_class_fill,
    _random_groups_per_dataset,
    preselection,
    quasi_normalised_esq,
    select_connected_across_datasets,
    select_intensity_ranges,
    select_multi_dataset_quasi_random,
    select_multi_dataset_random,
    select_single_dataset,
)
from jaxscale.data.symmetry import group_ids, map_to_asu
from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl


def test_quartz_preselection_and_all_groups(shared_data):
    """reference_numbers.md §1: 1479 of 1512 pre-selected; 293/293 groups (1474 reflections)."""
    base = shared_data / "quartz_3ded_dials/integrated"
    t = prepare_dataset(read_refl(f"{base}.refl")).table
    t = t.select(suitable_for_scaling(t))
    assert len(t) == 1512
    pre = preselection(t["intensity"], t["variance"], t["partiality"])
    assert pre.sum() == 1479
    gid, _ = group_ids(map_to_asu(t["miller_index"], read_expt(f"{base}.expt")[0].space_group)[0])
    s = select_single_dataset(gid, pre, np.random.default_rng(0))
    assert (s.n_groups_selected, s.n_groups_available, int(s.selected.sum())) == (293, 293, 1474)


def test_greedy_fill_docstring_example():
    """The 3-dataset x 7-group example in DIALS' reflection_selection.py: groups 1, 5, 0, 4."""
    m = np.array([[3, 3, 2, 0, 1, 1, 1], [0, 2, 0, 0, 3, 2, 1], [2, 1, 1, 5, 0, 4, 0]], dtype=float)
    order = np.argsort(-(m > 0).sum(axis=0), kind="stable")
    assert order.tolist() == [1, 5, 0, 2, 4, 6, 3]
    classes, cols = np.nonzero(m)
    pairs = np.repeat(np.stack([classes, cols]), m[classes, cols].astype(int), axis=1)  # one per reflection
    matrix = ClassMatrix.from_pairs(*pairs, *m.shape, by_coverage=True)
    assert matrix.order.tolist() == order.tolist()
    used = _greedy_class_fill(matrix, 5, 0, 1000)
    assert sorted(order[used].tolist()) == [0, 1, 4, 5]


def test_class_matrix_counts_and_orders_by_coverage():
    rng = np.random.default_rng(3)
    classes, cols = rng.integers(0, 4, 200), rng.integers(0, 30, 200)
    dense = np.zeros((4, 30))
    np.add.at(dense, (classes, cols), 1.0)
    matrix = ClassMatrix.from_pairs(classes, cols, 4, 30, by_coverage=True)
    assert matrix.order.tolist() == np.argsort(-(dense > 0).sum(axis=0), kind="stable").tolist()
    for j in range(30):  # loop over the columns and rows of a small test matrix
        assert np.array_equal(matrix.column(j), dense[:, matrix.order[j]])
    for c in range(4):
        assert matrix.row_columns(c).tolist() == np.flatnonzero(dense[c, matrix.order]).tolist()


def _synthetic(n_groups=3000, n_datasets=3, seed=0):
    rng = np.random.default_rng(seed)
    mult = rng.integers(1, 8, size=n_groups)
    gid = np.repeat(np.arange(n_groups), mult)
    did = rng.integers(0, n_datasets, size=gid.size)
    dss = np.repeat(rng.uniform(0.01, 1.0, size=n_groups), mult)
    intensity = rng.gamma(2.0, 50.0, size=gid.size)
    variance = intensity + 25.0
    return gid, did, intensity, variance, dss


def test_single_dataset_rules_and_determinism():
    gid, _, i, v, _ = _synthetic()
    pre = np.ones(gid.size, bool)
    a = select_single_dataset(gid, pre, np.random.default_rng(5), min_groups=500, min_reflections=100)
    b = select_single_dataset(gid, pre, np.random.default_rng(5), min_groups=500, min_reflections=100)
    assert np.array_equal(a.selected, b.selected)
    chosen = np.unique(gid[a.selected])
    assert chosen.size == 500 == a.n_groups_selected
    counts = np.bincount(gid)
    assert np.all(counts[chosen] > 1)  # only multi-member groups, all their rows
    assert a.selected.sum() == counts[chosen].sum()
    # min_reflections dominates: ceil(50000 / avg_m) > number of groups -> all groups with m > 1
    c = select_single_dataset(gid, pre, np.random.default_rng(5))
    assert c.selected.sum() == counts[counts > 1].sum()


def test_multi_dataset_quasi_random_and_random():
    gid, did, i, v, dss = _synthetic(n_groups=6000)
    pre = np.ones(gid.size, bool)
    a = select_multi_dataset_quasi_random(gid, did, i, v, dss, pre, np.random.default_rng(1), min_groups=300, min_reflections=2000)
    b = select_multi_dataset_quasi_random(gid, did, i, v, dss, pre, np.random.default_rng(1), min_groups=300, min_reflections=2000)
    assert np.array_equal(a.selected, b.selected)
    # groups with >= 2 members only; connected and across-dataset parts take whole groups
    counts = np.bincount(gid)
    chosen = np.unique(gid[a.selected])
    assert np.all(counts[chosen] > 1)
    assert chosen.size == a.n_groups_selected
    assert sum(a.details["total"]) == a.selected.sum()
    assert all(t > 0 for t in a.details["connected"])
    # total target = max(avg_m * 300, 2000); the union reaches it
    avg_m = counts[counts > 1].mean()
    assert a.selected.sum() >= max(avg_m * 300, 2000)
    r = select_multi_dataset_random(gid, i, v, np.random.default_rng(2), min_groups=300, min_reflections=10)
    assert r.n_groups_selected == 300 == np.unique(gid[r.selected]).size


def test_connected_selection_prefers_groups_spanning_datasets():
    # groups 0..99 span both datasets, 100..199 only dataset 0: the first chosen are spanning ones
    gid = np.concatenate([np.repeat(np.arange(100), 2), np.repeat(np.arange(100, 200), 2)])
    did = np.concatenate([np.tile([0, 1], 100), np.zeros(200, int)])
    i = np.full(gid.size, 100.0)
    v = np.full(gid.size, 100.0)
    dss = np.full(gid.size, 0.25)
    sel = select_connected_across_datasets(gid, did, i, v, dss, np.ones(gid.size, bool), min_total=40 * 20 / 1.2)
    chosen = np.unique(gid[sel])
    assert chosen.size > 0 and np.all(chosen < 100)


def test_intensity_ranges_and_esq():
    sg = gemmi.SpaceGroup("P 1")
    cell = gemmi.UnitCell(20, 20, 20, 90, 90, 90)
    rng = np.random.default_rng(0)
    hkl = rng.integers(-10, 11, size=(20000, 3))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    intensity = np.full(len(hkl), 50.0)
    esq = quasi_normalised_esq(intensity, hkl, cell, sg)
    np.testing.assert_allclose(esq, 1.0, rtol=1e-12)  # flat intensities normalise to 1
    intensity[:10] = 400.0
    esq = quasi_normalised_esq(intensity, hkl, cell, sg)
    sel = select_intensity_ranges(esq, intensity, np.full(len(hkl), 1.0), e2_range=(0.8, 5.0))
    assert not sel[:10].any() and sel[10:].mean() > 0.99


def test_random_groups_per_dataset_counts_and_uniformity():
    """Per data set: ceil(min_rows / (rows / groups)) of its groups with >= 2 of its rows (all
    where fewer), each whole (its rows of that data set), each group equally likely."""
    rng = np.random.default_rng(5)
    n = 6000
    gid = rng.integers(0, 400, n)
    did = rng.integers(0, 7, n)
    rows = rng.random(n) < 0.8
    min_rows = 150.0
    hits = np.zeros((7, 400))
    n_trials = 400
    for trial in range(n_trials):
        sel = _random_groups_per_dataset(gid, did, 7, rows, min_rows, np.random.default_rng(trial))
        assert not (sel & ~rows).any()
        for d in range(7):
            mine = rows & (did == d)
            size = np.bincount(gid[mine], minlength=400)
            eligible = np.flatnonzero(size > 1)
            wanted = int(np.ceil(min_rows / (size[eligible].sum() / eligible.size)))
            chosen = np.unique(gid[sel & (did == d)])
            assert chosen.size == min(wanted, eligible.size) and np.isin(chosen, eligible).all()
            assert np.array_equal(sel & (did == d), mine & np.isin(gid, chosen))  # whole groups
            hits[d, chosen] += 1
    # uniform: every eligible group of data set 0 chosen in ~wanted/eligible of the trials
    mine = rows & (did == 0)
    size = np.bincount(gid[mine], minlength=400)
    eligible = np.flatnonzero(size > 1)
    p = min(1.0, np.ceil(min_rows / (size[eligible].sum() / eligible.size)) / eligible.size)
    freq = hits[0, eligible] / n_trials
    assert abs(freq.mean() - p) < 1e-9  # exactly wanted groups per trial
    assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / n_trials)
    assert not hits[0, np.setdiff1d(np.arange(400), eligible)].any()
