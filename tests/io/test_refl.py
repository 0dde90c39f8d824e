"""The .refl reader against what DIALS itself reads, round trips, and bad input."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError
from jaxscale.io.refl import decode_refl, encode_refl, read_refl, write_refl
from tests.conftest import requires_dials

REFERENCE = json.loads((Path(__file__).parent / "reference" / "dials_refl_reference.json").read_text())


def _compare_value(ours, dials_value, type_name):
    if type_name == "shoebox":
        return
    if isinstance(dials_value, str):  # DIALS string columns
        assert str(ours) == dials_value
        return
    np.testing.assert_allclose(np.asarray(ours, dtype=float).ravel(), np.asarray(dials_value, dtype=float).ravel(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("rel", sorted(REFERENCE["refl"]))
def test_reader_matches_dials(shared_data, rel):
    """Every column, three sample rows and column sums equal what DIALS (flex) reports."""
    ref = REFERENCE["refl"][rel]
    table = read_refl(shared_data / rel, keep_shoeboxes=True)
    assert len(table) == ref["nrows"]
    assert {str(k): v for k, v in table.identifiers.items()} == ref["identifiers"]
    assert set(table.keys()) == set(ref["columns"])
    for name, col in ref["columns"].items():
        values = table[name]
        for row, expected in col["rows"].items():
            if name == "shoebox":
                assert list(values[int(row)][1]) == expected
            else:
                _compare_value(values[int(row)], expected, col["type"])
        if "sum" in col:
            total = values.sum() if values.dtype != bool else int(values.sum())
            np.testing.assert_allclose(float(total), col["sum"], rtol=1e-12)


def test_round_trip_is_identical(shared_data):
    table = read_refl(shared_data / "x4_centroid_9img_dials" / "integrated.refl", keep_shoeboxes=True)
    back = decode_refl(encode_refl(table), keep_shoeboxes=True)
    assert back.identifiers == table.identifiers
    assert back.dials_types == table.dials_types
    for name in table:
        if name == "shoebox":
            for a, b in zip(table[name][:50], back[name][:50]):
                assert a[0] == b[0] and np.array_equal(a[1], b[1])
                if a[2] is not None:
                    assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
            continue
        assert np.array_equal(table[name], back[name]), name
        assert table[name].dtype == back[name].dtype


def test_round_trip_bytes_stable(shared_data):
    """Writing what we read gives a file DIALS-equivalent to ours: a second pass is byte-identical."""
    table = read_refl(shared_data / "quartz_3ded_dials" / "integrated.refl")
    once = encode_refl(table)
    assert encode_refl(decode_refl(once)) == once


def test_new_columns_get_dials_types(tmp_path):
    table = ReflectionTable()
    table["miller_index"] = np.array([[1, 2, 3], [0, 0, 1]], dtype=np.int32)
    table["d"] = np.array([1.5, 2.5])
    table["flags"] = np.array([1, 2], dtype=np.uint64)
    table["id"] = np.array([0, 0], dtype=np.int32)
    table["s1"] = np.ones((2, 3))
    table["bbox"] = np.zeros((2, 6), dtype=np.int32)
    table["entering"] = np.array([True, False])
    table.identifiers[0] = "abc"
    write_refl(table, tmp_path / "t.refl")
    back = read_refl(tmp_path / "t.refl")
    assert back.dials_types == {"miller_index": "cctbx::miller::index<>", "d": "double", "flags": "std::size_t",
                                "id": "int", "s1": "vec3<double>", "bbox": "int6", "entering": "bool"}
    assert back.identifiers == {0: "abc"}


def test_truncated_file_names_file(tmp_path, shared_data):
    raw = (shared_data / "quartz_3ded_dials" / "integrated.refl").read_bytes()
    bad = tmp_path / "cut.refl"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError) as err:
        read_refl(bad)
    assert "cut.refl" in str(err.value)


def test_not_a_reflection_file(tmp_path):
    bad = tmp_path / "junk.refl"
    bad.write_bytes(b"hello world")
    with pytest.raises(InputError, match="junk.refl"):
        read_refl(bad)
    with pytest.raises(InputError, match="missing.refl"):
        read_refl(tmp_path / "missing.refl")


def test_failed_write_leaves_old_file(tmp_path):
    target = tmp_path / "out.refl"
    target.write_bytes(b"old")
    table = ReflectionTable({"d": np.array([1.0])})
    table.dials_types["d"] = "no-such-type"
    with pytest.raises(KeyError):
        write_refl(table, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.refl"]


@requires_dials
def test_dials_reads_our_file(tmp_path, shared_data):
    """DIALS loads a table we wrote and sees the same rows and values."""
    table = read_refl(shared_data / "cunir_ssx_stills_dials" / "integrated.refl")
    table["inverse_scale_factor"] = np.linspace(0.5, 2.0, len(table))
    write_refl(table, tmp_path / "ours.refl")
    script = (
        "from dials.array_family import flex; t = flex.reflection_table.from_file('ours.refl');"
        "print(t.size(), sorted(dict(t.experiment_identifiers()).values())[0], flex.sum(t['inverse_scale_factor']),"
        " t['miller_index'][7])"
    )
    out = subprocess.run(["/usr/bin/python3", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    n, ident, total, hkl = out.stdout.split(maxsplit=3)
    assert int(n) == len(table)
    assert ident == sorted(table.identifiers.values())[0]
    assert float(total) == pytest.approx(table["inverse_scale_factor"].sum(), rel=1e-12)
    assert hkl.strip() == str(tuple(int(v) for v in table["miller_index"][7]))


def test_written_file_has_umask_permissions(tmp_path):
    import os
    table = ReflectionTable({"d": np.array([1.0])})
    write_refl(table, tmp_path / "p.refl")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p.refl").stat().st_mode & 0o777 == 0o666 & ~umask


def test_empty_table_round_trip(tmp_path):
    table = ReflectionTable({"miller_index": np.zeros((0, 3), dtype=np.int32), "d": np.zeros(0)})
    write_refl(table, tmp_path / "empty.refl")
    back = read_refl(tmp_path / "empty.refl")
    assert len(back) == 0 and back["miller_index"].shape == (0, 3)


def test_streamed_reader_skips_shoeboxes_and_matches_full_read(shared_data, tmp_path):
    """read_refl seeks over shoeboxes: the other columns equal those read with shoeboxes kept,
    and every column is an owned, writable array (not a view of a file buffer)."""
    path = shared_data / "x4_centroid_9img_dials" / "integrated.refl"
    full = read_refl(path, keep_shoeboxes=True)
    lean = read_refl(path)
    assert "shoebox" in full and "shoebox" not in lean
    assert set(full) - {"shoebox"} == set(lean)
    for name in lean:
        assert np.array_equal(lean[name], full[name]) and lean[name].dtype == full[name].dtype, name
        assert lean[name].flags.writeable and lean[name].flags.owndata, name


@pytest.mark.parametrize("cut_fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_anywhere_is_an_input_error(tmp_path, cut_fraction):
    table = ReflectionTable({"d": np.linspace(1, 2, 1000), "miller_index": np.ones((1000, 3), dtype=np.int32)})
    table.identifiers = {0: "a"}
    raw = encode_refl(table)
    bad = tmp_path / "cut.refl"
    bad.write_bytes(raw[: int(len(raw) * cut_fraction)])
    with pytest.raises(InputError, match="cut.refl.*not a readable"):
        read_refl(bad)


def test_column_byte_count_mismatch_names_column(tmp_path):
    table = ReflectionTable({"d": np.linspace(1, 2, 10)})
    raw = encode_refl(table)
    # the payload header says 10 rows; claim 11 instead (the msgpack positive fixint 10 -> 11)
    marker = b"\x92\x0a\xc4\x50"  # [10, bin8(80 bytes)]
    assert raw.count(marker) == 1
    bad = tmp_path / "bad.refl"
    bad.write_bytes(raw.replace(marker, b"\x92\x0b\xc4\x50"))
    with pytest.raises(InputError) as err:
        read_refl(bad)
    assert err.value.field == "d" and "truncated?" in str(err.value)
