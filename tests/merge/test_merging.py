"""Inverse-variance merging against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from jaxscale.merge.merging import merge_intensities


def test_weighted_merge_and_internal_variance():
    keys = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [0, 0, 1]])
    intensity = np.array([10.0, 12.0, 20.0, 5.0])
    sigma = np.array([1.0, 2.0, 2.0, 0.5])
    m = merge_intensities(keys, intensity, sigma)
    np.testing.assert_array_equal(m.miller, [[0, 0, 1], [1, 2, 3]])          # sorted by (h, k, l)
    np.testing.assert_array_equal(m.multiplicity, [1, 3])
    w = 1 / sigma[:3] ** 2
    mean = np.sum(w * intensity[:3]) / w.sum()
    assert m.intensity.tolist() == pytest.approx([5.0, mean])
    assert m.sigma.tolist() == pytest.approx([0.5, np.sqrt(1 / w.sum())])
    mi = merge_intensities(keys, intensity, sigma, use_internal_variance=True)
    s2w = w.sum() / (w.sum() ** 2 - np.sum(w * w)) * np.sum(w * (intensity[:3] - mean) ** 2)
    assert mi.sigma.tolist() == pytest.approx([0.5, np.sqrt(max(s2w / 3, 1 / w.sum()))])
    assert mi.sigma[1] > m.sigma[1]                       # the spread here exceeds the σ's
