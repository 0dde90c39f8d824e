"""Row lookups of the observation table."""
import numpy as np

from jaxscale.data.table import RowsByValue


def test_rows_by_value_equals_a_mask_per_value():
    rng = np.random.default_rng(3)
    ids = rng.integers(-1, 50, 5000).astype(np.int32)
    ids[ids == 17] = 3  # a value with no rows
    rows = RowsByValue(ids)
    for v in range(-2, 52):
        np.testing.assert_array_equal(rows(v), np.flatnonzero(ids == v))
    assert rows(17).size == 0 and RowsByValue(np.zeros(0, np.int32))(0).size == 0
