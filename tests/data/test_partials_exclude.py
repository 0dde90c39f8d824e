"""Partial summation and exclude_images on planted data (DIALS rules, overview.md §1.4, §3.2)."""
from __future__ import annotations

import numpy as np
import pytest

from jaxscale.data.exclude import apply_exclude_images, parse_exclude_images, remove_ranges
from jaxscale.data.partials import sum_partials
from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import ParameterError


def test_partials_merge_into_first_row():
    t = ReflectionTable()
    t["partial_id"] = np.array([7, 3, 7, 3, 9, 7, 5])
    t["partiality"] = np.array([0.3, 0.5, 0.4, 0.45, 0.5, 0.2, 1.0])
    t["intensity.sum.value"] = np.array([10.0, 20, 30, 40, 50, 60, 70])
    t["intensity.sum.variance"] = np.array([1.0, 2, 3, 4, 5, 6, 7])
    t["intensity.prf.value"] = np.array([12.0, 18, 33, 0, 51, 58, 69])
    t["intensity.prf.variance"] = np.array([2.0, 2, 3, 5, 5, -1, 7])  # row 5: bad variance, not merged
    t["flags"] = np.arange(7, dtype=np.uint64)
    out = sum_partials(t)
    assert out.kept_rows.tolist() == [0, 1, 4, 5, 6] and out.n_combined == 2
    tt = out.table
    assert tt["intensity.sum.value"].tolist() == [40.0, 60.0, 50.0, 60.0, 70.0]
    assert tt["intensity.sum.variance"].tolist() == [4.0, 6.0, 5.0, 6.0, 7.0]
    assert tt["partiality"][:2] == pytest.approx([0.7, 0.95])
    w = np.array([12.0**2 / 2, 33.0**2 / 3])
    assert tt["intensity.prf.value"][0] == pytest.approx((w * [12, 33]).sum() / w.sum())
    assert tt["intensity.prf.variance"][0] == pytest.approx((w * [2, 3]).sum() / w.sum())
    # group 3: second row has I_prf = 0 -> weight 0, first row's value kept
    assert tt["intensity.prf.value"][1] == pytest.approx(18.0)
    assert tt["flags"].tolist() == [0, 1, 4, 5, 6]


def test_partials_zero_total_weight():
    t = ReflectionTable()
    t["partial_id"] = np.array([1, 1])
    t["partiality"] = np.array([0.5, 0.5])
    t["intensity.prf.value"] = np.array([0.0, 0.0])
    t["intensity.prf.variance"] = np.array([2.0, 3.0])
    out = sum_partials(t)
    assert out.table["intensity.prf.value"].tolist() == [0.0]
    assert out.table["intensity.prf.variance"].tolist() == [5.0]


class _Expt:
    def __init__(self, identifier, image_range, valid=None):
        self.identifier = identifier
        self.scan = {"image_range": list(image_range), "valid_image_ranges": valid or {}}


def test_parse_exclude_images_forms():
    assert parse_exclude_images(["0:101:200,1:5:10", "1:20:30"], [0, 1]) == [(0, 101, 200), (1, 5, 10), (1, 20, 30)]
    assert parse_exclude_images("0:1:2 1:3:4", [0, 1]) == [(0, 1, 2), (1, 3, 4)]
    assert parse_exclude_images(["101:200"], [4]) == [(4, 101, 200)]
    with pytest.raises(ParameterError):
        parse_exclude_images(["101:200"], [0, 1])
    with pytest.raises(ParameterError):
        parse_exclude_images(["2:1:5"], [0, 1])


def test_exclude_images_ranges_and_mask():
    assert remove_ranges([(1, 100)], [(1, 10), (50, 60)]) == [(11, 49), (61, 100)]
    assert remove_ranges([(1, 10)], [(1, 10)]) == []
    experiments = [_Expt("a", (1, 100)), _Expt("b", (1, 50), {"b": [[1, 40]]})]
    ids = np.array([0, 0, 0, 0, 1, 1, 1])
    z = np.array([0.0, 9.99, 10.0, 10.5, 39.5, 40.5, 5.0])
    mask, ranges = apply_exclude_images(ids, z, experiments, [0, 1], ["0:11:20"])
    assert ranges == [[(1, 10), (21, 100)], [(1, 40)]]
    # image k covers z in [k-1, k]; valid iff start-1 <= z <= end for some range
    assert mask.tolist() == [False, False, False, True, False, True, False]
