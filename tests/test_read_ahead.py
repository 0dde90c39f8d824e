"""Reflection tables read ahead in a background thread while the .expt files are parsed."""
import shutil

import numpy as np
import pytest

from jaxscale import scale as S
from jaxscale.exceptions import InputError
from jaxscale.io.refl import read_refl
from jaxscale.params import ScaleParams


def _inputs(examples_dir, names=("20", "25")):
    return ([str(examples_dir / "lcys" / f"lcys_{n}_integrated.refl") for n in names]
            + [str(examples_dir / "lcys" / f"lcys_{n}_integrated.expt") for n in names])


def test_tables_read_ahead_are_the_tables_and_each_is_taken_once(examples_dir):
    inputs = _inputs(examples_dir)
    params = ScaleParams()
    ahead = S._read_tables_ahead(params, inputs)
    assert sorted(ahead) == sorted(inputs[:2])
    sources = S._read_sources(params, inputs, S._Log(None), None, ahead)
    assert ahead == {}  # taken
    for (path, _, table), refl in zip(sources, inputs[:2]):
        direct = read_refl(refl)
        assert path == refl and set(table.columns) == set(direct.columns)
        np.testing.assert_array_equal(np.asarray(table["intensity.sum.value"]),
                                      np.asarray(direct["intensity.sum.value"]))


def test_a_bad_table_read_ahead_fails_where_it_is_taken(examples_dir, tmp_path):
    inputs = _inputs(examples_dir, ("20",))
    bad = tmp_path / "broken.refl"
    bad.write_bytes(b"not msgpack at all")
    expt = tmp_path / "broken.expt"
    shutil.copy(inputs[1], expt)
    params = ScaleParams()
    ahead = S._read_tables_ahead(params, [str(bad), str(expt)])  # no error yet
    with pytest.raises(InputError) as err:
        S._read_sources(params, [str(bad), str(expt)], S._Log(None), None, ahead)
    assert str(bad) in str(err.value)
    assert S._read_tables_ahead(params, ["nonsense.txt"]) == {}  # the reading reports it


def test_hdf5_tables_are_read_ahead_too(examples_dir, tmp_path):
    from jaxscale.io.expt import read_expt
    from jaxscale.io.hdf5 import load_table, save_table
    from jaxscale.serial import _read_hdf5_sources

    refl, expt = _inputs(examples_dir, ("20",))
    h5 = str(tmp_path / "table.h5")
    save_table(h5, read_refl(refl), read_expt(expt))
    ahead = S._read_tables_ahead(ScaleParams(), [h5])
    assert list(ahead) == [h5]
    (path, expts, table), = _read_hdf5_sources([h5], None, ahead)
    assert ahead == {} and path == h5 and len(expts) == 1
    direct, _ = load_table(h5)
    np.testing.assert_array_equal(np.asarray(table["intensity.sum.value"]), np.asarray(direct["intensity.sum.value"]))
