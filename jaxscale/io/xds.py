"""XDS reflection files: INTEGRATE.HKL and XDS_ASCII.HKL (unmerged) → table + one Experiment.

gemmi (`gemmi.read_xds_ascii`) reads the header essentials and H K L IOBS SIGMA XD YD ZD;
the remaining items (RLP, PEAK, CORR, PSI, XOBS ...) and detector keywords are read here.
Everything stays in the XDS laboratory frame: the experiment's beam, rotation axis,
detector and crystal axes are XDS's own vectors, so `s1` (from the detector position of
each reflection) is consistent with them.

Intensity mapping (IOBS is Lorentz-polarisation corrected in both files):
* INTEGRATE.HKL: intensity.prf = intensity.sum = IOBS·RLP (uncorrected, variance (σ·RLP)²),
  lp = 1/RLP, so lp·I reproduces IOBS; intensity.cor = IOBS as `dials.import_xds` names it.
  (`dials.import_xds` also multiplies prf by PEAK/100; we keep PEAK as `peak` instead.)
* XDS_ASCII.HKL: intensity.prf = intensity.sum = IOBS (CORRECT-scaled), lp = 1; rows with
  SIGMA < 0 (CORRECT's misfits) get the `excluded_for_scaling` flag.
z = ZD (XDS frame coordinate; frame i spans i−1 … i, the same as DIALS' array index when
STARTING_FRAME is the first image); xyzobs uses XOBS/YOBS/ZOBS where INTEGRATE observed
the spot, else the calculated position.
"""
from __future__ import annotations

import os
import re
import uuid

import gemmi
import numpy as np

from jaxscale.data import flags as F
from jaxscale.data.table import ReflectionTable
from jaxscale.exceptions import InputError
from jaxscale.io.expt import Experiment, ExperimentList

_KEY = re.compile(r"([A-Z][A-Z0-9_'\-\.()]*)=")


def _parse_header(lines: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Keyword → value tokens from '!KEY= v v KEY2= v' lines, and the INTEGRATE item list."""
    header: dict[str, list[str]] = {}
    items: list[str] = []
    for line in lines:
        body = line[1:]
        keys = list(_KEY.finditer(body))
        if not keys:
            if "," in body and not body.strip().startswith("Items"):
                items += [t.strip() for t in body.split(",") if t.strip()]
            continue
        for k, m in enumerate(keys):
            end = keys[k + 1].start() if k + 1 < len(keys) else len(body)
            header[m.group(1)] = body[m.end():end].split()
    item_cols = sorted((int(v[0]), k[5:]) for k, v in header.items() if k.startswith("ITEM_"))
    if item_cols:
        items = [name for _, name in item_cols]
    return header, items


def _split(path: str) -> tuple[list[str], np.ndarray]:
    """Header lines and the numeric records (n, n_items) of an XDS file."""
    try:
        with open(path, "r", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror})") from None
    head, sep, rest = text.partition("!END_OF_HEADER")
    if not sep:
        raise InputError(path, "no !END_OF_HEADER line: not an XDS reflection file")
    header_lines = [ln for ln in head.splitlines() if ln.startswith("!")]
    body = rest.split("\n", 1)[1] if "\n" in rest else ""
    body, end, _ = body.partition("!END_OF_DATA")
    if not end:
        raise InputError(path, "no !END_OF_DATA line: file is truncated")
    try:
        values = np.array(body.split(), dtype=np.float64)
    except ValueError as exc:
        raise InputError(path, f"non-numeric reflection record ({exc})") from None
    return header_lines, values


def _number(header: dict, key: str, path: str, count: int = 1, default=None) -> np.ndarray | float:
    if key not in header:
        if default is not None:
            return default
        raise InputError(path, f"header keyword {key}= missing", field=key)
    try:
        v = np.array(header[key][:count], dtype=float)
    except ValueError:
        raise InputError(path, f"header keyword {key}= is not numeric: {header[key]}", field=key) from None
    if v.size != count:
        raise InputError(path, f"header keyword {key}= needs {count} numbers", field=key)
    return float(v[0]) if count == 1 else v


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, float) / np.linalg.norm(v)


def _read(path: str, kind: str) -> tuple[ReflectionTable, ExperimentList]:
    lines, values = _split(path)
    header, items = _parse_header(lines)
    nitems = int(_number(header, "NUMBER_OF_ITEMS_IN_EACH_DATA_RECORD", path))
    if len(items) != nitems:
        raise InputError(path, f"header names {len(items)} items but records have {nitems}", field="ITEM")
    if values.size % nitems:
        raise InputError(path, f"{values.size} numbers do not fill records of {nitems} items (truncated?)")
    rec = values.reshape(-1, nitems)
    col = {name: rec[:, i] for i, name in enumerate(items)}
    try:
        gx = gemmi.read_xds_ascii(path)
    except (RuntimeError, ValueError) as exc:
        raise InputError(path, f"gemmi cannot read it ({exc})") from None
    if gx.data_size != rec.shape[0]:
        raise InputError(path, f"gemmi reads {gx.data_size} records, the file has {rec.shape[0]}")
    n = rec.shape[0]
    hkl = np.asarray(gx.miller_array, dtype=np.int32)
    iobs, sigma = np.asarray(gx.iobs_array, float), np.asarray(gx.sigma_array, float)
    wavelength = float(gx.wavelength)
    sg = gemmi.find_spacegroup_by_number(int(gx.spacegroup_number))
    cell = gemmi.UnitCell(*gx.cell_constants)
    axis = _unit(np.array(gx.rotation_axis.tolist()))

    # --- geometry from the header
    start_frame = int(_number(header, "STARTING_FRAME", path, default=1.0))
    start_angle = float(_number(header, "STARTING_ANGLE", path, default=0.0))
    osc = float(_number(header, "OSCILLATION_RANGE", path))
    incident = _unit(_number(header, "INCIDENT_BEAM_DIRECTION", path, 3))  # source → sample
    nx, ny = int(_number(header, "NX", path)), int(_number(header, "NY", path))
    qx, qy = float(_number(header, "QX", path)), float(_number(header, "QY", path))
    orgx, orgy = float(_number(header, "ORGX", path)), float(_number(header, "ORGY", path))
    distance = float(_number(header, "DETECTOR_DISTANCE", path))
    det_x = _unit(_number(header, "DIRECTION_OF_DETECTOR_X-AXIS", path, 3, default=np.array([1.0, 0, 0])))
    det_y = _unit(_number(header, "DIRECTION_OF_DETECTOR_Y-AXIS", path, 3, default=np.array([0, 1.0, 0])))
    normal = np.cross(det_x, det_y)

    if kind == "integrate":
        xyzcal = np.stack([col["XCAL"], col["YCAL"], col["ZCAL"]], 1)
        xyzobs = np.stack([col["XOBS"], col["YOBS"], col["ZOBS"]], 1)
        seen = np.any(xyzobs != 0, axis=1)
        xyzobs = np.where(seen[:, None], xyzobs, xyzcal)
    else:
        xyzcal = np.stack([np.asarray(gx.xd_array), np.asarray(gx.yd_array), np.asarray(gx.zd_array)], 1)
        xyzobs = xyzcal
    if "DATA_RANGE" in header:
        first, last = (int(v) for v in _number(header, "DATA_RANGE", path, 2))
    else:
        first, last = start_frame, max(start_frame, int(np.ceil(xyzcal[:, 2].max())) if n else start_frame)

    # s1 from the detector position (XDS pixel coordinates, ORGX/ORGY = foot of the normal)
    pos = (distance * normal + ((xyzcal[:, :1] - orgx) * qx) * det_x + ((xyzcal[:, 1:2] - orgy) * qy) * det_y)
    s1 = pos / np.linalg.norm(pos, axis=1, keepdims=True) / wavelength

    crystal = {"__id__": "crystal", "space_group_hall_symbol": sg.hall}
    for name, key in (("real_space_a", "UNIT_CELL_A-AXIS"), ("real_space_b", "UNIT_CELL_B-AXIS"),
                      ("real_space_c", "UNIT_CELL_C-AXIS")):
        crystal[name] = list(_number(header, key, path, 3))
    origin = distance * normal - orgx * qx * det_x - orgy * qy * det_y
    experiment = Experiment(
        identifier=str(uuid.uuid5(uuid.NAMESPACE_URL, os.path.abspath(path))),
        beam={"direction": (-incident).tolist(), "wavelength": wavelength},
        detector={"panels": [{"name": "Panel", "type": "SENSOR_PAD", "fast_axis": det_x.tolist(),
                              "slow_axis": det_y.tolist(), "origin": origin.tolist(),
                              "pixel_size": [qx, qy], "image_size": [nx, ny]}]},
        goniometer={"rotation_axis": axis.tolist(), "fixed_rotation": np.eye(3).ravel().tolist(),
                    "setting_rotation": np.eye(3).ravel().tolist()},
        scan={"image_range": [first, last], "batch_offset": 0,
              "oscillation": [start_angle + (first - start_frame) * osc, osc]},
        crystal=crystal,
    )

    cols: dict[str, np.ndarray] = {"miller_index": hkl, "id": np.zeros(n, np.int32)}
    flags = np.full(n, F.INTEGRATED_SUM | F.INTEGRATED_PRF, dtype=np.uint64)
    if kind == "integrate":
        rlp = col["RLP"]
        raw, raw_var = iobs * rlp, (sigma * rlp) ** 2
        cols["intensity.cor.value"], cols["intensity.cor.variance"] = iobs, sigma**2
        cols["lp"] = 1.0 / rlp
        cols["peak"] = col["PEAK"] / 100.0
        cols["corr"] = col["CORR"] / 100.0
        cols["maxc"] = col["MAXC"]
        cols["xyzcal.px"] = xyzcal
        if "ISEG" in col:
            cols["panel"] = (col["ISEG"] - 1).astype(np.uint64)
    else:
        raw, raw_var = iobs, sigma**2
        cols["lp"] = np.ones(n)
        if "PEAK" in col:
            cols["peak"] = col["PEAK"] / 100.0
        if "CORR" in col:
            cols["corr"] = col["CORR"] / 100.0
        flags[sigma < 0] |= np.uint64(F.EXCLUDED_FOR_SCALING)
    if "RLP" in col:
        cols["rlp"] = col["RLP"]
    if "PSI" in col:
        cols["psi"] = col["PSI"]
    cols["intensity.sum.value"], cols["intensity.sum.variance"] = raw, raw_var
    cols["intensity.prf.value"], cols["intensity.prf.variance"] = raw.copy(), raw_var.copy()
    cols["flags"] = flags
    cols["xyzobs.px.value"] = xyzobs
    cols["partiality"] = np.ones(n)
    cols["s1"] = s1
    cols["d"] = cell.calculate_d_array(hkl)
    types = {"miller_index": "cctbx::miller::index<>", "id": "int", "flags": "std::size_t", "panel": "std::size_t",
             "xyzobs.px.value": "vec3<double>", "xyzcal.px": "vec3<double>", "s1": "vec3<double>"}
    table = ReflectionTable(cols, {0: experiment.identifier}, {k: types.get(k, "double") for k in cols})
    return table, ExperimentList([experiment])


def read_xds_integrate(path: str | os.PathLike) -> tuple[ReflectionTable, ExperimentList]:
    """Read an XDS INTEGRATE.HKL file (profile-fitted, LP-corrected, unscaled intensities)."""
    return _read(os.fspath(path), "integrate")


def read_xds_ascii(path: str | os.PathLike) -> tuple[ReflectionTable, ExperimentList]:
    """Read an unmerged XDS_ASCII.HKL file (CORRECT output)."""
    return _read(os.fspath(path), "ascii")


def read_xds(path: str | os.PathLike) -> tuple[ReflectionTable, ExperimentList]:
    """Read INTEGRATE.HKL or XDS_ASCII.HKL, telling them apart by the header."""
    path = os.fspath(path)
    try:
        with open(path, "r", errors="replace") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror})") from None
    if "!FORMAT=XDS_ASCII" in head:
        if "MERGE=TRUE" in head.replace(" ", ""):
            raise InputError(path, "merged XDS_ASCII file (MERGE=TRUE); scaling needs unmerged data", field="MERGE")
        return read_xds_ascii(path)
    if "INTEGRATE.HKL" in head or "Generated by INTEGRATE" in head:
        return read_xds_integrate(path)
    raise InputError(path, "not an XDS INTEGRATE.HKL or XDS_ASCII.HKL file (no recognised header)")
