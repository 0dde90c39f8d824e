"""DIALS reflection tables (`.refl`, msgpack) without DIALS.

Layout (spec formats.md §1): a msgpack array
`["dials::af::reflection_table", 1, {"identifiers": {id: str}, "nrows": n, "data": {name: [type, payload]}}]`
where every non-string, non-shoebox payload is `[n_elements, raw little-endian bytes]`.
Columns become numpy arrays without a per-row Python object (strings and shoeboxes aside).
"""
from __future__ import annotations

import os
import struct

import msgpack
import numpy as np

from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError
from jaxscale.io.atomic import atomic_path

MAGIC = "dials::af::reflection_table"

# DIALS type name -> (numpy dtype, per-row shape)
COLUMN_TYPES: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "bool": (np.dtype("bool"), ()),
    "int": (np.dtype("<i4"), ()),
    "std::size_t": (np.dtype("<u8"), ()),
    "double": (np.dtype("<f8"), ()),
    "vec2<double>": (np.dtype("<f8"), (2,)),
    "vec3<double>": (np.dtype("<f8"), (3,)),
    "mat3<double>": (np.dtype("<f8"), (9,)),
    "int6": (np.dtype("<i4"), (6,)),
    "cctbx::miller::index<>": (np.dtype("<i4"), (3,)),
}
STRING_TYPE = "std::string"
SHOEBOX_TYPE = "Shoebox<>"


def _infer_dials_type(name: str, values: np.ndarray) -> str:
    """DIALS type name for a numpy column that carries no recorded type."""
    if values.dtype == object:
        return STRING_TYPE
    if name == "miller_index":
        return "cctbx::miller::index<>"
    shape = values.shape[1:]
    kind = values.dtype.kind
    if shape == ():
        if kind == "b":
            return "bool"
        if kind == "u":
            return "std::size_t"
        if kind == "i":
            return "int"
        return "double"
    if shape == (6,) and kind in "iu":
        return "int6"
    if shape == (3,) and kind in "iu":
        return "cctbx::miller::index<>"
    return {(2,): "vec2<double>", (3,): "vec3<double>", (9,): "mat3<double>"}.get(shape, "double")


def _decode_shoeboxes(payload: bytes, nrows: int) -> np.ndarray:
    """Shoebox stream -> object array of (panel, bbox, data, mask, background) per row.

    Only read on request; scaling never needs shoeboxes (dials.scale deletes them).
    """
    out = np.empty(nrows, dtype=object)
    pos = 0
    for row in range(nrows):
        panel, x0, x1, y0, y1, z0, z1, has_data = struct.unpack_from("<I6iB", payload, pos)
        pos += 29
        bbox = np.array([x0, x1, y0, y1, z0, z1], dtype=np.int32)
        data = mask = background = None
        if has_data:
            shape = (z1 - z0, y1 - y0, x1 - x0)
            n = shape[0] * shape[1] * shape[2]
            data = np.frombuffer(payload, "<f4", n, pos).reshape(shape)
            pos += 4 * n
            mask = np.frombuffer(payload, "<i4", n, pos).reshape(shape)
            pos += 4 * n
            background = np.frombuffer(payload, "<f4", n, pos).reshape(shape)
            pos += 4 * n
        out[row] = (panel, bbox, data, mask, background)
    return out


def _encode_shoeboxes(values: np.ndarray) -> bytes:
    chunks = []
    for panel, bbox, data, mask, background in values:
        has = data is not None and np.size(data) > 0
        chunks.append(struct.pack("<I6iB", int(panel), *[int(b) for b in bbox], 1 if has else 0))
        if has:
            chunks += [np.asarray(data, "<f4").tobytes(), np.asarray(mask, "<i4").tobytes(),
                       np.asarray(background, "<f4").tobytes()]
    return b"".join(chunks)


class _Truncated(Exception):
    """The file ends inside an object."""


class _MsgpackReader:
    """Walks a .refl's msgpack structure on a binary file object: small headers are parsed
    here, column payloads are read straight into their numpy arrays (`readinto`, no
    intermediate bytes object) and skipped columns (shoeboxes) are seeked over, so reading
    costs one copy of the kept columns and runs at the speed of the file system. Anything
    other than the table's fixed layout goes through msgpack's own unpacker."""

    def __init__(self, fh):
        self.fh = fh

    def _read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise _Truncated()
        return data

    def header(self) -> tuple[str, int]:
        """(kind, length or value) of the next object: kind 'array', 'map', 'str', 'bin', 'int'
        or 'other' (then the file is left where it was)."""
        start = self.fh.tell()
        b = self._read(1)[0]
        if b <= 0x7F:
            return "int", b
        if 0x80 <= b <= 0x8F:
            return "map", b & 0x0F
        if 0x90 <= b <= 0x9F:
            return "array", b & 0x0F
        if 0xA0 <= b <= 0xBF:
            return "str", b & 0x1F
        sized = {0xC4: ("bin", ">B"), 0xC5: ("bin", ">H"), 0xC6: ("bin", ">I"),
                 0xD9: ("str", ">B"), 0xDA: ("str", ">H"), 0xDB: ("str", ">I"),
                 0xDC: ("array", ">H"), 0xDD: ("array", ">I"), 0xDE: ("map", ">H"), 0xDF: ("map", ">I"),
                 0xCC: ("int", ">B"), 0xCD: ("int", ">H"), 0xCE: ("int", ">I"), 0xCF: ("int", ">Q"),
                 0xD0: ("int", ">b"), 0xD1: ("int", ">h"), 0xD2: ("int", ">i"), 0xD3: ("int", ">q")}
        if b in sized:
            kind, fmt = sized[b]
            return kind, struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]
        if b >= 0xE0:
            return "int", b - 0x100
        self.fh.seek(start)
        return "other", 0

    def expect(self, kind: str) -> int:
        got, value = self.header()
        if got != kind:
            raise ValueError(f"expected a msgpack {kind}, found {got}")
        return value

    def string(self) -> str:
        return self._read(self.expect("str")).decode("utf-8")

    def unpack(self):
        """The next object, whatever it is (msgpack's unpacker, reading from here)."""
        start = self.fh.tell()
        unpacker = msgpack.Unpacker(self.fh, raw=False, strict_map_key=False, read_size=1 << 16,
                                    max_buffer_size=2**31 - 1)
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData:
            raise _Truncated() from None
        self.fh.seek(start + unpacker.tell())
        return obj

    def read_into(self, out: np.ndarray) -> None:
        view = memoryview(out).cast("B") if out.size else memoryview(b"")
        done = 0
        while done < view.nbytes:  # read() returns at most ~2 GiB at a time
            n = self.fh.readinto(view[done:])
            if not n:
                raise _Truncated()
            done += n

    def skip(self, n: int) -> None:
        self.fh.seek(n, os.SEEK_CUR)


def _read_column(reader: _MsgpackReader, name: str, type_name: str, keep_shoeboxes: bool, path: str):
    """One column's values (None for a skipped shoebox column), the file positioned after it."""
    if type_name == SHOEBOX_TYPE:
        if keep_shoeboxes:
            payload = reader.unpack()
            return _decode_shoeboxes(payload[1], int(payload[0]))
        reader.expect("array")
        reader.expect("int")
        reader.skip(reader.expect("bin"))
        return None
    if type_name == STRING_TYPE:
        return np.array(list(reader.unpack()), dtype=object)
    if type_name not in COLUMN_TYPES:
        raise InputError(path, f"unknown column type {type_name!r}", field=name)
    dtype, shape = COLUMN_TYPES[type_name]
    if reader.expect("array") != 2:
        raise ValueError("column payload is not [n, bytes]")
    n_elem = reader.expect("int")
    n_bytes = reader.expect("bin")
    per_row = int(np.prod(shape)) if shape else 1
    if n_bytes != n_elem * per_row * dtype.itemsize:
        raise InputError(path, f"column has {n_bytes} bytes, expected {n_elem} rows of {type_name} (truncated?)",
                         field=name)
    values = np.empty((n_elem, *shape), dtype=dtype)
    reader.read_into(values)
    return values


def _read_table(fh, path: str, keep_shoeboxes: bool) -> ReflectionTable:
    reader = _MsgpackReader(fh)
    if reader.expect("array") != 3 or reader.unpack() != MAGIC:
        raise InputError(path, "not a DIALS msgpack reflection table (missing 'dials::af::reflection_table' header)")
    version = reader.unpack()
    if version != 1:
        raise InputError(path, f"unsupported reflection table version {version!r}")
    body, columns, types = {}, {}, {}
    for _ in range(reader.expect("map")):  # the body's few keys: identifiers, nrows, data
        key = reader.unpack()
        if key != "data":
            body[key] = reader.unpack()
            continue
        body[key] = True
        for _ in range(reader.expect("map")):  # loop over columns
            name = reader.string()
            if reader.expect("array") != 2:
                raise InputError(path, "malformed column entry", field=name)
            type_name = reader.string()
            values = _read_column(reader, name, type_name, keep_shoeboxes, path)
            if values is not None:
                columns[name], types[name] = values, type_name
    try:
        nrows = int(body["nrows"])
        body["data"]
        identifiers = {int(k): str(v) for k, v in (body.get("identifiers") or {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"reflection table header is damaged ({exc})") from None
    for name, values in columns.items():
        if len(values) != nrows:
            raise InputError(path, f"column has {len(values)} rows, table says {nrows}", field=name)
    return ReflectionTable(columns, identifiers, types)


def _read_refl_stream(fh, path: str, keep_shoeboxes: bool) -> ReflectionTable:
    try:
        return _read_table(fh, path, keep_shoeboxes)
    except InputError:
        raise
    except _Truncated:
        raise InputError(path, "not a readable DIALS reflection file (it ends early: truncated?)") from None
    except Exception as exc:  # damaged bytes surface as several unrelated types
        raise InputError(path, f"not a readable DIALS reflection file ({type(exc).__name__}: {exc})") from None


def decode_refl(raw: bytes, path: str = "<bytes>", keep_shoeboxes: bool = False) -> ReflectionTable:
    """Decode the bytes of a .refl file into a ReflectionTable."""
    import io

    return _read_refl_stream(io.BytesIO(raw), path, keep_shoeboxes)


def read_refl(path: str | os.PathLike, keep_shoeboxes: bool = False) -> ReflectionTable:
    """Read a DIALS .refl file (msgpack), column payloads straight into numpy arrays.
    Shoeboxes are dropped unless asked for."""
    path = os.fspath(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror})") from None
    with fh:
        try:
            head = fh.read(2)
            fh.seek(0)
        except OSError as exc:
            raise InputError(path, f"cannot read file ({exc.strerror})") from None
        if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
            raise InputError(path, "old pickle-format reflection file; convert it with DIALS 3 (dials.convert_to_msgpack is not needed for .refl written by DIALS >= 2.0)")
        try:
            return _read_refl_stream(fh, path, keep_shoeboxes)
        except OSError as exc:
            raise InputError(path, f"cannot read file ({exc.strerror})") from None


def _bin_header(nbytes: int) -> bytes:
    """msgpack bin header for a payload of `nbytes` (bin8/16/32 as msgpack chooses)."""
    if nbytes < 1 << 8:
        return b"\xc4" + struct.pack(">B", nbytes)
    if nbytes < 1 << 16:
        return b"\xc5" + struct.pack(">H", nbytes)
    return b"\xc6" + struct.pack(">I", nbytes)


def _write_refl_stream(table: ReflectionTable, fh) -> None:
    """Stream the msgpack encoding of `table` to `fh`, column by column.

    Column payloads go out as raw memory views, so writing 10^7 rows costs no extra
    copy of the table (msgpack.packb would hold the whole file in memory, twice).
    """
    packer = msgpack.Packer(use_bin_type=True)
    nrows = len(table)
    fh.write(packer.pack_array_header(3))
    fh.write(packer.pack(MAGIC))
    fh.write(packer.pack(1))
    fh.write(packer.pack_map_header(3))
    fh.write(packer.pack("identifiers"))
    fh.write(packer.pack({int(k): v for k, v in table.identifiers.items()}))
    fh.write(packer.pack("nrows"))
    fh.write(packer.pack(nrows))
    fh.write(packer.pack("data"))
    fh.write(packer.pack_map_header(len(table.columns)))
    for name, values in table.columns.items():
        type_name = table.dials_types.get(name) or _infer_dials_type(name, values)
        fh.write(packer.pack(name))
        fh.write(packer.pack_array_header(2))
        fh.write(packer.pack(type_name))
        if type_name == STRING_TYPE:
            fh.write(packer.pack([str(v) for v in values]))
            continue
        if type_name == SHOEBOX_TYPE:
            blob = memoryview(_encode_shoeboxes(values))
        else:
            dtype, shape = COLUMN_TYPES[type_name]
            arr = np.ascontiguousarray(np.asarray(values).astype(dtype, copy=False).reshape((nrows, *shape)))
            # an empty column has a zero in its shape, which memoryview.cast refuses
            blob = memoryview(arr).cast("B") if arr.size else memoryview(b"")
        fh.write(packer.pack_array_header(2))
        fh.write(packer.pack(nrows))
        fh.write(_bin_header(blob.nbytes))
        fh.write(blob)


def encode_refl(table: ReflectionTable) -> bytes:
    """The msgpack bytes of a .refl file for `table` (identifiers and column types kept)."""
    import io

    buffer = io.BytesIO()
    _write_refl_stream(table, buffer)
    return buffer.getvalue()


def write_refl(table: ReflectionTable, path: str | os.PathLike) -> None:
    """Write `table` as a DIALS .refl file, atomically, streaming the columns."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            _write_refl_stream(table, fh)
