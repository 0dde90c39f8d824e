"""Input validation: planted defects in a real DIALS table give the right error, field and count."""
from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest

from jaxscale.data import flags as F
from jaxscale.data.validate import (
    REQUIRED_COLUMNS,
    validate_options,
    validate_pair,
    validate_reflections,
    validate_space_groups,
)
from jaxscale.exceptions import InputError, ParameterError
from jaxscale.io.expt import read_expt
from jaxscale.io.refl import read_refl
from jaxscale.params import ScaleParams, apply_overrides
from tests.conftest import requires_dials

PATH = "lcys_20_integrated.refl"


@pytest.fixture(scope="module")
def lcys(examples_dir):
    """(table, experiments) of the lcys_20 example: 4417 rows, 1113 unindexed, one sweep."""
    d = examples_dir / "lcys"
    return read_refl(d / "lcys_20_integrated.refl"), read_expt(d / "lcys_20_integrated.expt")


@pytest.fixture
def table(lcys):
    return lcys[0].copy()


def _rows(table, mask_bits, n, seed=0):
    """n random indexed rows flagged with all of mask_bits."""
    ok = np.flatnonzero((table["id"] >= 0) & F.has_all(table["flags"], mask_bits))
    return np.random.default_rng(seed).choice(ok, n, replace=False)


def _raises(table, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        validate_reflections(table, PATH, **kw)
    assert PATH in str(info.value)
    return info.value


@pytest.mark.parametrize("choice", ["combine", "profile", "sum"])
def test_real_dials_table_passes_without_warnings(lcys, choice):
    assert validate_reflections(lcys[0], PATH, intensity_choice=choice) == []
    assert validate_pair(lcys[0], lcys[1], PATH, "x.expt") == []


def test_empty_table(table):
    err = _raises(table.select(np.zeros(len(table), dtype=bool)))
    assert "empty" in err.problem


@pytest.mark.parametrize("column", REQUIRED_COLUMNS)
def test_missing_required_column(table, column):
    del table[column]
    err = _raises(table)
    assert err.field == column and "missing" in err.problem


def test_value_without_variance(table):
    del table["intensity.sum.variance"]
    assert _raises(table).field == "intensity.sum.variance"


def test_intensity_choice_needs_its_columns(table):
    for col in ("intensity.prf.value", "intensity.prf.variance"):
        del table[col]
    assert validate_reflections(table, PATH, intensity_choice="combine") == []  # sum only is fine
    assert _raises(table, intensity_choice="profile").field == "intensity.prf.value"
    for col in ("intensity.sum.value", "intensity.sum.variance"):
        del table[col]
    assert "no intensity columns" in _raises(table).problem


def test_no_indexed_rows(table):
    table["id"] = np.full(len(table), -1, dtype=np.int32)
    err = _raises(table)
    assert err.field == "id" and f"all {len(table)} rows" in err.problem


def test_no_integrated_rows(table):
    table["flags"] = F.clear_bits(table["flags"], F.INTEGRATED)
    assert _raises(table).field == "flags"


def test_nan_variance_counted_on_used_rows_only(table):
    bad = _rows(table, F.INTEGRATED_PRF, 7)
    unused = np.flatnonzero(table["id"] < 0)[:100]  # unindexed rows are never read
    v = table["intensity.prf.variance"].copy()
    v[bad] = np.nan
    v[unused] = np.nan
    table["intensity.prf.variance"] = v
    n_prf = int(((table["id"] >= 0) & F.has_all(table["flags"], F.INTEGRATED_PRF)).sum())
    err = _raises(table)
    assert err.field == "intensity.prf.variance"
    assert err.problem.startswith(f"7 of {n_prf} integrated_prf")
    v[bad] = 1.0
    table["intensity.prf.variance"] = v
    assert validate_reflections(table, PATH) == []
    # the sum column is not read with intensity_choice=profile
    s = table["intensity.sum.value"].copy()
    s[_rows(table, F.INTEGRATED_SUM, 3)] = np.inf
    table["intensity.sum.value"] = s
    assert validate_reflections(table, PATH, intensity_choice="profile") == []
    assert _raises(table, intensity_choice="sum").problem.startswith("3 of ")


def test_nan_in_every_row(table):
    for col in ("intensity.sum.variance", "intensity.prf.variance"):
        table[col] = np.full(len(table), np.nan)
    assert "NaN" in _raises(table).problem


@pytest.mark.parametrize("column", ["d", "xyzobs.px.value"])
def test_nonfinite_geometry(table, column):
    values = table[column].copy()
    values[_rows(table, F.INTEGRATED_SUM, 2)] = np.nan
    table[column] = values
    err = _raises(table)
    assert err.field == column and err.problem.startswith("2 of ")


def test_some_nonpositive_variances_warn_like_dials_excludes(table):
    v = table["intensity.sum.variance"].copy()
    v[_rows(table, F.INTEGRATED_SUM, 5)] = -1.0
    table["intensity.sum.variance"] = v
    warnings = validate_reflections(table, PATH)
    assert len(warnings) == 1 and "5 of " in warnings[0] and "intensity.sum.variance" in warnings[0]


def test_all_nonpositive_variances_is_an_error(table):
    for col in ("intensity.sum.variance", "intensity.prf.variance"):
        table[col] = np.where(table["id"] >= 0, -1.0, 1.0)  # only unindexed rows look usable
    err = _raises(table)
    assert "variance <= 0" in err.problem and "intensity.sum.variance" in err.field


def test_zero_miller_index_counted(table):
    hkl = table["miller_index"].copy()
    hkl[_rows(table, F.INTEGRATED_SUM, 3)] = 0
    table["miller_index"] = hkl
    warnings = validate_reflections(table, PATH)
    assert any("3 integrated reflections have Miller index (0, 0, 0)" in w for w in warnings)


# ------------------------------------------------------------------ pairs
def _named(experiments, names):
    return type(experiments)([dataclasses.replace(experiments[0], identifier=n) for n in names])


def test_pair_identifier_mismatch(table, lcys):
    table.identifiers = {0: "abc"}
    with pytest.raises(InputError) as info:
        validate_pair(table, _named(lcys[1], ["xyz"]), PATH, "other.expt")
    assert info.value.field == "identifiers" and "other.expt" in str(info.value)
    assert "'xyz'" in info.value.problem and "'abc'" in info.value.problem
    # matching identifiers pass; unnamed experiments take the table's (DIALS assigns new ones)
    assert validate_pair(table, _named(lcys[1], ["abc"]), PATH, "other.expt") == []
    assert len(validate_pair(table, lcys[1], PATH, "other.expt")) == 1


def test_pair_named_experiment_with_unnamed_table(table, lcys):
    with pytest.raises(InputError, match="1 only in the .expt"):
        validate_pair(table, _named(lcys[1], ["uuid-1"]), PATH, "x.expt")


def test_pair_ids_beyond_experiments(table, lcys):
    ids = table["id"].copy()
    ids[_rows(table, F.INTEGRATED_SUM, 4)] = 1
    table["id"] = ids
    with pytest.raises(InputError) as info:
        validate_pair(table, lcys[1], PATH, "x.expt")
    assert info.value.field == "id" and "dataset id 1" in info.value.problem
    assert validate_pair(table, _named(lcys[1], ["", ""]), PATH, "x.expt") == []
    with pytest.raises(InputError, match="experiment 2 of x.expt has no indexed reflections"):
        validate_pair(table, _named(lcys[1], ["", "", ""]), PATH, "x.expt")


def test_space_groups(lcys, shared_data):
    quartz = read_expt(shared_data / "quartz_3ded_dials/integrated.expt")
    validate_space_groups([lcys[1][0], lcys[1][0]])
    with pytest.raises(InputError) as info:
        validate_space_groups([lcys[1][0], quartz[0]], ["a.expt", "quartz.expt"])
    assert info.value.path == "quartz.expt" and info.value.field == "space_group"
    assert f"numbers {lcys[1][0].space_group.number}, {quartz[0].space_group.number}" in info.value.problem


@requires_dials
def test_dials_also_refuses_the_mismatched_pair(examples_dir, shared_data, tmp_path):
    """dials.scale stops on lcys_20.refl + quartz .expt; so must we (validate_pair)."""
    refl = examples_dir / "lcys/lcys_20_integrated.refl"
    expt = shared_data / "quartz_3ded_dials/integrated.expt"
    run = subprocess.run(["dials.scale", str(refl), str(expt), "output.html=None"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Corrupted identifiers" in run.stdout + run.stderr
    with pytest.raises(InputError, match="identifiers"):
        validate_pair(read_refl(refl), read_expt(expt), str(refl), str(expt))


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("overrides, name", [
    ({"d_min": "-1"}, "cut_data.d_min"),
    ({"d_max": "0"}, "cut_data.d_max"),
    ({"output.merging.nbins": "0"}, "output.merging.nbins"),
    ({"exclude_images": "0:5000:6000"}, "exclude_images=0:5000:6000"),
    ({"exclude_images": "2000:2100"}, "exclude_images=0:2000:2100"),
])
def test_absurd_options(lcys, overrides, name):
    params = apply_overrides(ScaleParams(), overrides)
    with pytest.raises(ParameterError, match=name.replace(".", r"\.")):
        validate_options(params, lcys[1])


def test_sensible_options_pass(lcys):
    params = apply_overrides(ScaleParams(), {"d_min": "1.0", "d_max": "20", "exclude_images": "0:1700:1900",
                                             "output.merging.nbins": "10"})
    validate_options(params, lcys[1])
    validate_options(ScaleParams(), lcys[1])
