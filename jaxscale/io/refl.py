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


def decode_refl(raw: bytes, path: str = "<bytes>", keep_shoeboxes: bool = False) -> ReflectionTable:
    """Decode the bytes of a .refl file into a ReflectionTable."""
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on corrupt input
        raise InputError(path, f"not a readable DIALS reflection file ({type(exc).__name__}: {exc})") from None
    if not (isinstance(obj, list) and len(obj) == 3 and obj[0] == MAGIC):
        raise InputError(path, "not a DIALS msgpack reflection table (missing 'dials::af::reflection_table' header)")
    if obj[1] != 1:
        raise InputError(path, f"unsupported reflection table version {obj[1]!r}")
    body = obj[2]
    try:
        nrows = int(body["nrows"])
        data = body["data"]
        identifiers = {int(k): str(v) for k, v in (body.get("identifiers") or {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"reflection table header is damaged ({exc})") from None

    table = ReflectionTable(identifiers=identifiers)
    for name, entry in data.items():
        try:
            type_name, payload = entry
        except (TypeError, ValueError):
            raise InputError(path, "malformed column entry", field=name) from None
        if type_name == SHOEBOX_TYPE:
            if not keep_shoeboxes:
                continue
            values = _decode_shoeboxes(payload[1], nrows)
        elif type_name == STRING_TYPE:
            values = np.array(list(payload), dtype=object)
        elif type_name in COLUMN_TYPES:
            dtype, shape = COLUMN_TYPES[type_name]
            n_elem, blob = payload
            per_row = int(np.prod(shape)) if shape else 1
            if n_elem != nrows or len(blob) != nrows * per_row * dtype.itemsize:
                raise InputError(path, f"column has {len(blob)} bytes, expected {nrows} rows of {type_name} (truncated?)",
                                 field=name)
            values = np.frombuffer(blob, dtype=dtype).reshape((nrows, *shape)).copy()
        else:
            raise InputError(path, f"unknown column type {type_name!r}", field=name)
        if len(values) != nrows:
            raise InputError(path, f"column has {len(values)} rows, table says {nrows}", field=name)
        table.columns[name] = values
        table.dials_types[name] = type_name
    return table


def read_refl(path: str | os.PathLike, keep_shoeboxes: bool = False) -> ReflectionTable:
    """Read a DIALS .refl file (msgpack). Shoeboxes are dropped unless asked for."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror})") from None
    if raw[:2] == b"\x80\x02" or raw[:1] == b"\x80":
        raise InputError(path, "old pickle-format reflection file; convert it with DIALS 3 (dials.convert_to_msgpack is not needed for .refl written by DIALS >= 2.0)")
    return decode_refl(raw, path, keep_shoeboxes=keep_shoeboxes)


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
