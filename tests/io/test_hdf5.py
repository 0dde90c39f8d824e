"""HDF5 table storage: exact round trips of real and planted tables, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError
from jaxscale.io.expt import encode_expt, read_expt
from jaxscale.io.hdf5 import load_table, save_table
from jaxscale.io.refl import read_refl

LCYS = "lcys_4sweep_dials/reference_dials3.12_scale/scaled"


def _assert_same(a: ReflectionTable, b: ReflectionTable) -> None:
    assert list(a.columns) == list(b.columns)
    for name in a.columns:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype == object:
            assert list(x) == list(y), name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.identifiers == b.identifiers
    assert a.dials_types == b.dials_types


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_roundtrip_real_table_and_experiments(shared_data, tmp_path, compression):
    table = read_refl(shared_data / f"{LCYS}.refl")
    experiments = read_expt(shared_data / f"{LCYS}.expt")
    path = tmp_path / "scaled.h5"
    save_table(path, table, experiments, compression=compression)
    t, ex = load_table(path)
    _assert_same(table, t)
    assert encode_expt(ex) == encode_expt(experiments)
    assert [e.identifier for e in ex] == [e.identifier for e in experiments]


def test_roundtrip_planted_columns(tmp_path):
    rng = np.random.default_rng(0)
    n = 1000
    table = ReflectionTable(
        {"miller_index": rng.integers(-30, 30, (n, 3)).astype(np.int32),
         "id": rng.integers(0, 3, n).astype(np.int32),
         "flags": rng.integers(0, 2**40, n).astype(np.uint64),
         "intensity.sum.value": rng.normal(size=n),
         "s1": rng.normal(size=(n, 3)),
         "bbox": rng.integers(0, 100, (n, 6)).astype(np.int32),
         "entering": rng.random(n) > 0.5,
         "weird/name": np.arange(n, dtype=np.float32),
         "label": np.array([f"r{i}" for i in range(n)], dtype=object)},
        {0: "a", 1: "b", 2: "c"},
        {"miller_index": "cctbx::miller::index<>", "flags": "std::size_t", "label": "std::string"})
    path = tmp_path / "t.h5"
    save_table(path, table)
    t, ex = load_table(path)
    assert ex is None
    _assert_same(table, t)


def test_empty_table(tmp_path):
    table = ReflectionTable({"d": np.zeros(0), "miller_index": np.zeros((0, 3), np.int32)})
    save_table(tmp_path / "e.h5", table)
    t, _ = load_table(tmp_path / "e.h5")
    assert len(t) == 0 and t["miller_index"].shape == (0, 3)


def test_bad_files(tmp_path, shared_data):
    text = tmp_path / "not.h5"
    text.write_text("not hdf5")
    with pytest.raises(InputError, match="not.h5"):
        load_table(text)
    with pytest.raises(InputError, match="missing.h5"):
        load_table(tmp_path / "missing.h5")
    good = tmp_path / "good.h5"
    save_table(good, read_refl(shared_data / f"{LCYS}.refl"))
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.h5"):
        load_table(cut)
